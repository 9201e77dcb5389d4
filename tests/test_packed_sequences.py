"""Packed rows (position ids that restart) never attend across their boundaries.

The reference is the same sequences run separately through eager attention, as a
right-padded batch. transformers' own eager/sdpa get some of these cases wrong
(../shared/FINDINGS.md item 2); autoflash must get all of them right.
"""

import pytest
import torch

from autoflash import dispatch
from conftest import (FLOAT32_RTOL, legacy_era, model_pair, padding_mask, relative_error, train_step,
                      worst_gradient_error)

SEQUENCES = [[5, 9, 1, 13], [2, 7], [11, 11, 11]]  # lengths per packed row


def _packed_rows(row_lengths, pad_to=None):
    """ids, position_ids, labels, mask for rows of packed sequences; and the sequences one per row."""
    width = pad_to or max(sum(r) for r in row_lengths)
    ids = torch.zeros(len(row_lengths), width, dtype=torch.long)
    positions = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    singles = []
    for row, lengths in enumerate(row_lengths):
        start = 0
        for n in lengths:
            seq = torch.randint(3, 97, (n,))
            ids[row, start:start + n] = seq
            positions[row, start:start + n] = torch.arange(n)
            labels[row, start + 1:start + n] = seq[1:]  # the first token of a sequence is no target
            mask[row, start:start + n] = 1
            singles.append(seq)
            start += n
    return ids, positions, labels, mask, singles


def _one_per_row(singles):
    lengths = [len(s) for s in singles]
    mask = padding_mask(lengths, "right")
    ids = torch.zeros_like(mask)
    for row, seq in enumerate(singles):
        ids[row, :len(seq)] = seq
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _compare(fast_logits, fast_grads, packed_mask, eager, singles):
    ids, mask, labels = _one_per_row(singles)
    ref_logits, ref_grads = train_step(eager, input_ids=ids, attention_mask=mask, labels=labels)
    assert relative_error(fast_logits[packed_mask.bool()], ref_logits[mask.bool()]) < FLOAT32_RTOL
    error, name = worst_gradient_error(fast_grads, ref_grads)
    assert error < FLOAT32_RTOL, f"gradient of {name} differs by {error:.2e}"


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("use_cache", [False, True, None])
@pytest.mark.parametrize("all_ones_mask", [False, True])
def test_packed_row_matches_sequences_run_alone(backend, use_cache, all_ones_mask):
    fast, eager = model_pair(seed=5)
    ids, positions, labels, mask, singles = _packed_rows([SEQUENCES[0]])
    inputs = dict(input_ids=ids, position_ids=positions, labels=labels)
    if use_cache is not None:
        inputs["use_cache"] = use_cache
    if all_ones_mask:
        inputs["attention_mask"] = torch.ones_like(ids)
    with dispatch.forced(backend):
        logits, grads = train_step(fast, **inputs)
    _compare(logits, grads, mask, eager, singles)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_packed_rows_with_padding_match_sequences_run_alone(backend):
    fast, eager = model_pair(seed=6)
    ids, positions, labels, mask, singles = _packed_rows(SEQUENCES, pad_to=36)
    with dispatch.forced(backend):
        logits, grads = train_step(fast, input_ids=ids, position_ids=positions, attention_mask=mask, labels=labels)
    _compare(logits, grads, mask, eager, singles)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_boundaries_given_by_the_collator_are_used_without_a_sync(backend):
    """TRL's padding-free collator passes cu_seq_lens_q/k and max_length_q/k (FINDINGS.md item 3)."""
    if legacy_era():
        pytest.skip("transformers < 4.48: LlamaModel.forward takes no cu_seq_lens_q")
    fast, eager = model_pair(seed=7)
    lengths = SEQUENCES[2] + SEQUENCES[1]
    ids, positions, labels, mask, singles = _packed_rows([lengths])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    with dispatch.forced(backend):
        logits, grads = train_step(fast, input_ids=ids, position_ids=positions, labels=labels, cu_seq_lens_q=cu,
                                   cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    _compare(logits, grads, mask, eager, singles)
