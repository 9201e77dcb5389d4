"""``torch.nn.functional.scaled_dot_product_attention``: runs everywhere (CPU, old GPUs, float32).

Padded or packed batches outside a trace run by sequence: each sequence's tokens are laid out as
one row of a (sequences, longest sequence) grid, so the kernel attends within sequences at the
cost of the longest one, the price of the padded batch transformers would have run and never
more. One dense mask over the whole-model packed row (all of a batch's tokens in one row)
would cost the square of the batch's token count: 2.7-3.8x the time of transformers' own sdpa
on CPU training steps of long sequences (docs/findings.md, 67). Where the grid would cost more than
the layout's own rows (a row packed with many short sequences beside one long one), and in
the other layouts, padding, packing and sliding windows are one dense boolean mask per
forward (block-diagonal, causal, banded), so packed sequences never attend across their
boundaries here either.
K/V heads are shared by folding the query heads onto their KV head for one-token decode steps,
and elsewhere through ``enable_gqa`` on CPU; on a GPU they are repeated, as transformers' sdpa
does (``enable_gqa`` would leave SDPA only its flash kernel, which serves none of these calls, and
its math kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autoflash.backends._common import (decode_key_mask, fold_gqa_queries, repeat_kv, unfold_gqa_output,
                                        zero_padded_queries)
from autoflash.backends.capability import Backend
from autoflash.call import AttentionCall
from autoflash.layout import Layout, allowed_keys, pad, unpad

_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class _Sdpa(Backend):
    name = "sdpa"  # serves every call (its record is the default: everything)

    def run(self, q, k, v, layout: Layout, call: AttentionCall, scale: float):
        if layout.kind == "dense" and call.window is None:
            return _sdpa(q, k, v, None, call, scale, is_causal=call.causal).transpose(1, 2)
        if layout.kind == "cache" and call.q_len == 1 and call.window is None:
            mask = decode_key_mask(layout, q.dtype)
            out = F.scaled_dot_product_attention(fold_gqa_queries(q, call.num_kv_heads), k, v, attn_mask=mask,
                                                 scale=scale)
            return unfold_gqa_output(out, call.num_heads)
        if layout.kind == "varlen" and call.window is None and _grid_is_cheaper(layout):
            return _run_by_sequence(q, k, v, layout, call, scale)
        mask = allowed_keys(layout, call, q.device)
        out = _sdpa(q, k, v, mask, call, scale, is_causal=False).transpose(1, 2)
        return zero_padded_queries(out, layout, call)


def _grid_is_cheaper(layout: Layout) -> bool:
    """Whether (sequences x longest) scores cost no more than the layout's own rows' (batch x length)."""
    sequences = layout.cu_seqlens.shape[0] - 1  # (a shape: known on the host, no sync)
    return 0 < sequences * layout.max_seqlen ** 2 <= layout.batch * layout.q_len * layout.kv_len


def _run_by_sequence(q, k, v, layout: Layout, call: AttentionCall, scale):
    """A varlen layout's real tokens re-laid as one row per sequence, right-padded to the longest: under a
    causal mask a real query then sees real keys only, so no mask is needed (a non-causal call gets a
    key-padding mask of the grid's size). A sliding window keeps the dense mask, which counts it in the
    layout's key slots, as transformers does."""
    slots, mask = _grid(layout, call, q.device)
    sequences, width = layout.cu_seqlens.shape[0] - 1, layout.max_seqlen

    def to_grid(x):  # (batch, heads, len, dim) -> (sequences, heads, width, dim)
        real = unpad(x, layout)
        grid = real.new_zeros(sequences * width, *real.shape[1:]).index_copy(0, slots, real)
        return grid.view(sequences, width, *real.shape[1:]).transpose(1, 2)

    out = _sdpa(to_grid(q), to_grid(k), to_grid(v), mask, call, scale, is_causal=call.causal and mask is None)
    out = out.transpose(1, 2).reshape(sequences * width, call.num_heads, out.shape[-1])
    return pad(out.index_select(0, slots), layout)


def _grid(layout: Layout, call: AttentionCall, device):
    """(each real token's slot in the flattened grid, the grid's mask or None): once per forward."""
    return layout.derive(("sequence grid", call.causal, str(device)), lambda: _build_grid(layout, call.causal, device))


def _build_grid(layout: Layout, causal: bool, device):
    cu = layout.cu_seqlens.to(device=device, dtype=torch.long)
    width = layout.max_seqlen
    token = torch.arange(layout.total, device=device)
    sequence = torch.searchsorted(cu[1:], token, right=True)
    slots = sequence * width + (token - cu[sequence])
    if causal:
        return slots, None
    return slots, (torch.arange(width, device=device)[None, :] < (cu[1:] - cu[:-1])[:, None])[:, None, None, :]


def _sdpa(q, k, v, mask, call: AttentionCall, scale, is_causal):
    # On a GPU, enable_gqa leaves SDPA only its flash and math kernels, and flash serves none of this
    # backend's calls (float32, a mask, an old GPU...): math would hold every score. Repeated K/V keep
    # the memory-efficient kernel, as transformers' sdpa does.
    if call.gqa_ratio > 1 and (not _HAS_ENABLE_GQA or q.is_cuda):
        k, v = repeat_kv(k, call.gqa_ratio), repeat_kv(v, call.gqa_ratio)
        extra = {}
    else:
        extra = {"enable_gqa": call.gqa_ratio > 1} if _HAS_ENABLE_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=call.dropout, is_causal=is_causal,
                                          scale=scale, **extra)


SDPA = _Sdpa()
