"""SDPA, the backend of CPUs, float32 and older GPUs, runs a padded or packed batch by sequence.

The real tokens are re-laid as one row per sequence, right-padded to the longest: the kernel's
work is (sequences x longest^2), what transformers' own sdpa pays for a padded batch, and never
the square of the batch's token count that one mask over the whole-model packed row would cost.
Judged in float32 against the same attention computed in float64 with an explicit mask, and
through whole models against eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoflash import dispatch
from autoflash.backends import sdpa as sdpa_module
from autoflash.call import AttentionCall
from autoflash.layout import Layout, allowed_keys, plan_without_cache
from conftest import (FLOAT32_RTOL, labels_for, last_path, model_pair, padding_mask, relative_error,
                      worst_gradient_error)


def _call(layout, heads=4, kv_heads=2, causal=True, dtype=torch.float32):
    return AttentionCall(kind="varlen", device_type="cpu", capability=None, dtype=dtype, head_dim=8, num_heads=heads,
                         num_kv_heads=kv_heads, q_len=layout.q_len, kv_len=layout.kv_len, dropout=0.0, causal=causal,
                         needs_grad=True)


def _reference(q, k, v, layout, call):
    """float64 attention with the layout's dense mask, zeros on padded queries: what the grid must equal."""
    q, k, v = (x.detach().double() for x in (q, k, v))
    groups = call.num_heads // call.num_kv_heads
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    mask = allowed_keys(layout, call, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    real = torch.zeros(layout.batch * layout.q_len, dtype=torch.bool)
    real[layout.indices if layout.indices is not None else slice(None)] = True
    return out * real.view(layout.batch, layout.q_len, 1, 1)


def _kernel_calls(monkeypatch):
    """The (query shape, mask) of every SDPA call the backend makes."""
    seen, original = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        seen.append((tuple(q.shape), attn_mask, kwargs.get("is_causal")))
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention", recording)
    return seen


LAYOUTS = {  # (mask, position ids): one sequence per row on either side, and rows packed with holes
    "right": (padding_mask([9, 3, 1, 6], "right"), None),
    "left": (padding_mask([2, 7, 5], "left"), None),
    "packed": (torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1]]),
               torch.tensor([[0, 1, 2, 0, 1, 0], [0, 0, 1, 1, 2, 3]])),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_a_padded_or_packed_batch_runs_one_row_per_sequence_as_exact_as_the_masked_kernel(case, causal,
                                                                                          monkeypatch):
    mask, positions = LAYOUTS[case]
    batch, width = mask.shape
    layout = plan_without_cache(mask.bool(), positions, batch, width, torch.device("cpu"))
    call = _call(layout, causal=causal)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, width, 8, generator=generator, requires_grad=True) for heads in (4, 2, 2))
    seen = _kernel_calls(monkeypatch)

    out = sdpa_module.SDPA.run(q, k, v, layout, call, 8 ** -0.5)

    sequences = layout.cu_seqlens.shape[0] - 1
    assert [shape for shape, _, _ in seen] == [(sequences, 4, layout.max_seqlen, 8)]
    _, kernel_mask, is_causal = seen[0]
    assert (kernel_mask is None and is_causal) if causal else kernel_mask.shape == (sequences, 1, 1,
                                                                                   layout.max_seqlen)
    assert out.shape == (batch, width, 4, 8)
    assert relative_error(out, _reference(q, k, v, layout, call)) < FLOAT32_RTOL
    # gradients: against the masked kernel on the padded rows (the path this replaces)
    grad = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    masked = sdpa_module._sdpa(q, k, v, allowed_keys(layout, call, q.device), call, 8 ** -0.5, is_causal=False)
    masked = sdpa_module.zero_padded_queries(masked.transpose(1, 2), layout, call)
    reference = torch.autograd.grad(masked, (q, k, v), grad)
    for got, want in zip(grads, reference):
        assert relative_error(got, want) < FLOAT32_RTOL


def test_a_row_packed_with_many_short_sequences_beside_a_long_one_keeps_the_dense_mask(monkeypatch):
    # 1 x 40 tokens: sequences of 30, then ten of 1; the grid (11 x 30^2 = 9,900 scores) would cost more
    # than the row itself (40^2 = 1,600)
    cu = torch.tensor([0, 30, *range(31, 41)], dtype=torch.int32)
    segment_ids = torch.repeat_interleave(torch.arange(11), cu[1:] - cu[:-1])[None]
    layout = Layout(kind="varlen", batch=1, q_len=40, kv_len=40, cu_seqlens=cu, max_seqlen=30, total=40,
                    segment_ids=segment_ids)
    call = _call(layout)
    q, k, v = (torch.randn(1, heads, 40, 8) for heads in (4, 2, 2))
    seen = _kernel_calls(monkeypatch)

    out = sdpa_module.SDPA.run(q, k, v, layout, call, 8 ** -0.5)

    assert [shape for shape, _, _ in seen] == [(1, 4, 40, 8)] and seen[0][1].shape == (1, 1, 40, 40)
    assert relative_error(out, _reference(q, k, v, layout, call)) < FLOAT32_RTOL


def test_the_whole_model_packed_row_on_sdpa_costs_the_longest_sequence_not_the_row(monkeypatch):
    """A CPU training step: whole-model padding removal packs the batch into one row, and SDPA still sees one
    row per sequence (4 x 12), where one mask over the packed row would be 27 x 27 per head; the step matches
    eager."""
    fast, eager = model_pair(seed=5)
    mask = padding_mask([12, 5, 8, 2], "right")
    ids = torch.randint(3, 97, mask.shape, generator=torch.Generator().manual_seed(5))
    labels = labels_for(ids, mask)
    seen = _kernel_calls(monkeypatch)
    grads = []
    for model in (fast, eager):
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert last_path() == "whole-model" and dispatch.last_decisions["varlen"].backend == "sdpa"
    assert {shape for shape, _, _ in seen} == {(4, 4, 12, 16)}
    error, name = worst_gradient_error(*grads)
    assert error < FLOAT32_RTOL, f"{name}: {error:.2e}"
