"""The varlen contract, computed one sequence at a time: the executable specification.

Not a backend dispatch ever picks: tests select it (``autoflash.dispatch.forced``) to
run the whole unpad -> varlen -> pad path on a CPU, and to check that the layouts the
fast kernels receive (``cu_seqlens``, the cache's ``[leftpad, seqlen)`` ranges) describe
the same attention as transformers' eager implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autoflash.backends._common import repeat_kv
from autoflash.backends.capability import Backend, Supports
from autoflash.call import AttentionCall
from autoflash.layout import Layout, pad, unpad, unpad_cache_keys


def varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale: float, causal: bool, window=None,
                     softcap=None) -> torch.Tensor:
    """q (total_q, heads, dim), k/v (total_k, kv_heads, dim) -> (total_q, heads, dim).

    Sequence i is q[cu_q[i]:cu_q[i+1]] against k[cu_k[i]:cu_k[i+1]]; causal masks are
    aligned bottom-right (the last query sees the last key), as in flash-attn >= 2.1; with a
    ``window``, a query sees only the ``window`` keys ending at its own position; with a ``softcap``, the
    scaled scores become ``softcap * tanh(scores / softcap)`` before the softmax.
    """
    groups = q.shape[1] // k.shape[1]
    out = q.new_zeros(q.shape)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if q1 == q0:
            continue
        qi = q[q0:q1].transpose(0, 1).unsqueeze(0)
        ki = repeat_kv(k[k0:k1].transpose(0, 1).unsqueeze(0), groups)
        vi = repeat_kv(v[k0:k1].transpose(0, 1).unsqueeze(0), groups)
        mask = None
        if causal:
            nq, nk = q1 - q0, k1 - k0
            own = torch.arange(nq)[:, None] + (nk - nq)  # each query's own key position
            mask = torch.arange(nk)[None, :] <= own
            if window is not None:
                mask = mask & (torch.arange(nk)[None, :] > own - window)
            mask = mask.to(q.device)
        oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale) if softcap is None else \
            _softcapped_attention(qi, ki, vi, mask, scale, softcap)
        out[q0:q1] = oi.squeeze(0).transpose(0, 1)
    return out


def _softcapped_attention(q, k, v, mask, scale: float, softcap: float):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class _Reference(Backend):
    name = "reference"
    supports = Supports(dropout_kinds=(), traced_padding=False, cache_key_holes="decode", softcap=True,
                        why={"traced_padding": "computes one sequence at a time on the host"})

    def run(self, q, k, v, layout: Layout, call: AttentionCall, scale: float):
        b = layout.batch
        if layout.kind == "varlen":
            return pad(varlen_reference(unpad(q, layout), unpad(k, layout), unpad(v, layout), layout.cu_seqlens,
                                        layout.cu_seqlens, scale, call.causal, call.window, call.softcap), layout)
        if layout.kind == "dense":
            cu = torch.arange(b + 1, device=q.device, dtype=torch.int32) * call.q_len
            out = varlen_reference(unpad(q, layout), unpad(k, layout), unpad(v, layout), cu, cu, scale, call.causal,
                                   call.window, call.softcap)
            return out.view(b, call.q_len, call.num_heads, call.head_dim)
        if call.q_len > 1:  # the unpadded form the torch backend's varlen kernel receives
            out = varlen_reference(unpad(q, layout), unpad_cache_keys(k, layout), unpad_cache_keys(v, layout),
                                   layout.cu_seqlens, layout.cu_seqlens_k, scale, call.causal, call.window,
                                   call.softcap)
            return pad(out, layout)
        # a decode step: each row's query is the last position before its fill level and sees
        # every valid key before it (any mask pattern)
        out = q.new_zeros(b, 1, call.num_heads, call.head_dim)
        for r in range(b):
            fill = int(layout.cache_seqlens[r])
            valid = torch.ones(fill, dtype=torch.bool, device=q.device) if layout.key_mask is None else \
                layout.key_mask[r, :fill]
            if fill == 0 or not bool(valid[-1]):
                continue  # a padded query stays zero
            if call.window is not None:  # the window counts key slots back from the query's
                valid = valid & (torch.arange(fill, device=q.device) > fill - 1 - call.window)
            keys, values = (x[r, :, :fill][:, valid].transpose(0, 1) for x in (k, v))
            cu_q = torch.tensor([0, 1], dtype=torch.int32)
            cu_k = torch.tensor([0, keys.shape[0]], dtype=torch.int32)
            out[r] = varlen_reference(q[r, :, -1:].transpose(0, 1), keys, values, cu_q, cu_k, scale, call.causal,
                                      softcap=call.softcap)
        return out


REFERENCE = _Reference()
