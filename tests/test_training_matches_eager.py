"""Training and prefill through autoflash equal transformers' eager attention (float32, CPU).

Each case runs through dispatch's automatic choice (SDPA on a CPU, with the dense
block-diagonal mask) and through the reference varlen backend, which takes the
unpad -> per-sequence attention -> pad path the GPU kernels take.
"""

import pytest
import torch

from autoflash import dispatch
from conftest import (FLOAT32_RTOL, labels_for, last_path, legacy_era, model_pair, padding_mask, relative_error,
                      train_step, whole_model_padding_removal, worst_gradient_error)

BACKENDS = ["auto", "reference"]
# "whole": the real tokens of the whole decoder stack packed into one row (autoflash.unpad_model);
# "per-layer": AUTOFLASH_UNPAD_MODEL=0, padding removed inside attention only. Both must equal eager.
STACKS = ["whole", "per-layer"]


def _assert_matches(fast, eager, backend, real, stack="whole", **inputs):
    with dispatch.forced(backend), whole_model_padding_removal(stack == "whole"):
        logits, grads = train_step(fast, **inputs)
        if inputs.get("attention_mask") is not None and not bool(inputs["attention_mask"].all()):
            assert last_path() == ("whole-model" if stack == "whole" else "per-layer")
    ref_logits, ref_grads = train_step(eager, **inputs)
    assert relative_error(logits[real], ref_logits[real]) < FLOAT32_RTOL
    error, name = worst_gradient_error(grads, ref_grads)
    assert error < FLOAT32_RTOL, f"gradient of {name} differs by {error:.2e}"


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("lengths", [[7, 3, 1, 5], [1, 1], [16, 9, 12], [33, 2, 20, 1, 17]])
def test_padded_batch_matches_eager(stack, backend, side, lengths):
    fast, eager = model_pair(seed=len(lengths))
    mask = padding_mask(lengths, side)
    ids = torch.randint(3, 97, mask.shape)
    _assert_matches(fast, eager, backend, mask.bool(), stack, input_ids=ids, attention_mask=mask,
                    labels=labels_for(ids, mask))


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_batch_without_padding_matches_eager(stack, backend, with_mask):
    fast, eager = model_pair(seed=3)
    ids = torch.randint(3, 97, (3, 11))
    extra = {"attention_mask": torch.ones_like(ids)} if with_mask else {}
    _assert_matches(fast, eager, backend, torch.ones_like(ids, dtype=torch.bool), stack, input_ids=ids, labels=ids,
                    **extra)


@pytest.mark.parametrize("seed", [0, 1, int(torch.randint(2, 10_000, ()).item())])
def test_random_seeds_and_gqa_ratios_match_eager(seed):
    generator = torch.Generator().manual_seed(seed)
    kv_heads = [1, 2, 4][seed % 3]
    fast, eager = model_pair(seed=seed, num_key_value_heads=kv_heads)
    lengths = torch.randint(1, 24, (4,), generator=generator).tolist()
    side = "left" if seed % 2 else "right"
    mask = padding_mask(lengths, side)
    ids = torch.randint(3, 97, mask.shape, generator=generator)
    _assert_matches(fast, eager, "reference", mask.bool(), input_ids=ids, attention_mask=mask,
                    labels=labels_for(ids, mask))


@pytest.mark.parametrize("side", ["right", "left"])
def test_output_attentions_returns_eager_weights_for_those_calls(side, caplog):
    from autoflash.settings import forget_said

    forget_said("attention")  # it warns once per process
    fast, eager = model_pair(seed=4)
    fast.eval(), eager.eval()
    mask = padding_mask([6, 2, 4], side)
    ids = torch.randint(3, 97, mask.shape)
    with torch.no_grad():
        out = fast(input_ids=ids, attention_mask=mask, output_attentions=True)
        ref = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    if legacy_era():
        assert any("returns no attention weights" in r.getMessage() for r in caplog.records)
        return
    real = mask.bool()
    assert relative_error(out.logits[real], ref.logits[real]) < FLOAT32_RTOL
    assert len(out.attentions) == len(ref.attentions) == 2
    for weights, expected in zip(out.attentions, ref.attentions):
        # rows of real queries: the probabilities eager computes (padded query rows are undefined)
        assert relative_error(weights.transpose(1, 2)[real], expected.transpose(1, 2)[real]) < FLOAT32_RTOL
    assert any("output_attentions=True runs eager attention" in r.getMessage() for r in caplog.records)


def test_attention_dropout_in_training_is_applied_and_off_in_evaluation():
    fast, _ = model_pair(seed=8, attention_dropout=0.5)
    mask = padding_mask([9, 4, 7], "right")
    ids = torch.randint(3, 97, mask.shape)
    real = mask.bool()
    first = fast(input_ids=ids, attention_mask=mask).logits[real]
    second = fast(input_ids=ids, attention_mask=mask).logits[real]
    assert torch.isfinite(first).all() and relative_error(first, second) > 1e-3  # a new dropout mask each step
    first.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
    fast.eval()
    with torch.no_grad():
        a = fast(input_ids=ids, attention_mask=mask).logits[real]
        b = fast(input_ids=ids, attention_mask=mask).logits[real]
    assert torch.equal(a, b)
