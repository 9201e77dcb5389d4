"""A padded batch costs what its real tokens cost: padding removed once for the whole model.

float32 on CPU against transformers' eager attention (same weights): real-position logits,
hidden states, every parameter gradient within FLOAT32_RTOL, the loss within LOSS_RTOL;
padded positions hold zeros. Each fallback condition takes the per-layer path, asserted by
the path autoflash records and by the shape the first decoder layer sees.
"""

from pathlib import Path

import pytest
import torch

from _subprocess import run_python
from conftest import (FLOAT32_RTOL, dynamic_cache, labels_for, last_path, model_pair, padding_mask, relative_error,
                      tiny_config, whole_model_padding_removal, worst_gradient_error)

LOSS_RTOL = 1e-6


def _mask(lengths, sides):
    """One row per length; sides[i] says where row i's padding goes (a row of full length has none)."""
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, (n, side) in enumerate(zip(lengths, sides)):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n:] = 1
    return mask


CASES = {
    "right": ([7, 3, 1, 12], ["right"] * 4),
    "left": ([7, 3, 1, 12], ["left"] * 4),
    "mixed": ([9, 1, 4, 6, 2], ["left", "right", "right", "left", "left"]),
}


def _layer_inputs(model):
    """Shapes of what the first decoder layer receives, appended per forward."""
    shapes = []
    decoder = getattr(model, "model", model)  # a causal LM's decoder, or the decoder itself
    decoder.layers[0].register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))
    return shapes


def _step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, output_hidden_states=True)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_equal_at_real_positions(out, ref, real):
    assert relative_error(out.loss, ref.loss) < LOSS_RTOL, (out.loss.item(), ref.loss.item())
    assert relative_error(out.logits[real], ref.logits[real]) < FLOAT32_RTOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert relative_error(mine[real], theirs[real]) < FLOAT32_RTOL
        assert not mine[~real].any()  # padded positions hold zeros


def _assert_step_matches_eager(fast, eager, mask, ids=None, labels=None):
    """One forward + backward of each on the same batch: the whole-model path ran, and the loss,
    real-position outputs and every gradient equal eager's."""
    ids = torch.randint(3, 97, mask.shape) if ids is None else ids
    labels = labels_for(ids, mask) if labels is None else labels
    out, grads = _step(fast, input_ids=ids, attention_mask=mask, labels=labels)
    ref, ref_grads = _step(eager, input_ids=ids, attention_mask=mask, labels=labels)
    assert last_path() == "whole-model"
    _assert_equal_at_real_positions(out, ref, mask.bool())
    error, name = worst_gradient_error(grads, ref_grads)
    assert error < FLOAT32_RTOL, f"gradient of {name} differs by {error:.2e}"
    return grads


@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_matches_eager_with_whole_model_removal(case):
    lengths, sides = CASES[case]
    fast, eager = model_pair(seed=len(lengths))
    mask = _mask(lengths, sides)
    ids = torch.randint(3, 97, mask.shape)
    labels = labels_for(ids, mask)
    labels[0, -2] = -100  # an ignored label inside the real tokens
    shapes = _layer_inputs(fast)
    _assert_step_matches_eager(fast, eager, mask, ids, labels)
    assert shapes == [(1, sum(lengths), 64)]  # the layers saw the real tokens only


def test_loss_normalised_by_num_items_in_batch_matches_eager():
    import inspect

    fast, eager = model_pair(seed=5)
    if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(type(eager).forward).parameters.values()):
        pytest.skip("this transformers release's LlamaForCausalLM takes no num_items_in_batch (< 4.46)")
    mask = _mask([8, 5, 2], ["right", "left", "right"])
    ids = torch.randint(3, 97, mask.shape)
    labels = labels_for(ids, mask)
    items = torch.tensor(37)  # what the Trainer passes under gradient accumulation
    out = fast(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
    ref = eager(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
    assert last_path() == "whole-model"
    assert relative_error(out.loss, ref.loss) < LOSS_RTOL


def test_forward_with_labels_never_allocates_padded_logits():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    vocab = 4096  # large enough that [batch, padded_len, vocab] dwarfs every other tensor
    fast, eager = model_pair(seed=6, vocab_size=vocab)
    mask = _mask([24, 5, 9, 3], ["right", "right", "left", "left"])
    ids = torch.randint(3, vocab, mask.shape)
    padded_logits = mask.numel() * vocab
    for model, expect_padded in ((eager, True), (fast, False)):
        Largest.numel = 0
        with Largest():
            out = model(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
            out.loss.backward()
        # eager shows the measure can fail; autoflash's largest tensor is the real tokens' logits
        assert (Largest.numel >= padded_logits) == expect_padded, (Largest.numel, padded_logits)
    assert last_path() == "whole-model"
    assert out.logits.shape == (4, 24, vocab)  # built on first use, not before


def test_padded_logits_are_built_on_first_use_whichever_way_they_are_read():
    fast, eager = model_pair(seed=7)
    mask = _mask([6, 3], ["left", "right"])
    ids = torch.randint(3, 97, mask.shape)
    labels = labels_for(ids, mask)
    ref = eager(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    real = mask.bool()
    readers = {"attribute": lambda o: o.logits, "key": lambda o: o["logits"], "index": lambda o: o[1],
               "to_tuple": lambda o: o.to_tuple()[1], "items": lambda o: dict(o.items())["logits"]}
    for name, read in readers.items():
        out = fast(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        assert list(out.keys()) == list(ref.keys()), name
        logits = read(out)
        assert logits.shape == ref.logits.shape, name
        assert relative_error(logits[real], ref.logits[real]) < FLOAT32_RTOL, name
        assert not logits[~real].any(), name


def test_scoring_forward_returns_eagers_cache_in_padded_form_and_decoding_goes_on_from_it():
    fast, eager = model_pair(seed=8)
    fast.eval(), eager.eval()
    mask = padding_mask([7, 2, 5], "left")
    ids = torch.randint(3, 97, mask.shape)
    shapes = _layer_inputs(fast)
    with torch.no_grad():
        out = fast(input_ids=ids, attention_mask=mask)  # use_cache is on by default
        ref = eager(input_ids=ids, attention_mask=mask)
    assert last_path() == "whole-model" and shapes == [(1, 14, 64)]
    cache, ref_cache = _cache(out), _cache(ref)
    assert type(cache) is type(ref_cache)  # legacy tuples where eager returns them (transformers 4.4x)
    real = mask.bool()
    for layer in range(2):
        for mine, theirs in zip(_layer_kv(cache, layer), _layer_kv(ref_cache, layer)):
            assert mine.shape == theirs.shape
            assert relative_error(mine.transpose(1, 2)[real], theirs.transpose(1, 2)[real]) < FLOAT32_RTOL
    step = torch.randint(3, 97, (3, 1))
    longer = torch.cat([mask, torch.ones_like(step)], dim=1)
    with torch.no_grad():
        nxt = fast(input_ids=step, attention_mask=longer, **_cache_kwarg(fast, cache))
        ref_nxt = eager(input_ids=step, attention_mask=longer, **_cache_kwarg(eager, ref_cache))
    assert relative_error(nxt.logits, ref_nxt.logits) < FLOAT32_RTOL


def _cache(out):
    return out["cache"] if "cache" in out.keys() else out["past_key_values"]


def _cache_kwarg(model, cache):
    from conftest import cache_keyword

    return {"cache" if cache_keyword(model) == "cache" else "past_key_values": cache}


def _layer_kv(cache, layer):
    if isinstance(cache, tuple):
        return cache[layer]
    if getattr(cache, "layers", None) is not None:
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def test_gradient_checkpointing_matches_eager():
    fast, eager = model_pair(seed=9)
    fast.gradient_checkpointing_enable(), eager.gradient_checkpointing_enable()
    mask = _mask([9, 4, 1], ["left", "right", "left"])
    _assert_step_matches_eager(fast, eager, mask)


def test_peft_lora_model_matches_eager():
    peft = pytest.importorskip("peft")
    fast, eager = model_pair(seed=10)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
                lora_dropout=0.0)
    torch.manual_seed(0)
    fast = peft.get_peft_model(fast, peft.LoraConfig(**lora))
    torch.manual_seed(0)
    eager = peft.get_peft_model(eager, peft.LoraConfig(**lora))
    # LoRA's B starts at zero, which would hide the adapters from the comparison
    for model in (fast, eager):
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    mask = _mask([10, 3, 6], ["right", "left", "left"])
    grads = _assert_step_matches_eager(fast, eager, mask)
    assert grads and all("lora_" in n for n in grads)


_TRAINER_STEP = """
import sys, torch
from transformers import LlamaForCausalLM, Trainer, TrainingArguments


def sgd_update(model, rows, out):
    # SGD: the update is the (clipped) gradient itself; Adam's first step, g / sqrt(g^2), would magnify
    # float32 rounding of near-zero gradients
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                             optim="sgd", bf16=False, fp16=False, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, dataloader_drop_last=False,
                             remove_unused_columns=False, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows).train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}
"""


def test_one_trainer_step_updates_weights_as_eager(tmp_path):
    """One Trainer SGD step takes the whole-model path and updates every weight as eager does: within
    FLOAT32_RTOL, or no further than twice transformers' own sdpa lands on the same step (run in a fresh
    process with autoflash off). A float32 update that passes through two layers' backward and the
    gradient clipping carries the rounding of the attention kernel's summation order: transformers' sdpa,
    an exact kernel, lands 0.9-4.9e-5 from eager on this batch over seeds 1-5 and 11."""
    pytest.importorskip("accelerate")
    namespace = {}
    exec(_TRAINER_STEP, namespace)
    fast, eager = model_pair(seed=11)
    mask = _mask([12, 5, 8, 2], ["right", "left", "right", "left"])
    ids = torch.randint(3, 97, mask.shape)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels_for(ids, mask)[i]} for i in range(4)]
    torch.save({"state": eager.state_dict(), "rows": rows}, tmp_path / "case.pt")
    updates = [namespace["sgd_update"](model, rows, str(tmp_path / name)) for model, name in ((fast, "fast"),
                                                                                             (eager, "eager"))]
    assert last_path() == "whole-model"
    error, name = worst_gradient_error(updates[0], updates[1])

    floor = run_python(_TRAINER_STEP + f"""
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import tiny_config, worst_gradient_error
case = torch.load({str(tmp_path / "case.pt")!r})
updates = []
for implementation in ("sdpa", "eager"):
    config = tiny_config()
    config._attn_implementation = implementation
    model = LlamaForCausalLM(config)
    model.load_state_dict(case["state"])
    assert model.config._attn_implementation == implementation
    updates.append(sgd_update(model, case["rows"], {str(tmp_path)!r} + "/" + implementation))
print(worst_gradient_error(*updates)[0])
""", env={"AUTOFLASH_DISABLE": "1"})
    sdpa_error = float(floor.stdout.strip().splitlines()[-1])
    assert error < FLOAT32_RTOL or error <= 2 * sdpa_error, (
        f"update of {name} differs from eager's by {error:.2e} (transformers' own sdpa: {sdpa_error:.2e})")


def _padded_batch(seed=12):
    fast, eager = model_pair(seed=seed)
    mask = _mask([8, 3, 5], ["left", "right", "left"])
    ids = torch.randint(3, 97, mask.shape)
    return fast, eager, mask, ids


def _assert_per_layer(shapes, batch, width, reason_part):
    from autoflash import unpad_model

    decision = unpad_model.last_decision()
    assert decision["path"] == "per-layer" and reason_part in decision["reason"], decision
    assert shapes[0] == (batch, width, 64)  # the layers ran on the padded batch


def test_a_label_predicted_from_padding_gets_logits_and_loss_over_the_padded_layout():
    """Such a target has no real token to come from: transformers' own LM head and loss count it, over the
    padded hidden states (zeros at padding, as on every path), while the layers still run on the packed row.
    The loss is the one the per-layer path gives."""
    fast, eager, mask, ids = _padded_batch()
    shapes = _layer_inputs(fast)
    labels = ids.masked_fill(mask == 0, -100)  # the first real token of each left-padded row still counts
    out = fast(input_ids=ids, attention_mask=mask, labels=labels)
    assert last_path() == "whole-model" and shapes[0] == (1, 16, 64)  # 8 + 3 + 5 real tokens
    assert out.logits.shape == (3, 8, 97)
    with whole_model_padding_removal(False):
        per_layer = fast(input_ids=ids, attention_mask=mask, labels=labels)
    assert shapes[1] == (3, 8, 64)
    assert abs(out.loss.item() - per_layer.loss.item()) <= FLOAT32_RTOL * abs(per_layer.loss.item())
    assert relative_error(out.logits, per_layer.logits) < FLOAT32_RTOL


def test_a_cache_passed_in_takes_the_per_layer_path():
    fast, eager, mask, ids = _padded_batch()
    fast.eval()
    shapes = _layer_inputs(fast)
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask, **_cache_kwarg(fast, dynamic_cache(fast.config)))
    _assert_per_layer(shapes, 3, 8, "KV cache was passed in")


def test_generate_keeps_the_padded_layout():
    fast, eager, mask, ids = _padded_batch()
    fast.eval()
    shapes = _layer_inputs(fast)
    fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert shapes[0] == (3, 8, 64)
    assert last_path() == "per-layer"


def test_a_4d_mask_takes_the_per_layer_path():
    fast, eager, mask, ids = _padded_batch()
    shapes = _layer_inputs(fast)
    allowed = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    fast.model(input_ids=ids, attention_mask=additive)
    _assert_per_layer(shapes, 3, 8, "not a 2-D key-padding mask")


def test_output_attentions_takes_the_per_layer_path():
    fast, eager, mask, ids = _padded_batch()
    fast.eval()
    shapes = _layer_inputs(fast)
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask, output_attentions=True)
    _assert_per_layer(shapes, 3, 8, "output_attentions")


def test_an_unknown_causal_lm_subclass_runs_its_own_forward_on_the_padded_layout():
    """Its own code may read the padded layout: it gets transformers' forward, LM head and loss, equal to
    eager's; the decoder inside it, a class autoflash knows, still runs on the packed row."""
    from transformers import LlamaForCausalLM

    class ChattyLlama(LlamaForCausalLM):
        pass

    _, eager, mask, ids = _padded_batch()
    model = ChattyLlama(tiny_config())
    model.load_state_dict(eager.state_dict())
    shapes = _layer_inputs(model)
    labels = labels_for(ids, mask)
    out, reference = model(input_ids=ids, attention_mask=mask, labels=labels), \
        eager(input_ids=ids, attention_mask=mask, labels=labels)
    assert type(out).__name__ == "CausalLMOutputWithPast" and not hasattr(out, "_autoflash_build_logits")
    assert abs(out.loss.item() - reference.loss.item()) <= FLOAT32_RTOL * abs(reference.loss.item())
    assert relative_error(out.logits[mask.bool()], reference.logits[mask.bool()]) < FLOAT32_RTOL
    assert last_path() == "whole-model" and shapes[0] == (1, 16, 64)


def test_an_unknown_decoder_subclass_takes_the_per_layer_path():
    from transformers import LlamaModel

    class ChattyDecoder(LlamaModel):
        pass

    _, eager, mask, ids = _padded_batch()
    decoder = ChattyDecoder(tiny_config())
    shapes = _layer_inputs(decoder)
    decoder(input_ids=ids, attention_mask=mask)
    _assert_per_layer(shapes, 3, 8, "ChattyDecoder")


def test_switch_off_keeps_only_the_per_layer_path_and_doctor_says_so():
    import autoflash
    from autoflash import doctor

    fast, eager, mask, ids = _padded_batch()
    shapes = _layer_inputs(fast)
    with whole_model_padding_removal(False):
        fast(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
        _assert_per_layer(shapes, 3, 8, "AUTOFLASH_UNPAD_MODEL=0")
        assert autoflash.status()["settings"]["AUTOFLASH_UNPAD_MODEL"] is False
        assert autoflash.status()["padding_removal"] == {
            "whole_model": False, "last": {"path": "per-layer", "reason": "AUTOFLASH_UNPAD_MODEL=0",
                                           "lm_head_and_loss": {"on": "padded layout",
                                                                "reason": "AUTOFLASH_UNPAD_MODEL=0"}}}
        assert "per layer only (AUTOFLASH_UNPAD_MODEL=0)" in doctor.report(doctor.status())
    assert autoflash.status()["settings"]["AUTOFLASH_UNPAD_MODEL"] is True


def test_packed_rows_without_padding_need_no_removal():
    fast, eager, _, _ = _padded_batch()
    ids = torch.randint(3, 97, (1, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    shapes = _layer_inputs(fast)
    out = fast(input_ids=ids, position_ids=positions, labels=ids)
    assert shapes == [(1, 12, 64)] and torch.isfinite(out.loss)


def test_torch_compile_traces_the_whole_layer_stack_without_a_break_per_layer():
    import torch._dynamo

    from conftest import legacy_era

    if legacy_era():
        pytest.skip("transformers < 4.48: the packed row reaches attention without keyword arguments")
    mask = _mask([9, 4, 1, 6], ["left", "right", "left", "right"])
    ids = torch.randint(3, 97, mask.shape)
    labels = labels_for(ids, mask)
    graphs = {}
    for layers in (2, 4):
        torch._dynamo.reset()
        fast, eager = model_pair(seed=13, num_hidden_layers=layers)
        explanation = torch._dynamo.explain(fast)(input_ids=ids, attention_mask=mask, labels=labels)
        graphs[layers] = explanation.graph_count
    # the breaks that remain are per forward (the plan's host sync, the mask function, the output)
    assert graphs[2] == graphs[4], graphs
    torch._dynamo.reset()
    out = torch.compile(fast, backend="eager")(input_ids=ids, attention_mask=mask, labels=labels)
    ref = eager(input_ids=ids, attention_mask=mask, labels=labels)
    assert last_path() == "whole-model"
    assert relative_error(out.loss, ref.loss) < LOSS_RTOL
    torch._dynamo.reset()


def test_a_compiled_padded_training_forward_breaks_only_at_the_plans_host_sync():
    """The plan's host sync (removing padding makes shapes depend on the data) is the one place a plainly
    compiled padded forward with labels leaves the graph: the loss and the output with its padded logits
    built on first read are traced too."""
    import torch._dynamo

    from conftest import legacy_era

    if legacy_era():
        pytest.skip("transformers < 4.48: the packed row reaches attention without keyword arguments")
    mask = _mask([9, 4, 1, 6], ["left", "right", "left", "right"])
    ids = torch.randint(3, 97, mask.shape)
    labels = labels_for(ids, mask)
    fast, eager = model_pair(seed=13)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fast)(input_ids=ids, attention_mask=mask, labels=labels)
    where = {(r.user_stack[-1].filename.rsplit("/", 1)[-1], r.user_stack[-1].name) for r in explanation.break_reasons}
    assert where == {("layout.py", "plan_without_cache")}, [str(r.reason)[:80] for r in explanation.break_reasons]
    torch._dynamo.reset()
    out = torch.compile(fast, backend="eager")(input_ids=ids, attention_mask=mask, labels=labels)
    ref = eager(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert last_path() == "whole-model"
    assert relative_error(out.loss, ref.loss) < LOSS_RTOL
    assert relative_error(out.logits[real], ref.logits[real]) < LOSS_RTOL and not out.logits[~real].any()
    torch._dynamo.reset()


def test_rotary_embedding_is_sized_by_the_padded_batch_not_the_packed_row():
    # Dynamic NTK scaling changes the rotary base once the longest position passes
    # max_position_embeddings: here the batch is 30 wide but its real tokens, packed, are 75.
    # (transformers 4.37 sizes its rotary cache by the key length it is given.)
    fast, eager = model_pair(seed=14, max_position_embeddings=32, rope_scaling={"type": "dynamic", "factor": 2.0})
    mask = _mask([30, 20, 25], ["left", "right", "left"])
    _assert_step_matches_eager(fast, eager, mask)


def test_inputs_embeds_instead_of_ids_matches_eager():
    # InternVL and other multimodal wrappers hand the language model embeddings, not ids
    fast, eager = model_pair(seed=15)
    mask = _mask([7, 2, 5], ["left", "right", "left"])
    ids = torch.randint(3, 97, mask.shape)
    labels = labels_for(ids, mask)
    results = []
    for model in (fast, eager):
        embeds = model.get_input_embeddings()(ids)
        results.append(_step(model, inputs_embeds=embeds, attention_mask=mask, labels=labels))
        if model is fast:
            assert last_path() == "whole-model"
    (out, grads), (ref, ref_grads) = results
    _assert_equal_at_real_positions(out, ref, mask.bool())
    error, name = worst_gradient_error(grads, ref_grads)
    assert error < FLOAT32_RTOL, f"gradient of {name} differs by {error:.2e}"


def test_return_dict_off_in_the_config_keeps_the_saving_and_returns_a_tuple():
    fast, eager, mask, ids = _padded_batch()
    fast.config.return_dict = eager.config.return_dict = False
    labels = labels_for(ids, mask)
    try:
        ref = eager(input_ids=ids, attention_mask=mask, labels=labels)
    except AttributeError as exc:  # 4.57 and 5.x: LlamaForCausalLM reads .last_hidden_state of the tuple
        pytest.skip(f"this transformers release fails with config.return_dict=False itself ({exc})")
    out = fast(input_ids=ids, attention_mask=mask, labels=labels)
    assert last_path() == "whole-model"
    assert isinstance(out, tuple) and isinstance(ref, tuple)
    assert relative_error(out[0], ref[0]) < LOSS_RTOL
    assert relative_error(out[1][mask.bool()], ref[1][mask.bool()]) < FLOAT32_RTOL


def test_status_names_where_the_lm_head_and_loss_ran():
    """status() says what ran: a left-padded batch whose labels keep the first real token of a row (a target
    predicted from padding, ../shared/FINDINGS.md item 4) runs its decoder on the packed row but its LM head
    and loss on the padded layout; with that label set to -100 all of it runs on the real tokens."""
    from autoflash import unpad_model

    fast, _ = model_pair(seed=21)
    mask = padding_mask([6, 3, 5], "left")
    ids = torch.randint(3, 97, mask.shape)
    fast(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    last = unpad_model.last_decision()
    assert last["path"] == "whole-model"
    assert last["lm_head_and_loss"]["on"] == "padded layout"
    assert "predicted from a padding position" in last["lm_head_and_loss"]["reason"]
    fast(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
    assert unpad_model.last_decision()["lm_head_and_loss"] == {"on": "real tokens", "reason": None}
    fast(input_ids=ids, attention_mask=mask)  # no labels: no LM-head record left over from the last forward
    assert "lm_head_and_loss" not in unpad_model.last_decision()


def test_every_layer_of_a_packed_forward_reads_one_frozen_record_of_it(monkeypatch):
    """The forward's record (autoflash.forward.Forward) is made once and read by each layer, by keyword where the
    release passes keywords to attention, published for the forward where it does not; nothing mutates it."""
    import dataclasses

    from autoflash import attention, forward

    seen = []
    original_layout_of = attention._layout_of

    def layout_of(query, key, attention_mask, record, kwargs):
        seen.append(record)
        return original_layout_of(query, key, attention_mask, record, kwargs)

    original_same_call = attention._same_call

    def same_call(record, *args):
        seen.append(record)
        return original_same_call(record, *args)

    monkeypatch.setattr(attention, "_layout_of", layout_of)
    monkeypatch.setattr(attention, "_same_call", same_call)
    fast, _ = model_pair(seed=21)
    mask = _mask([7, 3, 1, 12], ["left", "right", "right", "left"])
    ids = torch.randint(3, 97, mask.shape, generator=torch.Generator().manual_seed(21))
    fast(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask)).loss.backward()
    assert last_path() == "whole-model"
    layers = fast.config.num_hidden_layers
    records = {id(r): r for r in seen}
    assert len(records) == 1 and len(seen) >= layers, (len(records), len(seen))
    (record,) = records.values()
    assert isinstance(record, forward.Forward) and record.packed
    assert record.row.batch == 1 and record.row.q_len == int(mask.sum()) and record.batch.q_len == mask.shape[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.row_backend = "sdpa"
    assert forward.current() is None  # published only for the duration of its forward
