"""Shared fixtures: a tiny random LLaMA twice (autoflash and eager, same weights) and batch builders.

Tolerances are named once here. float32 on CPU: autoflash must equal eager up to
float32 rounding of a differently ordered reduction.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch

FLOAT32_RTOL = 1e-5

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, **overrides})


LEGACY_ERA = "attention-classes"  # transformers 4.37-4.47: autoflash runs behind "flash_attention_2"
MODERN_ERA = "attention-interface"  # transformers >= ~4.56: registered as "autoattn"


def patch_era() -> str:
    """Which autoflash patch serves the installed transformers (see autoflash/patches/)."""
    import transformers.models.llama.modeling_llama as llama

    import autoflash
    from autoflash import hooks

    assert autoflash.enable(), "autoflash did not patch transformers in the test process"
    return hooks.state()["eras"][llama.__name__]


def expected_attention_name() -> str:
    return "autoattn" if patch_era() == MODERN_ERA else "flash_attention_2"


def modern_era() -> bool:
    return patch_era() == MODERN_ERA


def legacy_era() -> bool:
    return patch_era() == LEGACY_ERA


def model_pair(seed: int = 0, dtype=torch.float32, device="cpu", **overrides):
    """(autoflash model, eager model) with identical random weights."""
    from transformers import LlamaForCausalLM

    expected = expected_attention_name()
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    fast = LlamaForCausalLM(copy.deepcopy(config))
    eager_config = copy.deepcopy(config)
    eager_config._attn_implementation = "eager"  # works in every transformers era
    eager = LlamaForCausalLM(eager_config)
    eager.load_state_dict(fast.state_dict())
    assert fast.config._attn_implementation == expected and eager.config._attn_implementation == "eager"
    return fast.to(device=device, dtype=dtype), eager.to(device=device, dtype=dtype)


@contextlib.contextmanager
def whole_model_padding_removal(enabled: bool):
    """Run the body with AUTOFLASH_UNPAD_MODEL set to 1 or 0 (the switch is read once per process)."""
    from autoflash import settings as settings_module

    variable = settings_module.UNPAD_MODEL_VARIABLE
    before = os.environ.get(variable)
    os.environ[variable] = "1" if enabled else "0"
    settings_module.settings.cache_clear()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before
        settings_module.settings.cache_clear()


def last_path() -> str:
    """Which path the last padded forward took: "whole-model" or "per-layer"."""
    from autoflash import unpad_model

    decision = unpad_model.last_decision()
    return decision and decision["path"]


def dynamic_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers < 4.5x: no arguments
        return DynamicCache()


def static_cache_or_skip(config, max_cache_len, batch_size):
    """A StaticCache; skipped where this transformers era's attention path cannot use one."""
    import inspect

    transformers = pytest.importorskip("transformers")
    if legacy_era():
        pytest.skip("transformers < 4.48: its flash-attention class, which autoflash runs behind, refuses StaticCache")
    parameters = inspect.signature(transformers.StaticCache.__init__).parameters
    extra = {"max_batch_size": batch_size} if "max_batch_size" in parameters else {}  # transformers < 4.5x
    return transformers.StaticCache(config=config, max_cache_len=max_cache_len, **extra)


def cache_keyword(model) -> str:
    """transformers renamed LlamaModel.forward's `past_key_values` to `cache` (5.2x); use whichever it takes."""
    import inspect

    parameters = inspect.signature(type(model.model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def padding_mask(lengths, side: str, device="cpu") -> torch.Tensor:
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n:] = 1
    return mask


def labels_for(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels with -100 on padding and on every target predicted from a padding position.

    The second rule is ../shared/FINDINGS.md item 4: the first real token of a left-padded
    row is otherwise a target predicted from padding, whose loss depends on how each
    implementation fills fully masked rows.
    """
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100
    return labels


def train_step(model, **inputs):
    """(logits, {parameter name: gradient}) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def gradient_penalty_under_math(model, ids, mask):
    """(penalty, the first layer's q_proj gradient), both float32, of a gradient penalty (the loss's gradient
    with respect to the input embeddings, squared and summed) run under SDPA's math kernel: a double
    backward, which only that kernel gives."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with sdpa_kernel([SDPBackend.MATH]):
        loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels_for(ids, mask)).loss
        (grad,) = torch.autograd.grad(loss, embeds, create_graph=True)
        penalty = grad.float().pow(2).sum()
        penalty.backward()
    return penalty.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.float()


def half_precision_errors(logits, grads, eager32, eager_half, inputs, real) -> tuple:
    """(logits' error, eager's own in the same dtype, the worst gradient's error, eager's own) of a half-precision
    step's ``logits`` and ``grads`` against float32 eager, on the ``real`` positions: one step of each eager."""
    reference, reference_grads = train_step(eager32, **inputs)
    half, half_grads = train_step(eager_half, **inputs)
    return (relative_error(logits[real].float(), reference[real]), relative_error(half[real].float(), reference[real]),
            max(relative_error(grads[n].float(), reference_grads[n]) for n in reference_grads),
            max(relative_error(half_grads[n].float(), reference_grads[n]) for n in reference_grads))


def assert_half_precision_step_matches_eager(fast, eager32, eager_half, mask, inputs) -> tuple:
    """One training step of ``fast`` (half precision) judged against float32 eager as every half-precision path is
    (``within_half_precision_floor``, its floor set by ``eager_half``, eager in the same dtype), on the real
    positions of ``mask``; (the backend each kind of call last took, the padded forward's path), for the caller to
    assert on."""
    from autoflash import dispatch, unpad_model

    logits, grads = train_step(fast, **inputs)
    used = {kind: decision.backend for kind, decision in dispatch.last_decisions.items()}
    path = unpad_model.last_decision()
    error, floor, gradient_error, gradient_floor = half_precision_errors(logits, grads, eager32, eager_half, inputs,
                                                                         mask.bool())
    print(f"{type(fast).__name__} {logits.dtype} {path and path['path']} {used}: logits {error:.2e} "
          f"(eager {floor:.2e}), gradients {gradient_error:.2e} (eager {gradient_floor:.2e})")
    assert within_half_precision_floor(error, floor), f"logits {error:.2e} vs eager's floor {floor:.2e}"
    assert within_half_precision_floor(gradient_error, gradient_floor), \
        f"gradients {gradient_error:.2e} vs eager's floor {gradient_floor:.2e}"
    return used, path


def within_half_precision_floor(error, eager_error) -> bool:
    """How a half-precision path is judged against float32 eager (../shared/FINDINGS.md item 5): below 1e-2, or
    at most twice eager's own error in the same dtype on the same case, plus 2e-3."""
    return error < 1e-2 or error <= 2 * eager_error + 2e-3


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def worst_gradient_error(grads, reference, floor: float = 0.0) -> tuple:
    """(the largest relative error of a parameter's gradient, its name). ``floor``: a gradient whose norm is
    below this fraction of the largest one is judged against that instead of itself (a key projection's
    bias has zero gradient in exact arithmetic: its relative error is rounding over rounding)."""
    assert grads.keys() == reference.keys()
    scale = floor * max(r.double().norm().item() for r in reference.values())
    return max((((grads[n].double() - reference[n].double()).norm().item()
                 / max(reference[n].double().norm().item(), scale, 1e-30)), n) for n in reference)


@pytest.fixture(autouse=True)
def _fresh_dispatch_state():
    from autoflash import dispatch

    dispatch.clear_cache()
    yield
