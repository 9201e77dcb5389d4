"""Tensor helpers that more than one backend needs (what they serve is in ``capability``)."""

from __future__ import annotations

import torch

from autoflash.call import AttentionCall
from autoflash.layout import Layout


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
