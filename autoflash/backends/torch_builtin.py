"""PyTorch's own flash kernels: no extra install, nearly flash-attn's speed on Ampere and newer.

- padded/packed batches: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9). Its
  public function gained ``enable_gqa`` only in later releases; where it is missing, the
  custom op behind it (``torch.ops.torch_attn._varlen_attn``) is called directly, since
  the FlashAttention-2 kernel it wraps serves fewer KV heads natively. Only if neither
  exists are K/V heads repeated.
- batches without padding: SDPA restricted to its flash backend, with ``enable_gqa``.
- one-token decode steps: SDPA (flash backend, or the memory-efficient one where a
  key-padding mask is needed) on queries folded per KV head, so K/V are never repeated.
- a prefill of several tokens into a cache: the valid keys of each row are gathered and
  run through the varlen kernel, whose causal mask is aligned bottom-right.

A deterministic backward needs nothing from here: torch's flash backward is deterministic by
itself under ``torch.use_deterministic_algorithms(True)`` (as SDPA's is); flash-attn's own switch,
``FLASH_ATTENTION_DETERMINISTIC``, does not reach torch's kernels.

cuDNN attention is left out on purpose: it builds a graph per new shape (50-60 ms each on
an H100), which every new batch length or decode step would pay.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import List

import torch
import torch.nn.functional as F

from autoflash import tracing
from autoflash.backends._common import decode_key_mask, fold_gqa_queries, repeat_kv, unfold_gqa_output
from autoflash.backends.capability import FLASH, Backend
from autoflash.call import AttentionCall
from autoflash.layout import Layout, pad, unpad, unpad_cache_keys


class _OnlyKernels:
    """``torch.nn.attention.sdpa_kernel(kernels)`` for calls outside a trace, at a tenth of its host cost.

    ``sdpa_kernel`` is a generator context that looks up and restores every backend flag by
    name: about 27 us per call on a CPU core, as much as the rest of a decode step's attention
    function, paid on every layer of every step of a host-bound decode. This sets the same
    process-wide flags through torch's own setters and restores them on exit. Traced calls
    use ``sdpa_kernel`` itself, which torch.compile understands.
    """

    __slots__ = ("wanted", "previous")

    def __init__(self, wanted):
        self.wanted = wanted

    def __enter__(self):
        self.previous = tuple(get() for get, _ in _FLAGS)
        for (_, set_flag), on in zip(_FLAGS, self.wanted):
            set_flag(on)

    def __exit__(self, *exc):
        for (_, set_flag), on in zip(_FLAGS, self.previous):
            set_flag(on)
        return False


def _flag_accessors():
    """((getter, setter) per SDPA backend, in ``torch.nn.attention``'s order; its names), or None."""
    try:
        from torch.nn.attention import _backend_names
        accessors = tuple((getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"))
                          for name in _backend_names)
        return accessors, tuple(_backend_names.values())
    except Exception:  # noqa: BLE001 - another torch: sdpa_kernel itself is used
        return None


_ACCESSORS = _flag_accessors()
_FLAGS = _ACCESSORS[0] if _ACCESSORS else ()


def only_kernels(*kernels: str):
    """A context in which SDPA may use only ``kernels`` (``SDPBackend`` member names)."""
    if _ACCESSORS is None or tracing.is_tracing():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, k) for k in kernels])
    return _OnlyKernels(tuple(name in kernels for name in _ACCESSORS[1]))


class _TorchBuiltin(Backend):
    name = "torch"
    supports = dataclasses.replace(FLASH, dropout_kinds=("dense", "cache", "masked"), cache_with_grad=False,
                                   cache_key_holes="decode", why={**FLASH.why, "dropout": "varlen_attn has no dropout"})

    @functools.cached_property
    def _varlen(self):
        """(function, how GQA is served): 'enable_gqa' | 'op' | 'repeat'; None when torch has no varlen kernel."""
        try:
            from torch.nn.attention.varlen import varlen_attn
        except Exception:  # noqa: BLE001
            return None
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            return varlen_attn, "enable_gqa"
        op = getattr(getattr(torch.ops, "torch_attn", None), "_varlen_attn", None)
        if op is not None:
            return op, "op"
        return varlen_attn, "repeat"

    def unavailable_reasons(self) -> List[str]:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except Exception:  # noqa: BLE001
            return [f"torch=={torch.__version__} has no torch.nn.attention.sdpa_kernel (needs >= 2.3)"]
        return []

    def own_reasons(self, call: AttentionCall) -> List[str]:
        """What the installed torch lacks: its varlen kernel (2.9 on), which padded batches and prefills need."""
        if self._varlen is not None:
            return []
        if call.kind == "varlen":
            return [f"padded or packed batch with torch=={torch.__version__} (torch.nn.attention.varlen needs >= 2.9)"]
        if call.kind == "cache" and call.q_len > 1:
            return [f"q_len={call.q_len} against a kv cache with torch=={torch.__version__} "
                    "(needs torch.nn.attention.varlen, >= 2.9)"]
        return []

    def run(self, q, k, v, layout: Layout, call: AttentionCall, scale: float):
        if layout.kind == "dense":
            with only_kernels("FLASH_ATTENTION"):
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=call.dropout, is_causal=call.causal,
                                                     scale=scale, enable_gqa=call.gqa_ratio > 1)
            return out.transpose(1, 2)
        if layout.kind == "varlen":
            return pad(self._run_varlen(unpad(q, layout), unpad(k, layout), unpad(v, layout), layout, call, scale),
                       layout)
        if call.q_len > 1:
            # prefill into a cache: gather the valid keys of each row, as varlen sequences whose
            # causal mask is aligned bottom-right (the last query sees the last key)
            out = self._run_varlen(unpad(q, layout), unpad_cache_keys(k, layout), unpad_cache_keys(v, layout),
                                   layout, call, scale, cu_k=layout.cu_seqlens_k, max_k=layout.max_seqlen_k)
            return pad(out, layout)
        q_folded = fold_gqa_queries(q, call.num_kv_heads)
        mask = decode_key_mask(layout, q.dtype)
        # (with a mask SDPA's flash kernel steps aside by itself; its flag stays on, since other threads
        # read it as the user's choice: dispatch._excluded)
        with only_kernels("FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            out = F.scaled_dot_product_attention(q_folded, k, v, attn_mask=mask, scale=scale)
        return unfold_gqa_output(out, call.num_heads)

    def _run_varlen(self, q, k, v, layout: Layout, call: AttentionCall, scale: float, cu_k=None, max_k=None):
        fn, gqa = self._varlen
        cu_q, max_q = layout.cu_seqlens, layout.max_seqlen
        cu_k, max_k = (cu_q, max_q) if cu_k is None else (cu_k, max_k)
        if gqa == "op":
            out = fn(q, k, v, cu_q, cu_k, max_q, max_k, call.causal, scale)
            return out[0] if isinstance(out, (tuple, list)) else out
        window = (-1, 0) if call.causal else (-1, -1)
        if gqa == "enable_gqa":
            return fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window,
                      enable_gqa=call.gqa_ratio > 1)
        groups = call.gqa_ratio
        k, v = (repeat_kv(x.transpose(0, 1).unsqueeze(0), groups).squeeze(0).transpose(0, 1) for x in (k, v))
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window)


TORCH = _TorchBuiltin()
