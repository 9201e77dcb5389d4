"""The whole-model path runs the causal LM's own head, loss and output class on the real tokens.

A family's ``ForCausalLM.forward`` is whatever its release defines: Gemma 2/3 soft-cap their
logits inside it, every mixture-of-experts model adds a router term to the loss, weighted by the
attention mask, and returns its own output class. autoflash must not rebuild a LLaMA-shaped head
and loss in their place. Here LLaMA's causal LM is given such a forward (autoflash off, the
forward set, autoflash on: autoflash wraps whatever forward the class has, as it does a
release's), and the padded batch is compared with eager's, float32 on CPU: the loss, the extra
output, real-position logits and every gradient.

Before transformers 4.48 a causal LM calls its decoder with named arguments only, so nothing
can reach it but those: the LM head runs on the real tokens and the loss is the one those
releases compute inline (tests/test_whole_model_padding_removal.py), with no forward of another
shape to serve there.
"""

import dataclasses
from typing import Optional

import pytest
import torch

from conftest import (FLOAT32_RTOL, labels_for, last_path, legacy_era, model_pair, padding_mask, relative_error,
                      worst_gradient_error)

CAP = 0.2  # the tiny model's logits reach 0.5: the cap bends most of them
ROUTER_WEIGHT = 0.25


def _softcapped_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                        inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """Gemma 2's head: the logits soft-capped inside the causal LM's forward, not by its lm_head."""
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)  # (training: no cache)
    logits = torch.tanh(self.lm_head(outputs.last_hidden_state) / CAP) * CAP
    loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states)


def _router_term(hidden, attention_mask):
    """A mixture-of-experts model's balancing term, shaped as Mixtral's: a mean over the real tokens
    (weighted by the attention mask where one is given, over every token where none is)."""
    per_token = hidden.float().pow(2).mean(-1)
    if attention_mask is None:
        return per_token.mean()
    weight = attention_mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum()


def _output_with_router_term():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclasses.dataclass
    class RouterOutput(CausalLMOutputWithPast):
        aux_loss: Optional[torch.FloatTensor] = None

    return RouterOutput


def _router_forward(output_class):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        aux = _router_term(outputs.last_hidden_state, attention_mask)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs) + ROUTER_WEIGHT * aux
        return output_class(loss=loss, aux_loss=aux, logits=logits, past_key_values=outputs.past_key_values,
                            hidden_states=outputs.hidden_states)

    return forward


@pytest.fixture
def causal_lm_forward():
    """Sets LlamaForCausalLM.forward to a given function for the test, wrapped by autoflash as a release's."""
    if legacy_era():
        pytest.skip("transformers < 4.48: the causal LM passes its decoder named arguments only (module docstring)")
    import autoflash
    from transformers import LlamaForCausalLM

    autoflash.disable()
    original = LlamaForCausalLM.forward

    def use(forward):
        autoflash.disable()
        LlamaForCausalLM.forward = forward
        assert autoflash.enable()

    yield use
    autoflash.disable()
    LlamaForCausalLM.forward = original
    assert autoflash.enable()


def _steps(fast, eager, mask, seed):
    ids = torch.randint(3, 97, mask.shape, generator=torch.Generator().manual_seed(seed))
    labels = labels_for(ids, mask)
    results = []
    for model in (fast, eager):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, output_hidden_states=True)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert last_path() == "whole-model"
    from autoflash import unpad_model

    assert unpad_model.last_decision()["lm_head_and_loss"]["on"] == "real tokens"
    return results


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_head_that_soft_caps_its_logits_gets_the_same_loss_logits_and_gradients(causal_lm_forward, side):
    causal_lm_forward(_softcapped_forward)
    fast, eager = model_pair(seed=31)
    mask = padding_mask([9, 4, 1, 6], side)
    (out, grads), (ref, ref_grads) = _steps(fast, eager, mask, seed=1)
    real = mask.bool()
    assert relative_error(out.loss, ref.loss) < FLOAT32_RTOL, (out.loss.item(), ref.loss.item())
    assert relative_error(out.logits[real], ref.logits[real]) < FLOAT32_RTOL
    uncapped = fast.lm_head(out.hidden_states[-1])[real]
    assert relative_error(out.logits[real], uncapped) > 0.1  # the cap matters here, and autoflash applied it
    assert not out.logits[~real].any()  # padded positions hold zeros
    error, name = worst_gradient_error(grads, ref_grads)
    assert error < FLOAT32_RTOL, f"gradient of {name} differs by {error:.2e}"


def test_a_loss_with_a_router_term_and_its_own_output_class_is_kept_whole(causal_lm_forward):
    output_class = _output_with_router_term()
    causal_lm_forward(_router_forward(output_class))
    fast, eager = model_pair(seed=32)
    mask = padding_mask([3, 11, 7], "right")
    mask[0] = torch.flip(mask[0], (0,))  # one row left-padded
    (out, grads), (ref, ref_grads) = _steps(fast, eager, mask, seed=2)
    assert type(out).__name__ == "RouterOutput" and isinstance(out, output_class)
    assert relative_error(out.aux_loss, ref.aux_loss) < FLOAT32_RTOL, (out.aux_loss.item(), ref.aux_loss.item())
    assert relative_error(out.loss, ref.loss) < FLOAT32_RTOL
    assert list(out.keys()) == list(ref.keys())
    error, name = worst_gradient_error(grads, ref_grads)
    assert error < FLOAT32_RTOL, f"gradient of {name} differs by {error:.2e}"


def test_the_output_class_the_forward_declares_is_made_ready_when_the_model_is_patched():
    from autoflash import packed_loss
    from transformers import LlamaForCausalLM

    import inspect

    declared = inspect.signature(LlamaForCausalLM.forward).return_annotation
    if not isinstance(declared, type):
        pytest.skip(f"this transformers does not annotate LlamaForCausalLM.forward ({declared!r})")
    assert declared in packed_loss._LAZY  # a compiled forward finds it without making a class in its trace
