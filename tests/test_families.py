"""Qwen2, Qwen3 and Mistral take LLaMA's path: each family against its own eager attention (float32, CPU),
with padding on either side or both, packed rows, greedy generation from dynamic and static caches, and
sliding windows shorter than the sequences, in training and in decoding past the window.

LLaMA itself is the subject of every other test file. A family is patched in the transformers eras its
record names (``autoflash.families``); in the others it is left exactly as transformers builds it.
"""

from __future__ import annotations

import copy

import pytest
import torch

import autoflash
from autoflash import dispatch, families, hooks, unpad_model
from conftest import (FLOAT32_RTOL, TINY, cache_keyword, dynamic_cache, expected_attention_name, labels_for,
                      last_path, patch_era, relative_error, static_cache_or_skip, train_step, worst_gradient_error)

# family -> (config class, causal-LM class, what its config needs to show what sets it apart)
SUBJECTS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}
# a window shorter than the sequences below: Mistral on every layer, Qwen on the layers from max_window_layers
WINDOWS = {
    "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0},
    "mistral": {"sliding_window": 16},
}


def _classes_or_skip(name):
    import transformers

    config_name, model_name, _ = SUBJECTS[name]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    return getattr(transformers, config_name), getattr(transformers, model_name)


def _served_or_skip(name):
    if patch_era() not in families.BY_NAME[name].eras:
        pytest.skip(f"{name} is patched from {families.served_from(families.BY_NAME[name])} "
                    f"(this release is of the {patch_era()} era; see test_left_alone_where_its_era_is_not_served)")


def family_pair(name, seed=0, **overrides):
    """(autoflash model, eager model) of family ``name`` with identical random weights."""
    config_class, model_class = _classes_or_skip(name)
    _served_or_skip(name)
    torch.manual_seed(seed)
    config = config_class(**{**TINY, **SUBJECTS[name][2], **overrides})
    fast = model_class(copy.deepcopy(config))
    eager_config = copy.deepcopy(config)
    eager_config._attn_implementation = "eager"
    eager = model_class(eager_config)
    eager.load_state_dict(fast.state_dict())
    assert fast.config._attn_implementation == expected_attention_name(), "the family's model did not get autoflash"
    return fast, eager


def _batch(lengths, sides, seed=0):
    """ids, mask, labels; ``sides`` per row ("left" or "right")."""
    width = max(lengths)
    mask = torch.cat([_row_mask(n, width, side) for n, side in zip(lengths, sides)])
    ids = torch.randint(3, 97, mask.shape, generator=torch.Generator().manual_seed(seed)).masked_fill(mask == 0, 0)
    return ids, mask, labels_for(ids, mask)


def _row_mask(n, width, side):
    row = torch.zeros(1, width, dtype=torch.long)
    if side == "right":
        row[0, :n] = 1
    else:
        row[0, width - n:] = 1
    return row


def _assert_training_matches(fast, eager, ids, mask, labels, **extra):
    fast_logits, fast_grads = train_step(fast, input_ids=ids, attention_mask=mask, labels=labels, **extra)
    eager_logits, eager_grads = train_step(eager, input_ids=ids, attention_mask=mask, labels=labels, **extra)
    real = mask.bool()
    assert relative_error(fast_logits[real], eager_logits[real]) < FLOAT32_RTOL
    error, name = worst_gradient_error(fast_grads, eager_grads)
    assert error < FLOAT32_RTOL, f"gradient of {name} differs by {error:.2e}"


PADDINGS = {"right": ["right"] * 3, "left": ["left"] * 3, "mixed": ["left", "right", "left"]}


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("name", list(SUBJECTS))
def test_padded_training_step_matches_the_familys_eager_on_the_whole_model_path(name, padding):
    fast, eager = family_pair(name)
    ids, mask, labels = _batch([11, 5, 8], PADDINGS[padding])
    _assert_training_matches(fast, eager, ids, mask, labels)
    assert last_path() == "whole-model"


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_packed_row_matches_its_sequences_run_alone(name):
    """Position ids that restart mark sequences packed into one row: none attends across a boundary."""
    fast, eager = family_pair(name)
    lengths = [6, 3, 5]
    generator = torch.Generator().manual_seed(3)
    singles = [torch.randint(3, 97, (n,), generator=generator) for n in lengths]
    ids = torch.cat(singles)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in singles])[None]
    fast_logits, fast_grads = train_step(fast, input_ids=ids, position_ids=positions, labels=labels)
    alone_ids, alone_mask, _ = _batch(lengths, ["right"] * 3)
    for row, seq in enumerate(singles):
        alone_ids[row, :len(seq)] = seq
    alone_labels = alone_ids.masked_fill(alone_mask == 0, -100)
    alone_labels[:, 0] = -100
    eager_logits, eager_grads = train_step(eager, input_ids=alone_ids, attention_mask=alone_mask,
                                           labels=alone_labels)
    assert relative_error(fast_logits[0], eager_logits[alone_mask.bool()]) < FLOAT32_RTOL
    error, parameter = worst_gradient_error(fast_grads, eager_grads)
    assert error < FLOAT32_RTOL, f"gradient of {parameter} differs by {error:.2e}"


def _generate(model, ids, mask, cache, new_tokens):
    extra = {} if cache is None else {cache_keyword(model): cache}
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **extra)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(SUBJECTS))
def test_greedy_generation_is_token_identical(name, cache):
    fast, eager = family_pair(name)
    fast.eval(), eager.eval()
    ids, mask, _ = _batch([9, 4, 7], ["left"] * 3, seed=1)
    caches = [None, None] if cache == "dynamic" else \
        [static_cache_or_skip(m.config, max_cache_len=32, batch_size=3) for m in (fast, eager)]
    assert torch.equal(_generate(fast, ids, mask, caches[0], 12), _generate(eager, ids, mask, caches[1], 12))


@pytest.mark.parametrize("padding", ["right", "mixed"])
@pytest.mark.parametrize("name", list(SUBJECTS))
def test_a_sliding_window_shorter_than_the_sequences_is_applied_in_training(name, padding):
    fast, eager = family_pair(name, **WINDOWS[name])
    ids, mask, labels = _batch([64, 23, 40], PADDINGS[padding])
    _assert_training_matches(fast, eager, ids, mask, labels)
    assert last_path() == "per-layer"  # on a CPU only SDPA's mask would apply it to the packed row (the reason says so)


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_a_cache_the_window_would_cut_on_the_packed_row_keeps_the_padding(name):
    """Rows within the window whose packed row is longer than it: the cache a forward returns (use_cache, on by
    default) keeps the window's last tokens of a row, which on the packed row are not each row's own. The forward
    keeps its padding (and says why), and returns eager's cache; without a cache the saving is kept."""
    fast, eager = family_pair(name, **WINDOWS[name])
    ids, mask, labels = _batch([14, 9, 12], ["right", "left", "right"])
    fast.eval(), eager.eval()
    with torch.no_grad():
        out = fast(input_ids=ids, attention_mask=mask)
        reference = eager(input_ids=ids, attention_mask=mask)
    assert last_path() == "per-layer"
    assert "use_cache=False" in unpad_model.last_decision()["reason"]
    real = mask.bool()
    assert relative_error(out.logits[real], reference.logits[real]) < FLOAT32_RTOL
    for mine, theirs in zip(out.past_key_values.layers, reference.past_key_values.layers):
        assert relative_error(mine.keys.transpose(1, 2)[real], theirs.keys.transpose(1, 2)[real]) < FLOAT32_RTOL
    _assert_training_matches(fast, eager, ids, mask, labels)  # (its loss too: logits and loss on the padded layout)
    assert last_path() == "per-layer"
    _assert_training_matches(fast, eager, ids, mask, labels, use_cache=False)
    assert last_path() == "whole-model"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(SUBJECTS))
def test_decoding_past_the_sliding_window_is_token_identical(name, cache):
    fast, eager = family_pair(name, **WINDOWS[name])
    fast.eval(), eager.eval()
    ids, mask, _ = _batch([20, 9, 14], ["left"] * 3, seed=2)  # 20 + 30 new tokens: well past a window of 16
    caches = [None, None] if cache == "dynamic" else \
        [static_cache_or_skip(m.config, max_cache_len=64, batch_size=3) for m in (fast, eager)]
    assert torch.equal(_generate(fast, ids, mask, caches[0], 30), _generate(eager, ids, mask, caches[1], 30))


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_a_cache_filled_past_the_window_answers_like_eager(name):
    """A forward given a cache (the decode-step path) sees the window's keys only, on every cache kind."""
    fast, eager = family_pair(name, **WINDOWS[name])
    fast.eval(), eager.eval()
    ids, mask, _ = _batch([30, 30], ["right"] * 2, seed=4)
    with torch.no_grad():
        logits = []
        for model in (fast, eager):
            cache = {cache_keyword(model): dynamic_cache(model.config)}
            model(input_ids=ids[:, :24], attention_mask=mask[:, :24], use_cache=True, **cache)
            logits.append(model(input_ids=ids[:, 24:], attention_mask=mask, use_cache=True, **cache).logits)
    assert relative_error(logits[0], logits[1]) < FLOAT32_RTOL


def test_flash_attn_applies_a_window_without_a_cache_and_sdpa_serves_every_other_windowed_call():
    """flash-attn's window_size applies transformers' window to unpadded, padded and packed calls; torch's own
    kernels are not yet measured with one, a kv-cache call and a sequence with padding inside it (where
    transformers counts the window in key slots, a varlen kernel in tokens) go to SDPA, which applies it by its
    mask."""
    import dataclasses

    from autoflash.backends import FLASH_ATTN, TORCH
    from autoflash.backends.capability import reasons
    from autoflash.call import AttentionCall

    call = AttentionCall(kind="varlen", device_type="cuda", capability=(9, 0), dtype=torch.bfloat16, head_dim=128,
                         num_heads=32, num_kv_heads=8, q_len=4096, kv_len=4096, dropout=0.0, causal=True,
                         needs_grad=True, window=1024)
    assert "sliding_window=1024 (supported: none yet; served exactly by sdpa's mask)" in \
        TORCH.reasons_not_supported(call)
    assert reasons(FLASH_ATTN.supports, call) == []
    FLASH_ATTN.__dict__["_has_window"] = True  # (as flash-attn >= 2.3 reads; the package is not needed here)
    try:
        assert FLASH_ATTN.own_reasons(call) == []
        assert FLASH_ATTN.own_reasons(dataclasses.replace(call, kind="dense")) == []
        cached = FLASH_ATTN.own_reasons(dataclasses.replace(call, kind="cache", q_len=1, needs_grad=False))
        assert any("with a kv cache" in r for r in cached)
        assert any("padding inside it" in r for r in FLASH_ATTN.own_reasons(dataclasses.replace(call, holes=True)))
    finally:
        del FLASH_ATTN.__dict__["_has_window"]
    choice = dispatch.describe_choice(call)
    assert choice["backend"] in ("sdpa", "flash_attn") and "sliding_window=1024" in choice["call"]


def test_a_padded_row_with_padding_inside_a_sequence_is_planned_as_holed():
    from autoflash.layout import plan_without_cache

    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert plan_without_cache(mask, None, 2, 5, torch.device("cpu")).holes
    ends_only = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert not plan_without_cache(ends_only, None, 2, 5, torch.device("cpu")).holes
    # padding between two packed sequences (positions restart) is a boundary, not a hole
    packed = torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([[0, 1, 0, 0, 1]])
    assert not plan_without_cache(packed, positions, 1, 5, torch.device("cpu")).holes


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_left_alone_where_its_era_is_not_served(name):
    """In an era that does not serve the family, its models are what transformers alone makes of them."""
    config_class, model_class = _classes_or_skip(name)
    if patch_era() in families.BY_NAME[name].eras:
        pytest.skip(f"{name} is served in the {patch_era()} era (the other tests here cover it)")
    import importlib

    importlib.import_module(families.BY_NAME[name].module)
    model = model_class(config_class(**{**TINY, **SUBJECTS[name][2]}))
    assert model.config._attn_implementation in ("sdpa", "eager")
    assert hooks.families()[name].startswith("not patched: ")


def test_disable_restores_every_familys_originals_and_enable_patches_them_again():
    import importlib

    modules = {}
    for name in SUBJECTS:
        _classes_or_skip(name)
        _served_or_skip(name)
        modules[name] = importlib.import_module(families.BY_NAME[name].module)
    assert autoflash.enable()
    family_of = families.BY_NAME
    wrapped = {name: family_of[name].cls(module, "Model").forward for name, module in modules.items()}
    autoflash.disable()
    try:
        for name, module in modules.items():
            assert family_of[name].cls(module, "Model").forward is wrapped[name].__wrapped__
            base = family_of[name].cls(module, "PreTrainedModel")
            assert "_check_and_adjust_attn_implementation" not in base.__dict__
        from transformers.modeling_utils import AttentionInterface

        assert "autoattn" not in AttentionInterface._global_mapping
        assert hooks.patched_modules() == []
    finally:
        assert autoflash.enable()
    assert all(hooks.families()[name].startswith("patched") for name in modules)


def test_families_variable_narrows_what_is_patched():
    from _subprocess import run_python

    _classes_or_skip("qwen2")
    result = run_python("""
        import json
        import transformers.models.llama.modeling_llama, transformers.models.qwen2.modeling_qwen2
        from transformers import Qwen2Config, Qwen2ForCausalLM
        import autoflash
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        print(json.dumps([model.config._attn_implementation, autoflash.status()["families"]]))
    """, env={"AUTOFLASH_FAMILIES": "llama"})
    import json

    attention, states = json.loads(result.stdout.strip().splitlines()[-1])
    assert attention == "sdpa"
    assert states["qwen2"] == "not patched: left out by AUTOFLASH_FAMILIES"
    assert states["llama"].startswith("patched")


def test_importing_every_family_module_says_nothing_at_warning_level():
    """Served or left alone for its release, no family module makes autoflash speak on import."""
    from _subprocess import autoflash_lines, run_python

    result = run_python("""
        import importlib, json
        import autoflash
        from autoflash import families
        for family in families.FAMILIES:
            try:
                importlib.import_module(family.module)
            except ImportError:
                pass  # a family this transformers release does not have
        print(json.dumps(autoflash.status()["families"]))
    """)
    assert autoflash_lines(result.stderr) == []
    import json

    states = json.loads(result.stdout.strip().splitlines()[-1])
    assert states["llama"].startswith("patched")
    assert all(s.startswith(("patched", "not patched: ", "watched")) for s in states.values()), states


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_a_fullgraph_compiled_padded_forward_with_a_window_matches_eager(name):
    """Traced, the window is a field of the call record fixed at trace time, and the padding a mask."""
    fast, eager = family_pair(name, **{**WINDOWS[name], "sliding_window": 4})
    if patch_era() != families.INTERFACE_ERA:
        pytest.skip("traced calls are covered on transformers >= ~4.56 (see test_tracing.py)")
    ids, mask, _ = _batch([12, 5, 9], ["left", "right", "left"], seed=6)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(fast.eval().forward, fullgraph=True, backend="eager")(input_ids=ids,
                                                                                       attention_mask=mask)
            reference = eager.eval()(input_ids=ids, attention_mask=mask)
    finally:
        torch._dynamo.reset()
    real = mask.bool()
    assert relative_error(out.logits[real], reference.logits[real]) < FLOAT32_RTOL
