"""Checks and tensor helpers that more than one backend needs."""

from __future__ import annotations

from typing import List

import torch

from autoflash.call import AttentionCall
from autoflash.layout import Layout

HALF_DTYPES = (torch.float16, torch.bfloat16)


def flash_hardware_reasons(call: AttentionCall, max_head_dim: int = 256) -> List[str]:
    """What every flash kernel (flash-attn's and torch's own) requires of the device and the data."""
    reasons = []
    if call.device_type != "cuda":
        reasons.append(f"device={call.device_type} (supported: cuda)")
    elif call.capability is not None and call.capability < (8, 0):
        reasons.append(f"compute capability {call.capability[0]}.{call.capability[1]} (needs >= 8.0)")
    if call.dtype not in HALF_DTYPES:
        reasons.append(f"dtype={str(call.dtype).replace('torch.', '')} (supported: float16, bfloat16; "
                       "float32 models run flash under torch.autocast)")
    if call.head_dim > max_head_dim or call.head_dim % 8:
        reasons.append(f"head_dim={call.head_dim} (supported: multiple of 8, <= {max_head_dim})")
    if call.num_heads % call.num_kv_heads:
        reasons.append(f"heads={call.num_heads}/{call.num_kv_heads} (supported: query heads a multiple of kv heads)")
    return reasons


def window_reason(call: AttentionCall) -> List[str]:
    """The flash kernels here are not yet run with a sliding window (it would need a GPU measurement
    against eager first): a windowed call goes to a backend that applies the window through its mask."""
    if call.window is not None:
        return [f"sliding_window={call.window} (supported: none yet; served exactly by sdpa's mask)"]
    return []


def traced_padding_reason(call: AttentionCall) -> List[str]:
    """Kernels that need the real tokens counted on the host cannot serve a traced padded call."""
    if call.kind == "masked":
        return ["padded or packed batch in a traced call (torch.compile/torch.export: unpadding needs a host sync; "
                "served with a mask)"]
    return []


def decode_key_mask(layout: Layout, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, 1, 1, kv_len) additive mask in ``dtype`` for a one-token decode step's SDPA call, or None.

    Built once per forward, as SDPA's memory-efficient kernel wants it: given a boolean mask, SDPA
    would convert it, and pad it to an aligned width, in every layer (two more kernels per layer
    of a host-bound decode step). The storage is allocated at a width rounded up to 16.
    """
    if layout.key_mask is None:
        return None
    def build():
        batch, kv_len = layout.key_mask.shape
        aligned = torch.zeros(batch, 1, 1, -(-kv_len // 16) * 16, dtype=dtype, device=layout.key_mask.device)
        mask = aligned[..., :kv_len]
        return mask.masked_fill_(~layout.key_mask[:, None, None, :], torch.finfo(dtype).min)

    return layout.derive(("decode_key_mask", dtype), build)


def query_is_real(layout: Layout, call: AttentionCall, device) -> torch.Tensor | None:
    """(batch, q_len) bool, or None where every query is a real token. Built once per forward."""
    return layout.derive(("real", str(device)), lambda: _query_is_real(layout, call, device), sizes=(call.q_len,))


def _query_is_real(layout: Layout, call: AttentionCall, device) -> torch.Tensor | None:
    if layout.kind in ("varlen", "masked"):
        return layout.segment_ids >= 0
    if layout.kind == "cache" and layout.key_mask is not None:
        q_pos = layout.cache_seqlens.long()[:, None] - call.q_len + torch.arange(call.q_len, device=device)[None, :]
        return layout.key_mask.gather(1, q_pos.clamp(min=0)) & (q_pos >= 0)
    return None


def zero_padded_queries(out: torch.Tensor, layout: Layout, call: AttentionCall) -> torch.Tensor:
    """out (batch, q_len, heads, dim): padded query positions set to zero, as the varlen path leaves them."""
    real = query_is_real(layout, call, out.device)
    if real is None:
        return out
    return out * real[:, :, None, None].to(out.dtype)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, len, dim) -> (batch, kv_heads*groups, len, dim): only for kernels that cannot do GQA."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def fold_gqa_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(batch, heads, 1, dim) -> (batch, kv_heads, groups, dim).

    For a one-token decode step the query heads that share a KV head become rows of one
    attention problem against that head, so no kernel ever sees repeated K/V.
    """
    b, h, one, d = q.shape
    return q.reshape(b, num_kv_heads, (h // num_kv_heads) * one, d)


def unfold_gqa_output(out: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(batch, kv_heads, groups, dim) -> (batch, 1, heads, dim)."""
    b, _, _, d = out.shape
    return out.reshape(b, num_heads, 1, d).transpose(1, 2)
