"""Unpad indices, sequence boundaries and cache ranges: computed once per forward, right for any pattern."""

import torch

from autoflash import layout as layout_module
from autoflash.layout import pad, plan_with_cache, plan_without_cache, unpad
from conftest import model_pair, padding_mask, whole_model_padding_removal


def test_right_and_left_padding_give_one_sequence_per_row():
    for side in ("right", "left"):
        mask = padding_mask([4, 1, 3], side).bool()
        plan = plan_without_cache(mask, None, 3, 4, torch.device("cpu"))
        assert plan.kind == "varlen"
        assert plan.cu_seqlens.tolist() == [0, 4, 5, 8]
        assert plan.max_seqlen == 4 and plan.total == 8
        assert plan.indices.tolist() == torch.nonzero(mask.flatten()).flatten().tolist()


def test_restarting_positions_split_a_row_and_padding_does_not():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 0, 1, 1, 2, 3]])
    plan = plan_without_cache(mask, positions, 2, 6, torch.device("cpu"))
    # row 0: [0 1 2][0 1]; row 1: one sequence 0 1 (2 3) across a masked hole
    assert plan.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert plan.segment_ids.tolist() == [[0, 0, 0, 1, 1, -1], [-1, 2, 2, -1, 2, 2]]


def test_full_batch_without_restarts_takes_the_dense_path():
    mask = torch.ones(2, 5, dtype=torch.bool)
    positions = torch.arange(5)[None]
    plan = plan_without_cache(mask, positions, 2, 5, torch.device("cpu"))
    assert plan.kind == "dense" and plan.indices is None
    assert plan_without_cache(None, None, 2, 5, torch.device("cpu")).syncs == 0


def test_unpad_then_pad_restores_real_tokens_and_zeros_padding():
    mask = padding_mask([3, 1, 2], "left").bool()
    plan = plan_without_cache(mask, None, 3, 3, torch.device("cpu"))
    x = torch.randn(3, 2, 3, 4)  # (batch, heads, len, dim)
    flat = unpad(x, plan)
    assert flat.shape == (6, 2, 4)
    back = pad(flat, plan)  # (batch, len, heads, dim)
    assert torch.equal(back[mask], x.transpose(1, 2)[mask])
    assert torch.count_nonzero(back[~mask]) == 0


def test_left_padded_prefill_into_a_cache_is_one_range_per_row():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    plan = plan_with_cache(mask, 3, 2, 8, torch.device("cpu"))
    assert plan.keys_contiguous and plan.syncs == 1
    assert plan.cache_leftpad.tolist() == [2, 0, 3]
    assert plan.cache_seqlens.tolist() == [5, 5, 5]


def test_a_cache_mask_with_holes_is_marked_for_masked_kernels_only():
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert not plan_with_cache(mask, 2, 2, 4, torch.device("cpu")).keys_contiguous
    right_padded = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert not plan_with_cache(right_padded, 2, 2, 4, torch.device("cpu")).keys_contiguous


def test_decode_step_with_a_padding_mask_needs_no_sync_and_goes_to_masked_kernels():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    plan = plan_with_cache(mask, 2, 1, 5, torch.device("cpu"))
    assert plan.syncs == 0 and not plan.keys_contiguous
    assert torch.equal(plan.key_mask, mask)


def test_cache_without_mask_needs_no_sync():
    plan = plan_with_cache(None, 2, 1, 9, torch.device("cpu"))
    assert plan.syncs == 0 and plan.cache_seqlens.tolist() == [9, 9]


def test_plan_is_computed_once_per_forward_not_once_per_layer(monkeypatch):
    calls = []
    original = layout_module.plan_without_cache

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layout_module, "plan_without_cache", counting)
    fast, _ = model_pair(seed=1, num_hidden_layers=4)
    mask = padding_mask([5, 2, 4], "right")
    ids = torch.randint(3, 97, mask.shape)
    with whole_model_padding_removal(False):  # the per-layer path; the whole-model path plans before layer 1
        fast(input_ids=ids, attention_mask=mask)
        assert len(calls) == 1
        fast(input_ids=ids, attention_mask=mask.clone())
        assert len(calls) == 2


def test_static_cache_decode_step_with_fill_levels_needs_no_sync():
    fills = torch.tensor([6, 6, 6], dtype=torch.int32)
    plan = plan_with_cache(fills, 3, 1, 10, torch.device("cpu"))
    assert plan.syncs == 0 and plan.keys_contiguous
    assert plan.cache_seqlens.tolist() == [6, 6, 6]
    assert plan.key_mask[:, 6:].any().item() is False


def test_prefill_into_a_cache_also_gets_the_unpadded_form():
    # width 6 of a 10-slot static cache; 4 new queries; rows left-padded by 1, 3 and 5
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    plan = plan_with_cache(mask, 3, 4, 10, torch.device("cpu"))
    assert plan.syncs == 1 and plan.kv_used == 6
    assert plan.cu_seqlens.tolist() == [0, 4, 7, 8]  # real queries per row: 4, 3, 1
    assert plan.cu_seqlens_k.tolist() == [0, 5, 8, 9]  # valid keys per row: 5, 3, 1
    assert plan.key_indices.tolist() == [1, 2, 3, 4, 5, 9, 10, 11, 17]
    assert plan.indices.tolist() == [0, 1, 2, 3, 5, 6, 7, 11]


def test_packed_row_without_padding_needs_no_gather():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    plan = plan_without_cache(None, positions, 1, 9, torch.device("cpu"))
    assert plan.kind == "varlen" and plan.indices is None
    assert plan.cu_seqlens.tolist() == [0, 3, 5, 9]
    x = torch.randn(1, 2, 9, 4)
    assert torch.equal(unpad(x, plan), x.transpose(1, 2)[0])


def _builds_in_one_forward_of_four_layers(monkeypatch, module, builder, **inputs) -> int:
    """How many times ``module.builder`` runs in one evaluation forward of a 4-layer model."""
    built = []
    original = getattr(module, builder)
    monkeypatch.setattr(module, builder, lambda *a: built.append(1) or original(*a))
    fast, _ = model_pair(seed=1, num_hidden_layers=4)
    fast.eval()
    with torch.no_grad():
        fast(input_ids=torch.randint(3, 97, inputs["attention_mask"].shape), **inputs)
    return len(built)


def test_dense_mask_for_masked_kernels_is_built_once_per_forward(monkeypatch):
    from autoflash import layout

    # a row of one 8-token sequence beside a row of eight 1-token ones: one row per sequence (9 x 8^2 scores)
    # would cost more than the packed row (16^2), so SDPA keeps one dense mask
    mask = torch.ones(2, 8, dtype=torch.long)
    positions = torch.stack([torch.arange(8), torch.zeros(8, dtype=torch.long)])
    assert _builds_in_one_forward_of_four_layers(monkeypatch, layout, "_allowed_keys", attention_mask=mask,
                                                 position_ids=positions) == 1


def test_the_sequence_grid_sdpa_runs_a_padded_batch_on_is_built_once_per_forward(monkeypatch):
    from autoflash.backends import sdpa

    mask = padding_mask([5, 2, 4], "left")
    assert _builds_in_one_forward_of_four_layers(monkeypatch, sdpa, "_build_grid", attention_mask=mask) == 1
