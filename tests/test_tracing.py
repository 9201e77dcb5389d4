"""Traced calls: torch.compile (fullgraph, transformers' own compiled decoding) and torch.export
see no graph break and no host sync inside the model, and answer as eager does.

Dynamo's capture is what is under test, so most cases compile with the "eager" backend (the
captured graph run as it is); the GPU suite compiles with inductor and CUDA graphs.
"""

import copy

import pytest
import torch

from conftest import FLOAT32_RTOL, cache_keyword, model_pair, modern_era, padding_mask, static_cache_or_skip

LENGTHS = [7, 4, 1]
MASKS = ["none", "all-ones", "right", "left"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    if not modern_era():
        pytest.skip("traced calls are covered on transformers >= 4.56 (AttentionInterface with mask functions); "
                    "see the README's era table")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _prompt(side, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids = torch.randint(3, 97, (len(LENGTHS), width), generator=generator)
    if side == "none":
        return ids, None
    if side == "all-ones":
        return ids, torch.ones_like(ids)
    mask = padding_mask(LENGTHS, side)
    return ids.masked_fill(mask == 0, 0), mask


def _max_error_at_real_positions(out, reference, mask):
    real = torch.ones(reference.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    return ((out - reference)[real].abs().max() / reference[real].abs().max()).item()


def _prefilled(model, ids, mask, max_cache_len=32):
    """(static cache filled with the prompt, its next tokens, the decode-step mask as generate extends it)."""
    cache = static_cache_or_skip(model.config, max_cache_len, batch_size=ids.shape[0])
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_keyword(model): cache})
    tokens = out.logits[:, -1].argmax(-1, keepdim=True)
    return cache, tokens, torch.cat([mask, torch.ones_like(tokens)], dim=1)


def _positions(model, mask):
    """cache_position as generate() passes it, where the forward takes one: transformers 4.5x would
    otherwise count a static cache's filled slots itself, with a host sync of its own."""
    import inspect

    if "cache_position" not in inspect.signature(type(model.model).forward).parameters:
        return {}
    width, step = mask.shape[1], mask.shape[1] - 1
    return {"cache_position": torch.arange(step, width)}


def _decode_step(model, cache):
    keyword = cache_keyword(model)
    return lambda tokens, mask: model(input_ids=tokens, attention_mask=mask, use_cache=True,
                                      **{keyword: cache}, **_positions(model, mask)).logits


def test_a_static_cache_decode_step_traces_as_one_graph_without_breaks():
    fast, _ = model_pair(seed=3)
    ids, mask = _prompt("left", seed=3)
    with torch.no_grad():
        cache, tokens, step_mask = _prefilled(fast.eval(), ids, mask)
        explained = torch._dynamo.explain(_decode_step(fast, cache))(tokens, step_mask)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("side", ["left", "all-ones"])
def test_fullgraph_decode_steps_match_eager(side):
    fast, eager = model_pair(seed=4)
    ids, mask = _prompt(side, seed=4)
    logits = {}
    with torch.no_grad():
        for name, model in (("fast", fast.eval()), ("eager", eager.eval())):
            cache, tokens, step_mask = _prefilled(model, ids, mask)
            step = _decode_step(model, cache)
            if name == "fast":
                step = torch.compile(step, fullgraph=True, backend="eager")
            steps = []
            for _ in range(3):
                steps.append(step(tokens, step_mask)[:, -1])
                tokens = steps[-1].argmax(-1, keepdim=True)
                step_mask = torch.cat([step_mask, torch.ones_like(tokens)], dim=1)
            logits[name] = torch.stack(steps)
    error = ((logits["fast"] - logits["eager"]).abs().max() / logits["eager"].abs().max()).item()
    assert error < FLOAT32_RTOL


def test_a_traced_prefill_into_a_static_cache_matches_eager():
    fast, eager = model_pair(seed=5)
    ids, mask = _prompt("left", seed=5)
    outputs = {}
    with torch.no_grad():
        for name, model in (("fast", fast.eval()), ("eager", eager.eval())):
            cache = static_cache_or_skip(model.config, 32, batch_size=ids.shape[0])
            keyword = cache_keyword(model)

            def prefill(ids, mask, model=model, cache=cache, keyword=keyword):
                return model(input_ids=ids, attention_mask=mask, use_cache=True, **{keyword: cache}).logits

            if name == "fast":
                prefill = torch.compile(prefill, fullgraph=True, backend="eager")
            outputs[name] = prefill(ids, mask)
    assert _max_error_at_real_positions(outputs["fast"], outputs["eager"], mask) < FLOAT32_RTOL


class _CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts compilations
    (transformers deep-copies its compile config, so the count lives on the class)."""

    compilations = 0

    def __call__(self, graph_module, example_inputs, **options):
        type(self).compilations += 1
        return graph_module.forward


def test_generate_with_a_static_cache_compiled_by_transformers_matches_eager_without_recompiling():
    from transformers import CompileConfig

    fast, eager = model_pair(seed=6)
    fast.eval(), eager.eval()
    # transformers compiles only on accelerators unless told otherwise; its default mode is for inductor
    config = CompileConfig(backend=_CountingBackend(), fullgraph=True, mode=None)
    config._compile_all_devices = True
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                    cache_implementation="static")
    _CountingBackend.compilations = 0
    compiled = []
    # two batches of the same padded width, with different prompt lengths
    for lengths, seed in (([9, 5, 2], 1), ([6, 9, 3], 2)):
        mask = padding_mask(lengths, "left")
        ids = torch.randint(3, 97, mask.shape, generator=torch.Generator().manual_seed(seed)).masked_fill(mask == 0, 0)
        with torch.no_grad():
            tokens = fast.generate(input_ids=ids, attention_mask=mask, compile_config=config, **settings)
            reference = eager.generate(input_ids=ids, attention_mask=mask, disable_compile=True, **settings)
        assert torch.equal(tokens, reference)
        compiled.append(_CountingBackend.compilations)
    assert compiled == [1, 1]  # one graph for every decode step of both calls


def _forward_kwargs(mask):
    return {} if mask is None else {"attention_mask": mask}


@pytest.mark.parametrize("side", MASKS)
def test_torch_export_of_a_forward_matches_eager_at_real_positions(side):
    fast, eager = model_pair(seed=7)
    ids, mask = _prompt(side, seed=7)

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    with torch.no_grad():
        program = torch.export.export(Logits(fast.eval()), (ids,), _forward_kwargs(mask))
        out = program.module()(ids, **_forward_kwargs(mask))
        reference = eager.eval()(input_ids=ids, use_cache=False, **_forward_kwargs(mask)).logits
    assert _max_error_at_real_positions(out, reference, mask) < FLOAT32_RTOL


@pytest.mark.parametrize("side", MASKS)
def test_fullgraph_compile_of_the_forward_matches_eager(side):
    """The unchanged call (use_cache left at its default): no graph break anywhere in the model."""
    fast, eager = model_pair(seed=8)
    ids, mask = _prompt(side, seed=8)
    with torch.no_grad():
        out = torch.compile(fast.eval().forward, fullgraph=True, backend="eager")(input_ids=ids,
                                                                                   **_forward_kwargs(mask))
        reference = eager.eval()(input_ids=ids, **_forward_kwargs(mask))
    assert _max_error_at_real_positions(out.logits, reference.logits, mask) < FLOAT32_RTOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_fullgraph_training_step_on_a_padded_batch_matches_eager(side):
    from conftest import labels_for, train_step, worst_gradient_error

    fast, eager = model_pair(seed=9)
    ids, mask = _prompt(side, seed=9)
    labels = labels_for(ids, mask)
    fast.train(), eager.train()
    fast.compile(fullgraph=True, backend="aot_eager")  # in place: parameter names unchanged
    logits, grads = train_step(fast, input_ids=ids, attention_mask=mask, labels=labels)
    reference_logits, reference_grads = train_step(eager, input_ids=ids, attention_mask=mask, labels=labels)
    assert _max_error_at_real_positions(logits, reference_logits, mask) < FLOAT32_RTOL
    assert worst_gradient_error(grads, reference_grads)[0] < FLOAT32_RTOL


def test_the_trace_safe_path_is_recorded_in_status():
    import autoflash
    from autoflash import tracing

    tracing.traced_paths.clear()
    fast, _ = model_pair(seed=10)
    ids, mask = _prompt("right", seed=10)
    with torch.no_grad():
        torch.compile(fast.eval().forward, fullgraph=True, backend="eager")(input_ids=ids, attention_mask=mask)
    traced = autoflash.status()["traced"]
    assert tracing.TRACE_SAFE in traced
    assert "traced masked" in traced and traced["traced masked"].endswith("-> sdpa")


def test_plain_compile_of_a_padded_forward_still_removes_padding_for_the_whole_model():
    """Where the trace may break (no fullgraph), the padded forward pays one break for the packed row."""
    from conftest import last_path

    fast, eager = model_pair(seed=11)
    ids, mask = _prompt("left", seed=11)
    with torch.no_grad():
        out = torch.compile(fast.eval().forward, backend="eager")(input_ids=ids, attention_mask=mask)
        reference = eager.eval()(input_ids=ids, attention_mask=mask)
    assert last_path() == "whole-model"
    assert _max_error_at_real_positions(out.logits, reference.logits, mask) < FLOAT32_RTOL


# (batch, length) of a loop whose batches change shape every step, as a training loop's and a server's do
SHAPES = [(2, 12), (2, 17), (3, 23), (2, 30), (4, 9)]


def _padded(batch, length, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator).tolist()
    lengths[0] = length  # the widest row sets the width
    mask = padding_mask(lengths, "left" if seed % 2 else "right")
    return torch.randint(3, 97, mask.shape, generator=generator).masked_fill(mask == 0, 0), mask


def _graphs_for_shapes(model, dynamic):
    """Each shape's logits from one torch.compile(fullgraph=True) of ``model``, and how many graphs it made."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=dynamic, backend="eager")
    with torch.no_grad():
        logits = [compiled(input_ids=ids, attention_mask=mask).logits
                  for ids, mask in (_padded(b, n, seed) for seed, (b, n) in enumerate(SHAPES))]
    return logits, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic-dynamic", "dynamic=True"])
def test_fullgraph_compile_keeps_working_as_the_batch_and_length_change(dynamic):
    """As a training loop's batches do: every shape equals eager at real positions, padded positions hold zeros,
    and no more graphs are compiled than for transformers' own sdpa on the same shapes."""
    from autoflash import handover

    fast, eager = model_pair(seed=12)
    fast.eval(), eager.eval()
    logits, graphs = _graphs_for_shapes(fast, dynamic)
    for seed, ((batch, length), out) in enumerate(zip(SHAPES, logits)):
        ids, mask = _padded(batch, length, seed)
        with torch.no_grad():
            reference = eager(input_ids=ids, attention_mask=mask).logits
        assert _max_error_at_real_positions(out, reference, mask) < FLOAT32_RTOL, (batch, length)
        assert (out[~mask.bool()] == 0).all(), (batch, length)
    sdpa = copy.deepcopy(fast)
    with handover.passing_through():
        sdpa.set_attn_implementation("sdpa")  # transformers' own, for its count of graphs
    _, sdpa_graphs = _graphs_for_shapes(sdpa, dynamic)
    assert graphs <= sdpa_graphs, (graphs, sdpa_graphs)


def test_torch_export_with_dynamic_batch_and_length_runs_other_shapes():
    """One exported program for every batch size and length (as a server exports once): each shape equals
    eager at real positions, and padded positions hold zeros, as they do on every untraced path."""
    fast, eager = model_pair(seed=13)
    fast.eval(), eager.eval()
    ids, mask = _padded(2, 12, seed=1)
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=2, max=256)
    with torch.no_grad():
        program = torch.export.export(fast, (), {"input_ids": ids, "attention_mask": mask, "use_cache": False},
                                      dynamic_shapes={"input_ids": {0: batch, 1: length},
                                                      "attention_mask": {0: batch, 1: length}, "use_cache": None})
        for seed, (b, n) in enumerate([(3, 19), (1, 5), (5, 40)]):
            ids, mask = _padded(b, n, seed)
            out = program.module()(input_ids=ids, attention_mask=mask, use_cache=False).logits
            reference = eager(input_ids=ids, attention_mask=mask, use_cache=False).logits
            assert _max_error_at_real_positions(out, reference, mask) < FLOAT32_RTOL, (b, n)
            assert (out[~mask.bool()] == 0).all(), (b, n)


def _cache_tensors(cache):
    """Every layer's (keys, values), whatever the release's cache class."""
    if getattr(cache, "layers", None) is not None:
        return [(layer.keys, layer.values) for layer in cache.layers]
    if isinstance(getattr(cache, "key_cache", None), list):
        return list(zip(cache.key_cache, cache.value_cache))
    return [tuple(layer) for layer in cache]


def test_the_cache_a_traced_padded_forward_builds_holds_zeros_at_padded_positions_as_untraced():
    """The same padded prompt, untraced (padding removed for the whole model) and compiled whole (padding kept,
    attention masks it; as torch.export traces it): one cache, eager's at real positions and zeros at padded
    ones, on both paths."""
    fast, eager = model_pair(seed=15, use_cache=True)
    fast.eval(), eager.eval()
    _, mask = _padded(3, 14, seed=1)
    ids = torch.randint(3, 97, mask.shape, generator=torch.Generator().manual_seed(15))  # tokens under the padding too
    real = mask.bool()[:, None, :, None]
    with torch.no_grad():
        compiled = torch.compile(fast.forward, fullgraph=True, backend="eager")
        traced = _cache_tensors(compiled(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values)
        untraced = _cache_tensors(fast(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values)
        reference = _cache_tensors(eager(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values)
    assert len(traced) == len(untraced) == len(reference) == fast.config.num_hidden_layers
    for layer, (ours, theirs, eagers) in enumerate(zip(traced, untraced, reference)):
        for name, t, u, e in zip(("keys", "values"), ours, theirs, eagers):
            assert t.shape == u.shape == e.shape, (layer, name)
            assert (t.masked_select(~real) == 0).all() and (u.masked_select(~real) == 0).all(), (layer, name)
            assert torch.allclose(t, u, rtol=FLOAT32_RTOL, atol=1e-6), (layer, name)
            assert torch.allclose(t.masked_select(real), e.masked_select(real), rtol=FLOAT32_RTOL, atol=1e-6), \
                (layer, name)


def _executorch_or_skip(*names):
    integration = pytest.importorskip("transformers.integrations.executorch")
    if not all(hasattr(integration, name) for name in names):
        pytest.skip(f"this transformers has no {', '.join(names)}")
    return integration


def test_generate_from_a_static_cache_program_exported_with_a_dynamic_length_gives_transformers_tokens():
    """transformers' own export for on-device generation (one program, prompts of any length, a static cache):
    the same tokens as the same program exported from transformers' own sdpa."""
    import warnings

    from autoflash import handover

    integration = _executorch_or_skip("TorchExportableModuleForDecoderOnlyLM", "TorchExportableModuleWithStaticCache")
    fast, _ = model_pair(seed=14, use_cache=True)
    fast.eval()
    sdpa = copy.deepcopy(fast)
    with handover.passing_through():
        sdpa.set_attn_implementation("sdpa")
    prompt = torch.randint(3, 97, (1, 11), generator=torch.Generator().manual_seed(14))
    tokens = []
    for model in (fast, sdpa):
        model.generation_config.cache_implementation = "static"
        model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": 64}
        length = torch.export.Dim("length", min=1, max=32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's notes on the cache's lifted tensors
            program = integration.TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=64).export(
                input_ids=prompt[:, :7], cache_position=torch.arange(7),
                dynamic_shapes={"input_ids": {1: length}, "cache_position": {0: length}}, strict=False)
            tokens.append(integration.TorchExportableModuleWithStaticCache.generate(
                program, prompt_token_ids=prompt, max_new_tokens=8).tolist())
    assert tokens[0] == tokens[1]


def test_a_program_exported_with_a_dynamic_cache_matches_eager():
    integration = _executorch_or_skip("export_with_dynamic_cache")
    from transformers import DynamicCache

    fast, eager = model_pair(seed=15)
    fast.eval(), eager.eval()
    ids, mask = _padded(2, 9, seed=1)
    program = integration.export_with_dynamic_cache(fast, ids, mask)
    with torch.no_grad():
        cache = {cache_keyword(fast): DynamicCache(config=fast.config)}  # `cache` from 5.2x, past_key_values before
        out = program.module()(input_ids=ids, attention_mask=mask, use_cache=True, **cache).logits
        reference = eager(input_ids=ids, attention_mask=mask).logits
    assert _max_error_at_real_positions(out, reference, mask) < FLOAT32_RTOL
