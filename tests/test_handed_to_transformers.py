"""A call autoflash does not fully understand is computed by transformers' own attention, exactly as transformers
alone computes it, and recorded: never approximated, never refused where transformers alone answers.

Each case is judged against transformers' own function for what the model asked for (its sdpa; eager where sdpa
cannot compute the call) in float32 on CPU, at real positions.
"""

from __future__ import annotations

import copy
import json
import inspect
import types

import pytest
import torch
from conftest import FLOAT32_RTOL, modern_era, padding_mask, relative_error, tiny_config

from _subprocess import run_python
from autoflash import handover

modern_only = pytest.mark.skipif(not modern_era(), reason="this transformers has no attention-function registry")


def _has_continuous_batching() -> bool:
    """transformers 5.20+: the manager switches the model's attention itself, configured by its own config
    (4.5x's first continuous batching asked the user to load a paged implementation)."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
    except ImportError:
        return False
    return hasattr(ContinuousBatchingManager, "switch_to_cb_friendly_attn")


continuous_batching_only = pytest.mark.skipif(not _has_continuous_batching(),
                                              reason="continuous batching that switches attention itself: 5.20+")


def _records(what: str):
    return [r for r in handover.handed_over() if what in r["call"]]


def _with_transformers_sdpa(model):
    """A copy of ``model`` on transformers' own sdpa (autoflash's request hook stepped aside)."""
    reference = copy.deepcopy(model)
    with handover.passing_through():
        reference.set_attn_implementation("sdpa")
    assert reference.config._attn_implementation == "sdpa"
    return reference


@modern_only
def test_a_keyword_autoflash_does_not_read_goes_to_transformers_sdpa():
    """A release that hands attention a new argument gets transformers' answer for it, not autoflash's guess."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    assert model.config._attn_implementation == handover.ATTENTION_NAME
    reference = _with_transformers_sdpa(model)
    mask = padding_mask([9, 4, 7], "left")
    ids = torch.randint(3, 97, mask.shape)
    flag = torch.ones(())  # transformers' decoder passes keyword arguments it does not know on to attention
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, a_future_argument=flag).logits
        ref = reference(input_ids=ids, attention_mask=mask, a_future_argument=flag).logits
    real = mask.bool()
    assert relative_error(out[real], ref[real]) < FLOAT32_RTOL
    [record] = _records("a_future_argument")
    assert record["to"] == "transformers' sdpa" and record["count"] >= 2  # once per layer
    assert record["asked_for"] == "(transformers' default)"


@modern_only
def test_known_keywords_stay_with_autoflash():
    assert handover.why_not_mine({"position_ids": torch.zeros(1), "use_cache": True, "sliding_window": None}, None) \
        is None
    assert handover.why_not_mine({"unread": None, "another": False}, None) is None  # no value: nothing asked


@modern_only
def test_a_4d_mask_goes_to_transformers_sdpa_as_given():
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config()).eval()
    reference = _with_transformers_sdpa(model)
    ids = torch.randint(3, 97, (2, 8))
    # a prefix-LM mask: the first three positions see each other both ways (no causal kernel computes that)
    allowed = torch.ones(8, 8).tril().bool()
    allowed[:3, :3] = True
    mask = torch.zeros(2, 1, 8, 8).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        ref = reference(input_ids=ids, attention_mask=mask).logits
    assert relative_error(out, ref) < FLOAT32_RTOL
    assert _records("4-D attention mask")


def test_a_paged_call_without_its_mask_is_refused_never_approximated():
    from autoflash.attention import attention_forward

    module = types.SimpleNamespace(is_causal=True, config=None, training=False)
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(handover.NotHandedOver, match="paged cache.*attn_implementation='sdpa'"):
        attention_forward(module, q, k, k.clone(), None, read_index=[torch.arange(9)],
                          write_index=[torch.arange(5)], cu_seq_lens_q=torch.tensor([0, 5]))


@modern_only
def test_the_request_is_kept_and_flash_attention_2_without_flash_attn_hands_back_sdpa():
    import importlib.util

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM._from_config(tiny_config(), attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == handover.ATTENTION_NAME
    assert handover.request_of(model.config) == "flash_attention_2"
    installed = importlib.util.find_spec("flash_attn") is not None
    assert handover.transformers_choice(model.config) == ("flash_attention_2" if installed else "sdpa")
    # nothing is stored on the config itself: it is saved with the model
    assert not any("autoflash" in key for key in model.config.to_dict())


_CONTINUOUS_BATCHING = """
    import json, sys, torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    dtype = getattr(torch, sys.argv[1])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(dtype).eval()
    before = model.config._attn_implementation
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (5, 23, 9, 40, 3, 17, 31, 12)]
    generation = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # fewer tokens per batch than the prompts hold together: requests wait, join and leave
    batching = ContinuousBatchingConfig(max_batch_tokens=48, max_requests_per_batch=3, num_blocks=64, block_size=16)
    outputs = model.generate_batch(inputs=prompts, generation_config=generation,
                                   continuous_batching_config=batching)
    by_prompt = {tuple(o.prompt_ids): o.generated_tokens for o in outputs.values()}
    same = [by_prompt[tuple(p)] == model.generate(torch.tensor([p]), generation_config=generation)[0, len(p):].tolist()
            for p in prompts]
    import autoflash  # only now, to read the record: the model above got autoflash through the .pth

    print(json.dumps({"before": before, "after": model.config._attn_implementation, "same": same,
                      "handed_over": autoflash.status()["handed_over"]}))
"""


@continuous_batching_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_continuous_batching_gives_each_request_its_generate_tokens(dtype):
    """Through the .pth, as a user runs it: every request's tokens equal its own generate() tokens; the model
    runs autoflash before and after, and the hand-over is recorded."""
    result = _run_continuous_batching(dtype)
    assert result["before"] == result["after"] == handover.ATTENTION_NAME
    assert all(result["same"]), result["same"]
    [record] = [r for r in result["handed_over"] if "continuous batching" in r["call"]]
    assert record["to"] == "transformers' sdpa for the whole model"


def _run_continuous_batching(dtype: str) -> dict:
    import json
    import sys
    import textwrap

    code = textwrap.dedent(_CONTINUOUS_BATCHING).replace("sys.argv[1]", repr(dtype))
    out = run_python(code, env={"HF_HUB_OFFLINE": "1"}, timeout=600, python=sys.executable)
    return json.loads(out.stdout.strip().splitlines()[-1])


@modern_only
def test_context_parallelism_passes_the_trainers_check(tmp_path):
    """The Trainer refuses context parallelism unless the model says sdpa: while it is on, the model runs
    transformers' sdpa (torch's context parallelism serves SDPA calls on a shard of the sequence)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    trainer_module = pytest.importorskip("transformers.trainer")
    if not hasattr(trainer_module.Trainer, "_prepare_context_parallel_inputs"):
        pytest.skip("this transformers has no context parallelism in its Trainer")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_config())
    assert model.config._attn_implementation == handover.ATTENTION_NAME
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args)
    # what the Trainer reads of an Accelerator set up for context parallelism (a real one needs two GPU ranks)
    trainer.accelerator = types.SimpleNamespace(
        parallelism_config=types.SimpleNamespace(cp_enabled=True, cp_backend="torch"),
        maybe_context_parallel=trainer.accelerator.maybe_context_parallel)
    ids = torch.randint(3, 97, (1, 8))
    trainer._prepare_context_parallel_inputs(model, {"input_ids": ids, "labels": ids})  # raised before
    assert model.config._attn_implementation == "sdpa"
    assert _records("context parallelism")[0]["to"] == "transformers' sdpa for the whole model"


@continuous_batching_only
def test_the_managers_own_switch_to_flash_attention_reaches_transformers(monkeypatch):
    """On a GPU with flash-attn, continuous batching switches a half-precision model to flash_attention_2, as
    it does without autoflash: that request is the manager's, and must not come back as autoattn (it did: every
    request's tokens were wrong on the H200)."""
    from transformers import LlamaForCausalLM
    from transformers.generation.continuous_batching import continuous_api

    model = LlamaForCausalLM(tiny_config()).to(torch.bfloat16)
    seen = []

    def set_attn_implementation(self, name):  # what the manager asks for, and whether autoflash steps aside
        seen.append((name, handover.is_passing_through()))
        self.config._attn_implementation = name

    monkeypatch.setattr(type(model), "set_attn_implementation", set_attn_implementation)
    monkeypatch.setattr(continuous_api, "is_flash_attn_3_available", lambda **_: False)
    monkeypatch.setattr(continuous_api, "is_flash_attn_2_available", lambda **_: True)
    manager = types.SimpleNamespace(_original_attn_impl=None)
    switch = continuous_api.ContinuousBatchingManager.switch_to_cb_friendly_attn
    # 5.2x's manager takes auto_switch_to_flash; earlier ones always switch
    takes_flag = "auto_switch_to_flash" in inspect.signature(switch.__wrapped__).parameters
    switch(manager, model, True) if takes_flag else switch(manager, model)
    # given back as transformers' sdpa, then switched to flash attention by the manager (5.17 names it
    # "paged|flash_attention_2"), both reaching transformers as asked
    assert [name for name, _ in seen][0] == "sdpa" and seen[1][0].endswith("flash_attention_2")
    assert all(passing for _, passing in seen), seen
    assert model.config._attn_implementation == seen[1][0]
    assert manager._original_attn_impl == handover.ATTENTION_NAME  # what the manager restores when it stops


@modern_only
def test_a_config_that_asks_for_attention_weights_gets_eagers_weights():
    """output_attentions set on the config, not passed to the call: still eager's weights, never none."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(2)
    model = LlamaForCausalLM(tiny_config(output_attentions=True)).eval()
    eager = copy.deepcopy(model)
    with handover.passing_through():
        eager.set_attn_implementation("eager")
    ids = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        out, ref = model(input_ids=ids), eager(input_ids=ids)
    assert out.attentions is not None and len(out.attentions) == len(ref.attentions)
    for weights, expected in zip(out.attentions, ref.attentions):
        assert relative_error(weights, expected) < FLOAT32_RTOL


def test_chunked_attention_asked_for_explicitly_equals_eager_through_transformers_own_mask():
    """Llama 4 states its chunks only through the mask function transformers hands the mask interface: a model
    that asks for autoattn in a fresh process gets transformers' own mask and attention, exactly, recorded."""
    if not modern_era():
        pytest.skip("the mask interface exists from transformers 4.53 (Llama 4 from 4.51)")
    result = run_python("""
        import copy, json, torch
        import transformers
        if not hasattr(transformers, "Llama4ForCausalLM"):
            print(json.dumps(None)); raise SystemExit
        from transformers import Llama4ForCausalLM, Llama4TextConfig
        import autoflash
        config = Llama4TextConfig(vocab_size=100, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  attention_chunk_size=4, num_local_experts=2, num_experts_per_tok=1,
                                  interleave_moe_layer_step=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        eager_config = copy.deepcopy(config)
        eager_config._attn_implementation = "eager"
        eager = Llama4ForCausalLM(eager_config).eval()
        asked = Llama4ForCausalLM._from_config(copy.deepcopy(config), attn_implementation="autoattn").eval()
        asked.load_state_dict(eager.state_dict())
        ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        with torch.no_grad():
            errors = [((asked(ids, attention_mask=m).logits - eager(ids, attention_mask=m).logits)[m.bool()].abs().max()
                       / eager(ids, attention_mask=m).logits.abs().max()).item() for m in (torch.ones_like(ids), mask)]
        print(json.dumps({"implementation": asked.config._attn_implementation, "errors": errors,
                          "handed_over": [r["call"] for r in autoflash.status()["handed_over"]]}))
    """)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report is None:
        pytest.skip("this transformers has no Llama 4")
    assert report["implementation"] == handover.ATTENTION_NAME
    assert max(report["errors"]) < FLOAT32_RTOL, report
    assert any(call.startswith("chunked attention (attention_chunk_size=4") for call in report["handed_over"])


def test_a_mask_pattern_autoflash_does_not_compute_is_named_and_the_ones_it_computes_are_not():
    masking_utils = pytest.importorskip("transformers.masking_utils")
    if not hasattr(masking_utils, "and_masks"):
        pytest.skip("this transformers describes masks without mask functions")
    causal = masking_utils.causal_mask_function
    window = masking_utils.sliding_window_causal_mask_function(4)
    packed = masking_utils.and_masks(causal, masking_utils.packed_sequence_mask_function(torch.zeros(1, 8)))
    family = types.SimpleNamespace(model_type="llama")  # its attention layers are handed the position ids
    for understood in (None, causal, window, packed):
        assert handover.why_mask_not_mine(understood, family, 8) is None
    # another decoder's attention may not be handed them (Persimmon's consumes them): packing goes to transformers
    other = types.SimpleNamespace(model_type="persimmon")
    assert handover.why_mask_not_mine(causal, other, 8) is None
    assert handover.why_mask_not_mine(packed, other, 8) == handover.UNSEEN_PACKING
    image_tokens = masking_utils.or_masks(causal, lambda b, h, q, kv: q == kv)  # a VLM's bidirectional image block
    assert handover.why_mask_not_mine(image_tokens, None, 8).startswith("a mask pattern autoflash does not compute")
    hidden = masking_utils.and_masks(image_tokens, masking_utils.packed_sequence_mask_function(torch.zeros(1, 8)))
    assert handover.why_mask_not_mine(hidden, None, 8) is not None  # however deep in the composition
    if hasattr(masking_utils, "chunked_causal_mask_function"):
        chunked = masking_utils.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
        assert handover.why_mask_not_mine(chunked, None, 8) is not None
    chunky = types.SimpleNamespace(attention_chunk_size=4)
    assert handover.why_mask_not_mine(causal, chunky, 8).startswith("chunked attention")
    assert handover.why_mask_not_mine(causal, chunky, 4) is None  # a chunk no key reaches past changes nothing
