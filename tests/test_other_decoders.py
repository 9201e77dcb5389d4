"""Every causal language model in transformers' registry, tiny and random (``tests/_decoders.py``), on its
default path against its own eager attention (float32, CPU): a model autoflash adopts matches eager in its
training step (logits, loss with the router's auxiliary loss, gradients) on right- and left-padded batches
and on a packed row, and decodes the same greedy tokens; a model it does not adopt keeps transformers' choice,
says which feature kept it out, and answers as transformers does.

The four families (LLaMA, Qwen2, Qwen3, Mistral) are patched by their own records (``test_families.py``);
here they are the reference for what every other decoder gets per layer.
"""

from __future__ import annotations

import contextvars
import copy
from pathlib import Path

import pytest
import torch

import autoflash
from autoflash import adoption, dispatch, families, handover, unpad_model
from _decoders import TOO_LARGE, causal_lm, causal_lm_types, parameters_on_meta, tiny_config
from _subprocess import run_python
from conftest import FLOAT32_RTOL, labels_for, modern_era, padding_mask, relative_error, worst_gradient_error

pytestmark = pytest.mark.skipif(not modern_era(), reason="other decoders are adopted from the attention-interface "
                                                         "era on (transformers' mask-function registry)")
def _release_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


# on 4.5x every config carries is_decoder and add_cross_attention, so adoption judges every model an encoder and
# adopts none (fail-closed); the registry is checked from 5.x, where configs carry only their own fields
if modern_era() and _release_major() < 5:
    pytestmark = pytest.mark.skip(reason="4.x: no decoder beyond the families is adopted (findings 88)")
TYPES = causal_lm_types() if modern_era() and _release_major() >= 5 else []
README_RELEASE = "5.25.0"
# what keeps a model out, for models whose configs hold the feature at their defaults or where told to
NOT_ADOPTED = {
    "gemma2": ({}, "soft-capped attention logits"),
    "gpt_oss": ({}, "attention sinks"),
    "llama4_text": ({"attention_chunk_size": 8}, "chunked attention"),
    "deepseek_v3": ({"v_head_dim": 8}, "query/key heads 16 wide and value heads 8"),
    "bert": ({}, "an encoder"),
}


def pair(model_type, **overrides):
    """(default model, eager model) of ``model_type`` with identical random weights; skipped where the tiny
    config does not build or eager itself cannot run it (a model type that needs more than sizes)."""
    try:
        config = tiny_config(model_type, **overrides)
    except Exception as exc:  # noqa: BLE001 - a model type the tiny sizes do not fit
        pytest.skip(f"{model_type} does not build from a tiny config: {type(exc).__name__}: {str(exc)[:200]}")
    if getattr(config, "sub_configs", None):
        pytest.skip(f"{model_type} is composite: its language model is tested as a model type of its own")
    try:
        size = parameters_on_meta(config)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{model_type} does not build from a tiny config: {type(exc).__name__}: {str(exc)[:200]}")
    if size >= TOO_LARGE:
        pytest.skip(f"{model_type}'s config keeps {size:,} parameters with the tiny sizes (a size field of its own)")
    try:
        torch.manual_seed(0)
        fast = causal_lm(copy.deepcopy(config))
        eager_config = copy.deepcopy(config)
        eager_config._attn_implementation = "eager"
        eager = causal_lm(eager_config)
        eager.load_state_dict(fast.state_dict())
        ids = torch.randint(3, 100, (2, 6))
        eager(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as exc:  # noqa: BLE001 - a model type the tiny sizes do not fit
        pytest.skip(f"{model_type} does not run from a tiny config: {type(exc).__name__}: {str(exc)[:200]}")
    return fast, eager


def adopted(model) -> bool:
    return model.config._attn_implementation == "autoattn"


def wrapped(model) -> bool:
    """Whether autoflash's whole-model wrappers serve ``model`` (a family's, or an adopted model whose classes take
    them): its padded positions hold zeros."""
    families_modules = {family.module for family in families.FAMILIES}
    decision = autoflash.status()["other_models"].get(model.config.model_type, "")
    return adopted(model) and (type(model).__module__ in families_modules or decision == "adopted: whole model")


def batch(padding, seed=0):
    mask = padding_mask([12, 7, 3], padding)
    ids = torch.randint(3, 100, mask.shape, generator=torch.Generator().manual_seed(seed)).masked_fill(mask == 0, 0)
    return ids, mask, labels_for(ids, mask)


def step(model, **inputs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_step(fast, eager, real, **inputs):
    try:
        reference, reference_grads = step(eager, **inputs)
    except Exception as exc:  # noqa: BLE001 - a release whose own code fails on this step (5.17's GraniteMoE loss)
        pytest.skip(f"transformers' eager fails on this step: {type(exc).__name__}: {str(exc)[:200]}")
    out, grads = step(fast, **inputs)
    assert relative_error(out.logits[real], reference.logits[real]) < FLOAT32_RTOL
    assert abs(out.loss.item() - reference.loss.item()) < FLOAT32_RTOL * max(1.0, abs(reference.loss.item()))
    if getattr(reference, "aux_loss", None) is not None:
        assert abs(out.aux_loss.item() - reference.aux_loss.item()) < FLOAT32_RTOL * max(1.0, reference.aux_loss.item())
    error, name = worst_gradient_error(grads, reference_grads, floor=1e-4)
    if error >= FLOAT32_RTOL:
        # A gradient that is a long cancelling sum (a q/k norm's weight) can miss 1e-5 by float32 rounding alone:
        # then autoflash may be no further from eager than transformers' own sdpa is on the same step.
        sdpa_error, _ = worst_gradient_error(step(transformers_sdpa(eager), **inputs)[1], reference_grads, floor=1e-4)
        assert error <= sdpa_error * 1.01 and error < 10 * FLOAT32_RTOL, (name, error, sdpa_error)


def transformers_sdpa(eager):
    """A copy of ``eager`` on transformers' own sdpa (autoflash stepping aside for the request)."""
    config = copy.deepcopy(eager.config)
    config._attn_implementation = "sdpa"
    with handover.passing_through():
        model = causal_lm(config)
    assert model.config._attn_implementation == "sdpa"
    model.load_state_dict(eager.state_dict())
    return model


@pytest.mark.parametrize("model_type", TYPES)
def test_the_default_path_matches_eager_on_padded_batches_and_the_path_is_said(model_type):
    fast, eager = pair(model_type)
    decision = autoflash.status()["other_models"].get(fast.config.model_type)
    family = type(fast).__module__ in {family.module for family in families.FAMILIES}
    if family:
        assert adopted(fast)  # a family's classes (InternLM 3, EXAONE, ... load as LLaMA): the family's path
    elif adopted(fast):
        assert decision == "adopted: whole model" or decision.startswith("adopted: per layer ("), decision
    else:
        assert decision is None or decision.startswith("not adopted: "), decision
    handed_before = calls_handed_over()
    for padding in ("right", "left"):
        ids, mask, labels = batch(padding)
        fresh = contextvars.Context()  # the path recorded is this step's (a forward not wrapped records none)
        fresh.run(assert_same_step, fast, eager, mask.bool(), input_ids=ids, attention_mask=mask, labels=labels)
        if adopted(fast):
            fresh.run(assert_the_path_said_was_taken, wrapped(fast))
    if adopted(fast):  # served by autoflash's own kernels, not handed back call by call
        assert calls_handed_over() == handed_before


def assert_the_path_said_was_taken(whole_model: bool):
    """The training step just run: the whole stack on the real tokens, the model's own LM head and loss on them
    too; or, for a model whose classes do not take the wrappers, padding removed inside attention."""
    last = unpad_model.last_decision()
    if whole_model:
        assert last["path"] == "whole-model", last
        assert last["lm_head_and_loss"]["on"] == "real tokens", last
    else:
        assert last is None or last["path"] == "per-layer", last


def calls_handed_over() -> dict:
    return {entry["call"]: entry["count"] for entry in handover.handed_over()}


@pytest.mark.parametrize("model_type", TYPES)
def test_a_packed_row_keeps_its_sequences_apart_or_answers_as_transformers(model_type):
    """Sequences packed in one row, position ids restarting at each: the training step of the same sequences
    as a right-padded batch run by eager (logits at the same tokens, the loss over the same targets, the
    gradients). Where the model's attention is not handed the position ids (Persimmon), autoflash cannot see
    the boundaries: it then answers as transformers does on the packed row, which mixes the sequences too."""
    assert_a_packed_row_is_kept_apart_or_answered_as_transformers(*pair(model_type))


def assert_a_packed_row_is_kept_apart_or_answered_as_transformers(fast, eager) -> bool:
    """The check of the test above; True where the sequences were kept apart."""
    lengths = [5, 7, 3]
    mask = padding_mask(lengths, "right")
    padded = torch.randint(3, 100, mask.shape, generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, 0)
    real = mask.bool()
    ids, positions = padded[real][None], torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, torch.cumsum(torch.tensor(lengths), 0)[:-1]] = -100  # no target across a boundary
    try:
        apart, apart_grads = step(eager, input_ids=padded, attention_mask=mask, labels=labels_for(padded, mask))
    except Exception as exc:  # noqa: BLE001 - a release whose own code fails on this step (5.17's GraniteMoE loss)
        pytest.skip(f"transformers' eager fails on this step: {type(exc).__name__}: {str(exc)[:200]}")
    out, grads = step(fast, input_ids=ids, position_ids=positions, labels=labels)
    if relative_error(out.logits[0], apart.logits[real]) >= FLOAT32_RTOL:
        mixed, mixed_grads = step(eager, input_ids=ids, position_ids=positions, labels=labels)
        assert relative_error(mixed.logits[0], apart.logits[real]) >= FLOAT32_RTOL, "transformers keeps them apart"
        apart, apart_grads, real = mixed, mixed_grads, torch.ones(ids.shape, dtype=torch.bool)
    assert relative_error(out.logits[0], apart.logits[real].reshape(out.logits[0].shape)) < FLOAT32_RTOL
    assert abs(out.loss.item() - apart.loss.item()) < FLOAT32_RTOL * max(1.0, abs(apart.loss.item()))
    error, name = worst_gradient_error(grads, apart_grads, floor=1e-4)
    assert error < FLOAT32_RTOL, name
    return not real.all()


@pytest.mark.parametrize("model_type", TYPES)
def test_a_mixture_of_experts_returns_its_router_logits_laid_out_as_eager_does(model_type):
    """On the whole-model path the router sees the real tokens only; the router logits it returns are laid out as
    transformers lays them out, one (batch * length, experts) tensor per layer, eager's at real tokens and zeros
    at padding (as hidden states are on every path)."""
    fast, eager = pair(model_type)
    ids, mask, labels = batch("left")
    with torch.no_grad():  # (the auxiliary loss, a training term, is compared by the training step's test)
        try:
            reference = eager(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        except Exception as exc:  # noqa: BLE001 - a release whose own code fails here (5.17's GraniteMoE loss)
            pytest.skip(f"transformers' eager fails on this step: {type(exc).__name__}: {str(exc)[:200]}")
        if getattr(reference, "router_logits", None) is None:
            pytest.skip(f"{model_type} returns no router logits")
        out = fast(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    real = mask.bool().reshape(-1)
    assert len(out.router_logits) == len(reference.router_logits)
    for mine, theirs in zip(out.router_logits, reference.router_logits):
        assert mine.shape == theirs.shape
        assert relative_error(mine[real], theirs[real]) < FLOAT32_RTOL
        if wrapped(fast):
            assert not mine[~real].any()


@pytest.mark.parametrize("model_type", TYPES)
def test_greedy_generation_is_token_identical(model_type):
    fast, eager = pair(model_type, output_router_logits=False)  # (transformers' generate has no use for them)
    ids, mask, _ = batch("left", seed=2)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        tokens = fast.eval().generate(input_ids=ids, attention_mask=mask, **settings)
        reference = eager.eval().generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(tokens, reference)


@pytest.mark.parametrize("model_type", sorted(NOT_ADOPTED))
def test_a_model_autoflash_cannot_serve_exactly_keeps_transformers_choice_and_says_why(model_type):
    if model_type not in TYPES:
        pytest.skip(f"this transformers has no {model_type}")
    overrides, why = NOT_ADOPTED[model_type]
    fast, eager = pair(model_type, **overrides)
    assert not adopted(fast)
    assert why in autoflash.status()["other_models"][model_type]
    ids, mask, labels = batch("right")
    assert_same_step(fast, eager, mask.bool(), input_ids=ids, attention_mask=mask, labels=labels)


SOFT_CAPPED = [t for t in ("gemma2", "vaultgemma") if t in TYPES]
# the tiny models' attention scores stay far below Gemma 2's softcap of 50, where tanh changes nothing
SOFTCAP_THAT_BINDS = 0.05


@pytest.mark.parametrize("model_type", SOFT_CAPPED)
def test_a_soft_capped_model_runs_the_whole_model_where_a_kernel_applies_the_softcap(model_type):
    """Gemma 2 soft-caps its attention logits. Where a kernel applies the softcap (flash-attn 2 built with it; on
    the CPU the reference kernel stands in), the model is adopted and its whole stack runs on the real tokens, the
    kernel applying each layer's softcap: eager's training step on right- and left-padded batches, a packed row's
    sequences kept apart, the same greedy tokens, and no call handed back."""
    with dispatch.forced("reference"):
        fast, eager = pair(model_type, attn_logit_softcapping=SOFTCAP_THAT_BINDS)
        assert adopted(fast)
        assert autoflash.status()["other_models"][model_type] == "adopted: whole model"
        handed_before = calls_handed_over()
        for padding in ("right", "left"):
            ids, mask, labels = batch(padding)
            fresh = contextvars.copy_context()  # (with the forced kernel; each step records its own path)
            fresh.run(assert_same_step, fast, eager, mask.bool(), input_ids=ids, attention_mask=mask, labels=labels)
            fresh.run(assert_the_path_said_was_taken, True)
        assert assert_a_packed_row_is_kept_apart_or_answered_as_transformers(fast, eager)
        ids, mask, _ = batch("left", seed=2)
        settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            assert torch.equal(fast.eval().generate(input_ids=ids, attention_mask=mask, **settings),
                               eager.eval().generate(input_ids=ids, attention_mask=mask, **settings))
        assert calls_handed_over() == handed_before


def test_a_soft_capped_model_handed_back_whole_gets_transformers_default_for_it():
    """A feature that decides by the attention name (continuous batching) gets the name transformers would have
    given the model: for Gemma 2 from 5.2x, whose class refuses sdpa (which raises on a softcap there), eager;
    before, sdpa (which dropped the softcap: transformers' own default then)."""
    if "gemma2" not in TYPES:
        pytest.skip("this transformers has no gemma2")
    with dispatch.forced("reference"):
        fast, _ = pair("gemma2", attn_logit_softcapping=SOFTCAP_THAT_BINDS)
    assert adopted(fast)
    default = "sdpa" if type(fast)._supports_sdpa else "eager"
    assert handover.give_back(fast, "a feature that decides by the attention name") == default
    assert fast.config._attn_implementation == default
    handover.take_back(fast)
    assert adopted(fast)


@pytest.mark.parametrize("model_type", SOFT_CAPPED)
def test_a_soft_capped_model_no_kernel_here_applies_keeps_transformers_choice_and_says_which_kernels_refused(
        model_type):
    fast, eager = pair(model_type)
    assert not adopted(fast)
    said = autoflash.status()["other_models"][model_type]
    assert adoption.SOFTCAP_UNAPPLIED in said, said
    assert "sdpa: softcap=" in said and "flash_attn: " in said, said


def test_a_composite_model_is_judged_by_its_language_model():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    assert adoption.why_not_adopted(LlavaForConditionalGeneration, LlavaConfig()).startswith("a composite model")


def test_the_readmes_model_table_is_what_autoflash_adopts():
    import transformers

    from autoflash import models_table

    if transformers.__version__ != README_RELEASE:
        pytest.skip(f"the README's table is of transformers {README_RELEASE}")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("<!-- models table: begin -->\n")[1].split("<!-- models table: end -->")[0]
    assert table == models_table.registry_markdown(), "regenerate it: autoflash models"
    kinds = [row.strip("| ").split(" | ")[1].split(" (")[0].split(":")[0] for row in table.splitlines()[2:]]
    summary = (f"{kinds.count('whole model')} whole model, {kinds.count('per layer')} per layer, "
               f"{kinds.count('not served')} not served, {kinds.count('not judged')} not judged")
    assert f"transformers {README_RELEASE}: {summary}</summary>" in readme


def test_families_variable_narrows_adoption_to_the_model_types_listed():
    code = """
        import sys, json
        sys.path.insert(0, "tests")
        import autoflash
        from _decoders import causal_lm, tiny_config
        print(json.dumps({t: causal_lm(tiny_config(t)).config._attn_implementation for t in ("mixtral", "phi3", "llama")}))
        print(json.dumps(autoflash.status()["other_models"]))
    """
    listed = run_python(code, env={"AUTOFLASH_FAMILIES": "mixtral"}).stdout.splitlines()
    assert '"mixtral": "autoattn"' in listed[0] and '"phi3": "autoattn"' not in listed[0]
    assert '"llama": "autoattn"' not in listed[0]
    assert "left out by AUTOFLASH_FAMILIES" in listed[1]
    everything = run_python(code).stdout.splitlines()  # a fresh process: adopted on the default path
    assert everything[0].count('"autoattn"') == 3


def test_an_adopted_model_asked_for_autoattn_again_after_disable_and_enable_runs_the_whole_model():
    """``disable()`` undoes the whole-model wrappers with every patch; a model built before, set back to autoflash
    by name once it is enabled again, has them wired again (findings 91)."""
    if "phi3" not in TYPES:
        pytest.skip("this transformers has no phi3")
    fast, eager = pair("phi3")
    autoflash.disable()
    try:
        fast.set_attn_implementation("sdpa")
    finally:
        autoflash.enable()
    fast.set_attn_implementation("autoattn")
    ids, mask, labels = batch("right")
    fresh = contextvars.Context()
    fresh.run(assert_same_step, fast, eager, mask.bool(), input_ids=ids, attention_mask=mask, labels=labels)
    fresh.run(assert_the_path_said_was_taken, True)


def test_a_value_per_position_the_packed_row_does_not_lay_out_keeps_the_padding():
    """Gemma 4's per-layer inputs, one per input position, as its vision-language model hands them to its language
    model: the layers run per layer on the padded batch, and say why; the answer is eager's."""
    if "gemma4_text" not in TYPES:
        pytest.skip("this transformers has no gemma4_text")
    fast, eager = pair("gemma4_text", vocab_size_per_layer_input=128, hidden_size_per_layer_input=16)
    ids, mask, _ = batch("left")
    fast.eval(), eager.eval()
    fresh = contextvars.Context()
    with torch.no_grad():
        embeds = fast.model.embed_tokens(ids)
        per_layer_inputs = fast.model.get_per_layer_inputs(ids, embeds)  # (5.17 needs the embeddings too)
        out = fresh.run(fast.model, inputs_embeds=embeds, attention_mask=mask, per_layer_inputs=per_layer_inputs)
        reference = eager.model(inputs_embeds=embeds, attention_mask=mask, per_layer_inputs=per_layer_inputs)
    decision = fresh.run(unpad_model.last_decision)
    assert decision["path"] == unpad_model.PER_LAYER and "per_layer_inputs holds a value per input position" in \
        decision["reason"], decision
    real = mask.bool()
    assert relative_error(out.last_hidden_state[real], reference.last_hidden_state[real]) < FLOAT32_RTOL


def test_a_decoder_whose_forward_takes_its_arguments_in_another_order_runs_the_whole_model_called_positionally():
    """GPT-2's decoder takes the cache before the mask; its causal LM passes input_ids positionally. Both reach the
    whole-model wrapper by name, and a caller's positional arguments are bound as the forward names them."""
    if "gpt2" not in TYPES:
        pytest.skip("this transformers has no gpt2")
    fast, eager = pair("gpt2")
    ids, mask, _ = batch("right")
    token_types = (torch.arange(ids.shape[1]) % 2).expand_as(ids)  # packed with the ids
    fast.eval(), eager.eval()
    fresh = contextvars.Context()
    with torch.no_grad():
        out = fresh.run(fast.transformer, ids, None, mask, token_types)  # (input_ids, cache, attention_mask, ...)
        reference = eager.transformer(ids, None, mask, token_types)
    assert fresh.run(unpad_model.last_decision)["path"] == unpad_model.WHOLE_MODEL
    real = mask.bool()
    assert relative_error(out.last_hidden_state[real], reference.last_hidden_state[real]) < FLOAT32_RTOL
    with pytest.raises(TypeError, match="multiple values for argument 'attention_mask'"):
        fast.transformer(ids, None, mask, attention_mask=mask)
