"""Vision-language models on the default path against eager (float32, CPU), images among the text: their language
models' padding removed for the whole stack, image tokens among the real ones, and the composite's own LM head and
loss on the real tokens; greedy generation with an image token-identical.

Qwen2-VL's and Qwen2.5-VL's language models (``Qwen2VLTextModel``, classes of their own, named in no causal-LM
registry) are adopted, their 3-D M-RoPE positions packed; a packed row of theirs keeps its sequences apart.
LLaVA's and InternVL's load as the families' classes (LLaMA's, Qwen2's), which their composites hand the packed row.
"""

from __future__ import annotations

import contextvars

import pytest
import torch

import autoflash
from autoflash import adoption, unpad_model
from _vision_language import COMPOSITES, M_ROPE, batch, vision_language_pair
from conftest import FLOAT32_RTOL, labels_for, modern_era, relative_error, worst_gradient_error

pytestmark = pytest.mark.skipif(not modern_era(), reason="vision-language models' language models are adopted "
                                                         "from the attention-interface era on")


def step(model, **inputs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(fast, eager, inputs):
    inputs = {**inputs, "labels": labels_for(inputs["input_ids"], inputs["attention_mask"])}
    reference, reference_grads = step(eager, **inputs)
    out, grads = step(fast, **inputs)
    real = inputs["attention_mask"].bool()
    assert relative_error(out.logits[real], reference.logits[real]) < FLOAT32_RTOL
    assert abs(out.loss.item() - reference.loss.item()) < FLOAT32_RTOL * max(1.0, abs(reference.loss.item()))
    error, name = worst_gradient_error(grads, reference_grads, floor=1e-4)  # the vision tower's too
    assert error < FLOAT32_RTOL, (name, error)


@pytest.mark.parametrize("model_type", sorted(COMPOSITES))
def test_the_language_model_is_served_and_the_composite_keeps_transformers_choice_for_the_rest(model_type):
    fast, _ = vision_language_pair(model_type)
    assert fast.model.language_model.config._attn_implementation == "autoattn"
    assert fast.config._attn_implementation == "sdpa"  # (the vision tower's attention is transformers')
    if model_type in M_ROPE:
        assert autoflash.status()["other_models"][f"{model_type}_text"] == "adopted: whole model"


@pytest.mark.parametrize("images", [True, False], ids=["with images", "text only"])
@pytest.mark.parametrize("padding", ["right", "left", "inside"])
@pytest.mark.parametrize("model_type", sorted(COMPOSITES))
def test_a_padded_training_step_matches_eager_with_padding_removed_for_the_whole_model(model_type, padding, images):
    fast, eager = vision_language_pair(model_type)
    inputs = batch(padding, images=images, model_type=model_type)
    fresh = contextvars.Context()
    fresh.run(assert_same_step, fast, eager, inputs)
    decision = fresh.run(unpad_model.last_decision)
    assert decision["path"] == unpad_model.WHOLE_MODEL and decision["reason"] is None
    assert decision["lm_head_and_loss"] == {"on": "real tokens", "reason": None}


@pytest.mark.parametrize("model_type", sorted(COMPOSITES))
def test_greedy_generation_with_an_image_is_token_identical(model_type):
    fast, eager = vision_language_pair(model_type)
    inputs = batch("left", seed=2, model_type=model_type)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        tokens = fast.eval().generate(**inputs, **settings)
        reference = eager.eval().generate(**inputs, **settings)
    assert torch.equal(tokens, reference)


@pytest.mark.parametrize("model_type", M_ROPE)
def test_a_packed_row_with_a_text_row_of_positions_keeps_its_sequences_apart(model_type):
    """transformers' convention for packing M-RoPE inputs: a text row of positions put first (4 rows), restarting
    at each sequence; no mask. Each sequence's logits equal those of the sequence run alone."""
    fast, eager = vision_language_pair(model_type)
    lengths = [6, 4, 5]
    ids = torch.randint(10, 128, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    text = torch.cat([torch.arange(n) for n in lengths])[None]
    positions = text[None].expand(4, 1, -1)  # text only: every M-RoPE row equals the text row
    fast.eval(), eager.eval()
    with torch.no_grad():
        packed = fast(input_ids=ids, position_ids=positions).logits[0]
        for start, n in zip(torch.tensor([0] + lengths).cumsum(0).tolist(), lengths):
            alone = eager(input_ids=ids[:, start:start + n]).logits[0]
            assert relative_error(packed[start:start + n], alone) < FLOAT32_RTOL


def test_a_vision_language_model_autoflash_was_not_taught_keeps_transformers_choice():
    """Qwen3-VL's language model adds visual features inside its layers (deepstack), in the padded layout."""
    import transformers

    if not hasattr(transformers, "Qwen3VLTextModel"):
        pytest.skip("this transformers has no Qwen3-VL")
    why = adoption.why_not_adopted(transformers.Qwen3VLTextModel, transformers.Qwen3VLTextConfig())
    assert why is not None and "language model" in why
