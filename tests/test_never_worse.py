"""Never worse than transformers alone: every call transformers answers, autoflash answers as eager
does, or refuses with an error that names what the caller passed.

Padded positions are the one place where implementations differ by nature (no definition says
what a padding position's hidden state is); autoflash's contract is that they hold zeros, on
every path (whole-model padding removal and the per-layer path alike).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _subprocess import run_python
from conftest import (FLOAT32_RTOL, labels_for, last_path, legacy_era, model_pair, modern_era, padding_mask,
                      relative_error, whole_model_padding_removal)

GENERATE = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)


def _batch(lengths, side="left", seed=0):
    mask = padding_mask(lengths, side)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, mask.shape, generator=generator).masked_fill(mask == 0, 0)
    return ids, mask


def _real_max_error(out, ref, mask):
    real = mask.bool()
    return relative_error(out[real], ref[real])


def _decoder(model):
    return model.model


# -- torch.inference_mode ------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_inference_mode_serves_training_style_evaluation_and_generation_as_eager(cache):
    if cache == "static" and legacy_era():
        pytest.skip("transformers < 4.48: its flash-attention class, which autoflash runs behind, refuses StaticCache")
    fast, eager = model_pair(seed=31)
    ids, mask = _batch([7, 3, 5], seed=1)
    labels = labels_for(ids, mask)
    with torch.inference_mode():
        fast.train(), eager.train()  # a training-style forward (dropout is 0): labels, padded batch
        loss, reference_loss = fast(ids, attention_mask=mask, labels=labels).loss, eager(
            ids, attention_mask=mask, labels=labels).loss
        fast.eval(), eager.eval()
        logits = fast(ids, attention_mask=mask).logits
        reference = eager(ids, attention_mask=mask).logits
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        tokens = fast.generate(ids, attention_mask=mask, **GENERATE, **extra)
        reference_tokens = eager.generate(ids, attention_mask=mask, **GENERATE, **extra)
    assert relative_error(loss, reference_loss) < FLOAT32_RTOL
    assert _real_max_error(logits, reference, mask) < FLOAT32_RTOL
    assert torch.equal(tokens, reference_tokens)


# -- degenerate batches ----------------------------------------------------------------------------

@pytest.mark.parametrize("whole_model", [True, False])
def test_a_batch_of_padding_only_answers_with_zeros_at_every_position_and_a_nan_loss_like_eager(whole_model):
    fast, eager = model_pair(seed=32)
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.long)
    labels = torch.full_like(ids, -100)  # what a collator gives padding
    with whole_model_padding_removal(whole_model), torch.no_grad():
        hidden = _decoder(fast)(ids, attention_mask=mask).last_hidden_state
        out = fast(ids, attention_mask=mask, labels=labels)
        ref = eager(ids, attention_mask=mask, labels=labels)
    assert hidden.shape == (2, 6, 64) and torch.count_nonzero(hidden) == 0
    assert out.logits.shape == ref.logits.shape
    assert torch.isnan(out.loss) and torch.isnan(ref.loss)


def test_a_row_of_padding_only_leaves_the_other_rows_equal_to_eager():
    fast, eager = model_pair(seed=33)
    ids, _ = _batch([5, 5], seed=2)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    labels = labels_for(ids, mask)
    out, ref = fast(ids, attention_mask=mask, labels=labels), eager(ids, attention_mask=mask, labels=labels)
    assert relative_error(out.logits[0], ref.logits[0]) < FLOAT32_RTOL
    assert relative_error(out.loss, ref.loss) < FLOAT32_RTOL


@pytest.mark.parametrize("shape", [(0, 6), (2, 0)], ids=["no rows", "no positions"])
def test_an_empty_batch_answers_as_eager_or_says_what_was_passed(shape):
    fast, eager = model_pair(seed=34)
    ids = torch.zeros(shape, dtype=torch.long)
    mask = torch.ones(shape, dtype=torch.long)
    try:
        reference = eager(ids, attention_mask=mask).logits
    except Exception:  # noqa: BLE001 - transformers' own internal error (most releases)
        reference = None
    if reference is not None:
        assert fast(ids, attention_mask=mask).logits.shape == reference.shape
        return
    with pytest.raises(ValueError, match=rf"input_ids has shape \({shape[0]}, {shape[1]}\): a batch with no"):
        fast(ids, attention_mask=mask)


@pytest.mark.parametrize("width", [4, 8], ids=["narrower", "wider"])
@pytest.mark.parametrize("labels", [False, True])
def test_a_mask_that_does_not_match_the_input_is_a_value_error_naming_both_shapes(width, labels):
    fast, _ = model_pair(seed=35)
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.ones(2, width, dtype=torch.long)
    extra = {"labels": ids} if labels else {}
    with pytest.raises(ValueError, match=rf"attention_mask has shape \(2, {width}\) but input_ids has \(2, 6\)"):
        fast(ids, attention_mask=mask, **extra)


# -- what transformers accepts -----------------------------------------------------------------------

def test_hidden_states_of_chosen_layers_by_index():
    fast, eager = model_pair(seed=36, num_hidden_layers=3)
    ids, mask = _batch([6, 2], seed=3)
    try:
        ref = _decoder(eager)(ids, attention_mask=mask, output_hidden_states=[0, 2]).hidden_states
    except (TypeError, ValueError) as exc:
        pytest.skip(f"this transformers release takes no list for output_hidden_states ({exc})")
    out = _decoder(fast)(ids, attention_mask=mask, output_hidden_states=[0, 2]).hidden_states
    assert [h is None for h in out] == [h is None for h in ref]
    for mine, theirs in zip(out, ref):
        if theirs is not None:
            assert _real_max_error(mine, theirs, mask) < FLOAT32_RTOL


@pytest.mark.parametrize("path", ["whole-model", "per-layer"])
def test_padded_positions_hold_zeros_whether_a_tuple_or_a_dict_is_asked_for(path):
    fast, eager = model_pair(seed=37)
    ids, mask = _batch([6, 3, 1], seed=4)
    with whole_model_padding_removal(path == "whole-model"), torch.no_grad():
        as_dict = _decoder(fast)(ids, attention_mask=mask, output_hidden_states=True)
        assert last_path() == path
        as_tuple = _decoder(fast)(ids, attention_mask=mask, output_hidden_states=True, return_dict=False)
        assert last_path() == path
        reference = _decoder(eager)(ids, attention_mask=mask, output_hidden_states=True)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.last_hidden_state)
    padding = mask == 0
    for mine, theirs in zip(as_dict.hidden_states, reference.hidden_states):
        assert torch.count_nonzero(mine[padding]) == 0
        assert _real_max_error(mine, theirs, mask) < FLOAT32_RTOL
    assert torch.count_nonzero(as_dict.last_hidden_state[padding]) == 0


def test_a_tuple_asked_of_the_causal_lm_with_labels_keeps_the_whole_model_saving():
    fast, eager = model_pair(seed=38)
    ids, mask = _batch([6, 3, 2], seed=5)
    labels = labels_for(ids, mask)
    out = fast(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert last_path() == "whole-model"
    ref = eager(ids, attention_mask=mask, labels=labels)
    assert isinstance(out, tuple)
    assert relative_error(out[0], ref.loss) < FLOAT32_RTOL
    assert _real_max_error(out[1], ref.logits, mask) < FLOAT32_RTOL


# -- a model pickled where autoflash is active -------------------------------------------------------

def test_a_model_pickled_with_autoflash_active_runs_where_it_is_not(tmp_path):
    if not modern_era():
        pytest.skip("transformers < ~4.56: autoflash runs behind transformers' own "
                    "'flash_attention_2' name, which every process knows")
    path = tmp_path / "model.pt"
    source = f"""
        import copy, torch, transformers
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1))
        # copies made in this process keep autoflash; only what leaves the process is portable
        print(model.config._attn_implementation, copy.deepcopy(model.config)._attn_implementation)
        torch.save(model, {str(path)!r})
        print(model(torch.tensor([[1, 2, 3]])).logits.sum().item())
    """
    saved = run_python(source).stdout.split()
    loaded = run_python(f"""
        import torch
        model = torch.load({str(path)!r}, weights_only=False)
        print(model.config._attn_implementation, model(torch.tensor([[1, 2, 3]])).logits.sum().item())
    """, env={"AUTOFLASH_DISABLE": "1"}).stdout.split()
    assert saved[:2] == ["autoattn", "autoattn"]
    assert loaded[0] == "sdpa" and abs(float(loaded[1]) - float(saved[2])) < 1e-4


# -- property: random padding, lengths, GQA, grad modes ------------------------------------------------

@st.composite
def _padded_batches(draw):
    rows = draw(st.integers(1, 4))
    width = draw(st.integers(1, 9))
    lengths = draw(st.lists(st.integers(0, width), min_size=rows, max_size=rows))
    side = draw(st.sampled_from(["left", "right"]))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    mode = draw(st.sampled_from(["grad", "no_grad", "inference_mode"]))
    whole_model = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return lengths, width, side, kv_heads, mode, whole_model, seed


_PAIRS = {}


def _pair(kv_heads):
    if kv_heads not in _PAIRS:
        _PAIRS[kv_heads] = model_pair(seed=40 + kv_heads, num_key_value_heads=kv_heads)
    return _PAIRS[kv_heads]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_padded_batches())
def test_any_padding_pattern_length_gqa_ratio_and_grad_mode_matches_eager(case):
    lengths, width, side, kv_heads, mode, whole_model, seed = case
    fast, eager = _pair(kv_heads)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if n:
            mask[row, :n] = 1 if side == "right" else 0
            if side == "left":
                mask[row, width - n:] = 1
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, mask.shape, generator=generator)
    labels = labels_for(ids, mask)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    results = []
    with whole_model_padding_removal(whole_model):
        for model in (fast, eager):
            model.zero_grad(set_to_none=True)
            with context():
                out = model(ids, attention_mask=mask, labels=labels)
                if mode == "grad" and out.loss.requires_grad and not torch.isnan(out.loss):
                    out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((out.loss.detach().clone(), out.logits.detach().clone(), grads))
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = results
    real = mask.bool()
    if real.any():
        assert relative_error(logits[real], ref_logits[real]) < FLOAT32_RTOL
    assert torch.isnan(loss) == torch.isnan(ref_loss)
    if not torch.isnan(ref_loss):
        assert relative_error(loss, ref_loss) < FLOAT32_RTOL
    assert grads.keys() == ref_grads.keys()
    # a gradient that is zero in exact arithmetic (a one-token sequence's query) is rounding noise in
    # both: measured against a thousandth of the model's whole gradient there
    floor = 1e-3 * sum(g.double().norm() ** 2 for g in ref_grads.values()) ** 0.5 if ref_grads else 0
    for name in ref_grads:
        difference = (grads[name].double() - ref_grads[name].double()).norm()
        assert difference <= FLOAT32_RTOL * max(ref_grads[name].double().norm(), floor), name
