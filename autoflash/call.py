"""The record that describes one attention call: what dispatch and backends decide on."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class AttentionCall:
    """Everything a backend needs to say whether it can serve a call, and nothing it must compute."""

    kind: str  # layout kind: "dense" | "varlen" | "cache"
    device_type: str
    capability: Optional[Tuple[int, int]]  # CUDA compute capability, None off CUDA (and in traced calls' records)
    dtype: torch.dtype  # the dtype the kernel would run in (after autocast)
    head_dim: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    dropout: float
    causal: bool
    needs_grad: bool
    left_padded_cache: bool = False
    cache_keys_contiguous: bool = True
    # transformers' sliding window where it binds (some sequence is longer): a query at position i
    # sees keys i - window + 1 .. i. None: no window, or one no sequence reaches past
    window: Optional[int] = None
    # some sequence has padding between two of its real tokens (``Layout.holes``): a varlen kernel's window,
    # counted in real tokens, is not transformers' there
    holes: bool = False
    # transformers' logit soft-capping (Gemma 2: scores become softcap * tanh(scores / softcap) before the
    # softmax), None where the model has none: only a kernel that applies it may serve the call
    softcap: Optional[float] = None
    # a call being traced by torch.compile or torch.export (dispatch decides it once, at trace time):
    # only kernels that trace may serve it
    traced: bool = False
    # who asked for a backward that gives the same gradients on every run ("" nobody; see
    # deterministic_backward_asked): set on training calls, those with gradients or in a training module
    deterministic: str = ""

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    def describe(self) -> str:
        return (f"{self.kind} q_len={self.q_len} kv_len={self.kv_len} heads={self.num_heads}/{self.num_kv_heads} "
                f"head_dim={self.head_dim} dtype={str(self.dtype).replace('torch.', '')} device={self.device_type}"
                + (f" sm{self.capability[0]}{self.capability[1]}" if self.capability else "")
                + (f" dropout={self.dropout}" if self.dropout else "")
                + (f" sliding_window={self.window}" if self.window is not None else "")
                + (f" softcap={self.softcap}" if self.softcap is not None else "")
                + (" grad" if self.needs_grad else "")
                + (f" deterministic ({self.deterministic})" if self.deterministic else "")
                + (" traced" if self.traced else ""))


TORCH_SWITCH = "torch.use_deterministic_algorithms"
FLASH_ATTN_SWITCH = "FLASH_ATTENTION_DETERMINISTIC=1"


@torch.compiler.assume_constant_result  # (a compiled program keeps its trace time's answer)
def deterministic_backward_asked() -> str:
    """Which switch asks for reproducible attention gradients, "" if none: torch's
    (``torch.use_deterministic_algorithms(True)``, not ``warn_only``: every kernel, torch's own flash
    backward included, must be deterministic), else ``FLASH_ATTENTION_DETERMINISTIC=1``, flash-attn's,
    which transformers hands to flash-attn only. The Trainer's ``full_determinism`` sets both."""
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        return TORCH_SWITCH
    return FLASH_ATTN_SWITCH if os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1" else ""


@functools.lru_cache(maxsize=None)
def device_capability(index: Optional[int]) -> Tuple[int, int]:
    """The compute capability of CUDA device ``index`` (None: the current one)."""
    return torch.cuda.get_device_capability(index)


def capability_of(device: torch.device) -> Optional[Tuple[int, int]]:
    """The CUDA compute capability; None off CUDA, and in a traced call (dispatch reads it at trace time)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return None
    return device_capability(device.index if device.index is not None else torch.cuda.current_device())
