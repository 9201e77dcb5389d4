"""``torch.nn.functional.scaled_dot_product_attention``: runs everywhere (CPU, old GPUs, float32).

Padding, packing and sliding windows are expressed as one dense boolean mask per forward
(block-diagonal, causal, banded), so packed sequences never attend across their boundaries
here either.
K/V heads are shared through ``enable_gqa`` and, for one-token decode steps, by folding
the query heads onto their KV head, never by repeating K/V.
"""

from __future__ import annotations

from typing import List

import torch.nn.functional as F

from autoflash.backends._common import (decode_key_mask, fold_gqa_queries, repeat_kv, unfold_gqa_output,
                                        zero_padded_queries)
from autoflash.call import AttentionCall
from autoflash.layout import Layout, allowed_keys

_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class _Sdpa:
    name = "sdpa"

    def unavailable_reasons(self) -> List[str]:
        return []

    def reasons_not_supported(self, call: AttentionCall) -> List[str]:
        return []

    def run(self, q, k, v, layout: Layout, call: AttentionCall, scale: float):
        if layout.kind == "dense" and call.window is None:
            return _sdpa(q, k, v, None, call, scale, is_causal=call.causal).transpose(1, 2)
        if layout.kind == "cache" and call.q_len == 1 and call.window is None:
            mask = decode_key_mask(layout, q.dtype)
            out = F.scaled_dot_product_attention(fold_gqa_queries(q, call.num_kv_heads), k, v, attn_mask=mask,
                                                 scale=scale)
            return unfold_gqa_output(out, call.num_heads)
        mask = allowed_keys(layout, call, q.device)
        out = _sdpa(q, k, v, mask, call, scale, is_causal=False).transpose(1, 2)
        return zero_padded_queries(out, layout, call)


def _sdpa(q, k, v, mask, call: AttentionCall, scale, is_causal):
    if call.gqa_ratio > 1 and not _HAS_ENABLE_GQA:
        k, v = repeat_kv(k, call.gqa_ratio), repeat_kv(v, call.gqa_ratio)
        extra = {}
    else:
        extra = {"enable_gqa": call.gqa_ratio > 1} if _HAS_ENABLE_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=call.dropout, is_causal=is_causal,
                                          scale=scale, **extra)


SDPA = _Sdpa()
