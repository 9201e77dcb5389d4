"""Every GPU path in bf16 and fp16 against a float32 eager reference (skipped without CUDA).

Run on the GPU machine, once without and once with the flash-attn wheel (and FlashAttention-4,
installed after it: ../shared/FINDINGS.md items 14-15):

    python -m pytest -q tests/gpu
    pip install --no-deps --no-index .whl/flash_attn-*.whl && python -m pytest -q tests/gpu

FlashAttention-4 serves training and prefill, not decode steps or traced calls: it is forced in
the training, packed and prefill cases and reaches generation through "auto".

How a half-precision path is judged (../shared/FINDINGS.md item 5): transformers' own eager
attention in bf16 is already ~1e-2 away from float32 on these models, so a path passes when
its error against the float32 reference is below 1e-2 or at most twice the error of eager
attention in the same dtype on the same case, plus 2e-3.
"""

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device here", allow_module_level=True)

from autoflash import backends, dispatch
from conftest import (dynamic_cache, half_precision_errors, labels_for, last_path, legacy_era, model_pair,
                      padding_mask, relative_error, static_cache_or_skip, train_step, whole_model_padding_removal,
                      within_half_precision_floor)

HALF = [torch.bfloat16, torch.float16]
BACKENDS = ["auto", "torch", "sdpa"] + (["flash_attn"] if not backends.FLASH_ATTN.unavailable_reasons() else [])
FA4 = not backends.FLASH_ATTN_4.unavailable_reasons()
TRAINING_BACKENDS = BACKENDS + (["flash_attn_4"] if FA4 else [])
SHAPES = {  # head_dim 64 and 128, GQA 4:1 and 2:1
    "hd64": dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2),
    "hd128": dict(hidden_size=512, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2),
}
RESULTS = []


def _models(shape, dtype, seed=0, **overrides):
    """(autoflash in dtype, eager in dtype, eager in float32), same weights, on the GPU."""
    fast, eager32 = model_pair(seed=seed, device="cuda", **{"vocab_size": 1000, **SHAPES[shape], **overrides})
    eager_half = copy.deepcopy(eager32).to(dtype)
    return fast.to(dtype), eager_half, eager32


def _case(lengths, side, packed=False):
    mask = padding_mask(lengths, side, device="cuda")
    ids = torch.randint(3, 1000, mask.shape, device="cuda")
    return ids, mask


@pytest.mark.parametrize("stack", ["whole-model", "per-layer"])
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("side,lengths", [("right", [300, 17, 128, 1]), ("left", [64, 255, 3, 200]),
                                          ("right", [96, 96, 96])])
def test_training_step_half_precision_matches_float32_eager(stack, backend, dtype, shape, side, lengths):
    fast, eager_half, eager32 = _models(shape, dtype, seed=len(lengths))
    ids, mask = _case(lengths, side)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
    with dispatch.forced(backend), whole_model_padding_removal(stack == "whole-model"):
        logits, grads = train_step(fast, **inputs)
    if len(set(lengths)) > 1:
        assert last_path() == stack
    used = dispatch.last_decisions.get("varlen") or dispatch.last_decisions.get("dense")
    err, floor, gerr, gfloor = half_precision_errors(logits, grads, eager32, eager_half, inputs, mask.bool())
    RESULTS.append((f"train {stack} {shape} {side} {str(dtype)[6:]}", used.backend, err, floor, gerr, gfloor))
    assert torch.isfinite(logits).all()
    if backend != "auto":
        assert used.backend == backend
    assert within_half_precision_floor(err, floor), f"logits {err:.2e} vs eager-{dtype} floor {floor:.2e}"
    assert within_half_precision_floor(gerr, gfloor), f"gradients {gerr:.2e} vs eager-{dtype} floor {gfloor:.2e}"


@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_packed_rows_with_padding_half_precision(backend, dtype):
    fast, eager_half, eager32 = _models("hd128", dtype, seed=9)
    lengths = [[70, 33, 1, 90], [120, 64]]
    width = 200
    ids = torch.randint(3, 1000, (2, width), device="cuda")
    positions = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    singles = []
    for row, row_lengths in enumerate(lengths):
        start = 0
        for n in row_lengths:
            positions[row, start:start + n] = torch.arange(n, device="cuda")
            mask[row, start:start + n] = 1
            singles.append(ids[row, start:start + n])
            start += n
    with dispatch.forced(backend), torch.no_grad():
        logits = fast(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    one_per_row = padding_mask([len(s) for s in singles], "right", device="cuda")
    single_ids = torch.zeros_like(one_per_row)
    for row, seq in enumerate(singles):
        single_ids[row, :len(seq)] = seq
    with torch.no_grad():
        ref = eager32(input_ids=single_ids, attention_mask=one_per_row).logits
        half = eager_half(input_ids=single_ids, attention_mask=one_per_row).logits
    err = relative_error(logits[mask.bool()].float(), ref[one_per_row.bool()])
    floor = relative_error(half[one_per_row.bool()].float(), ref[one_per_row.bool()])
    RESULTS.append((f"packed hd128 {str(dtype)[6:]}", dispatch.last_decisions["varlen"].backend, err, floor,
                    float("nan"), float("nan")))
    assert within_half_precision_floor(err, floor), f"packed logits {err:.2e} vs floor {floor:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_greedy_generation_matches_eager_in_the_same_dtype(backend, cache, dtype):
    # A vocabulary of 128: a random model's next-token distribution is nearly flat, and over
    # 1000 tokens the top two logits are so close that bf16 rounding alone flips the argmax
    # within ~10 steps, whichever attention runs (measured: autoflash's sdpa and torch
    # paths agreed with bf16 eager for exactly 10 tokens there, in bf16 only).
    fast, eager_half, eager32 = _models("hd128", dtype, seed=3, vocab_size=128)
    fast.eval(), eager_half.eval(), eager32.eval()
    lengths = [37, 5, 120, 64]
    mask = padding_mask(lengths, "left", device="cuda")
    ids = torch.randint(3, 128, mask.shape, device="cuda").masked_fill(mask == 0, 0)
    settings = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    if cache == "static":
        if legacy_era():
            pytest.skip("transformers < 4.48: its flash-attention class, which autoflash runs behind, refuses "
                        "a static cache")
        settings["cache_implementation"] = "static"
    width = mask.shape[1]
    if backend == "flash_attn":
        # flash_attn_with_kvcache serves a decode step only where no padding mask comes with it
        # (checking a mask for plain left padding would cost a host sync per step), and
        # generate() in transformers 5.1x passes one on every step: drive the cache directly.
        return _greedy_loop_matches_eager(fast, eager_half, cache, dtype)
    with torch.no_grad():
        with dispatch.forced(backend):
            tokens = fast.generate(input_ids=ids, attention_mask=mask, **settings)[:, width:]
        reference = eager_half.generate(input_ids=ids, attention_mask=mask, output_scores=True,
                                        return_dict_in_generate=True, **settings)
        full_precision = eager32.generate(input_ids=ids, attention_mask=mask, **settings)[:, width:]
    expected = reference.sequences[:, width:]
    same = (tokens == expected).all(dim=0).long().cumprod(0).sum().item()
    control = (full_precision == expected).all(dim=0).long().cumprod(0).sum().item()
    used = dispatch.last_decisions["cache"].backend
    # error column: tokens agreeing with eager in the same dtype; floor column: float32 eager vs that eager
    RESULTS.append((f"generate {cache} {str(dtype)[6:]}", used, same, control, float("nan"), float("nan")))
    _assert_first_16_or_near_tie(tokens, expected, reference.scores, same)


def _assert_first_16_or_near_tie(tokens, expected, scores, same):
    if same >= 16:
        return
    # Diverging earlier is acceptable only at a near-tie: where eager's own scores put autoflash's
    # token within bf16 rounding of eager's (logits carry ~1e-2 relative error in bf16, FINDINGS.md item 5).
    step_scores = scores[same].float()
    for row in torch.nonzero(tokens[:, same] != expected[:, same]).flatten().tolist():
        margin = (step_scores[row, expected[row, same]] - step_scores[row, tokens[row, same]]).item()
        finite = step_scores[row][torch.isfinite(step_scores[row])]
        scale = finite.pow(2).mean().sqrt().item()
        assert margin <= 4e-2 * scale, (f"token {same} of row {row} differs from eager's, which was ahead by "
                                        f"{margin:.3g} (logit scale {scale:.3g}): not a near-tie")


@pytest.mark.skipif(not FA4, reason="FlashAttention-4 not available here")
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_flash_attention_4_prefill_into_a_cache_matches_float32_eager(dtype):
    fast, eager_half, eager32 = _models("hd128", dtype, seed=5)
    fast.eval(), eager_half.eval(), eager32.eval()
    ids, mask = _case([37, 5, 120, 64], "left")
    with torch.no_grad():
        with dispatch.forced("flash_attn_4"):
            logits = fast(input_ids=ids, attention_mask=mask, past_key_values=dynamic_cache(fast.config),
                          use_cache=True).logits
        used = dispatch.last_decisions["cache"]
        ref = eager32(input_ids=ids, attention_mask=mask, use_cache=False).logits
        half = eager_half(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    err, floor = relative_error(logits[real].float(), ref[real]), relative_error(half[real].float(), ref[real])
    RESULTS.append((f"prefill left {str(dtype)[6:]}", used.backend, err, floor, float("nan"), float("nan")))
    assert used.backend == "flash_attn_4"
    assert within_half_precision_floor(err, floor), f"prefill logits {err:.2e} vs eager-{dtype} floor {floor:.2e}"


@pytest.mark.skipif(not FA4, reason="FlashAttention-4 not available here")
def test_flash_attention_4_times_its_first_forward_and_backward_per_configuration():
    fast, _, _ = _models("hd64", torch.bfloat16, seed=6)
    ids, mask = _case([90, 31, 64], "right")
    with dispatch.forced("flash_attn_4"):
        train_step(fast, input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
    compiled = backends.FLASH_ATTN_4.compiled
    assert {"forward bfloat16 head_dim=64 causal varlen",
            "backward bfloat16 head_dim=64 causal varlen"} <= set(compiled)
    assert all(seconds > 0 for seconds in compiled.values()), compiled


def _attention_gradients(backend, runs=3):
    """dq, dk, dv of one padded GQA batch (bf16, hd128, 32/8 heads) through ``backend``, ``runs`` times, with the
    deterministic backward asked for as the switches now in force say; None where ``backend`` cannot serve it."""
    from autoflash.call import AttentionCall, capability_of, deterministic_backward_asked
    from autoflash.layout import plan_without_cache

    generator = torch.Generator(device="cuda").manual_seed(0)
    lengths, width = [4096, 1500, 3000, 2048], 4096
    mask = padding_mask(lengths, "right", device="cuda").bool()
    layout = plan_without_cache(mask, None, len(lengths), width, mask.device)
    q, k, v = (torch.randn(len(lengths), heads, width, 128, device="cuda", dtype=torch.bfloat16, generator=generator,
                           requires_grad=True) for heads in (32, 8, 8))
    grad_out = torch.randn(len(lengths), width, 32, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
    call = AttentionCall(kind="varlen", device_type="cuda", capability=capability_of(q.device), dtype=q.dtype,
                         head_dim=128, num_heads=32, num_kv_heads=8, q_len=width, kv_len=width, dropout=0.0,
                         causal=True, needs_grad=True, deterministic=deterministic_backward_asked())
    kernel = dispatch.backend(backend)
    if kernel.reasons_not_supported(call):
        return None
    return [torch.autograd.grad(kernel.run(q, k, v, layout, call, 128 ** -0.5), (q, k, v), grad_out)
            for _ in range(runs)]


def _all_equal(runs):
    return all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))


@pytest.mark.parametrize("backend,switch", [("flash_attn", "FLASH_ATTENTION_DETERMINISTIC=1"),
                                            ("torch", "torch.use_deterministic_algorithms(True)")])
def test_a_deterministic_backward_repeats_its_gradients_bit_for_bit(backend, switch, monkeypatch):
    """flash-attn 2 is handed ``deterministic=True`` (the call record carries the request); torch's kernels
    follow torch's switch by themselves. The case must first show run-to-run differences without it."""
    monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    free = _attention_gradients(backend) if backend in BACKENDS else None
    if free is None:
        pytest.skip(f"{backend} cannot serve this case here")
    if _all_equal(free):
        pytest.skip(f"{backend}'s backward repeated itself bit for bit without the switch: this case cannot tell")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if switch.startswith("torch"):
        torch.use_deterministic_algorithms(True)
    else:
        monkeypatch.setenv("FLASH_ATTENTION_DETERMINISTIC", "1")
    try:
        runs = _attention_gradients(backend)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert runs is not None, f"{backend} refused the call under {switch}"
    repeated = _all_equal(runs)
    RESULTS.append((f"deterministic bwd {backend}", backend, float(not repeated), float("nan"), float("nan"),
                    float("nan")))
    assert repeated, f"{backend}'s gradients differed between runs under {switch}"


def _greedy_loop_matches_eager(fast, eager_half, cache, dtype):
    from test_generation_matches_eager import greedy_loop

    ids = torch.randint(3, 128, (4, 64), device="cuda")

    def new_cache(model):
        if cache == "dynamic":
            return dynamic_cache(model.config)
        return static_cache_or_skip(model.config, max_cache_len=96, batch_size=4)

    with torch.no_grad():
        with dispatch.forced("flash_attn"):
            tokens, _ = greedy_loop(fast, ids, 24, new_cache(fast))
        expected, scores = greedy_loop(eager_half, ids, 24, new_cache(eager_half))
    same = (tokens == expected).all(dim=0).long().cumprod(0).sum().item()
    RESULTS.append((f"greedy loop {cache} {str(dtype)[6:]}", dispatch.last_decisions["cache"].backend, same,
                    float("nan"), float("nan"), float("nan")))
    _assert_first_16_or_near_tie(tokens, expected, scores, same)


def _syncs(fn):
    """The host-device synchronisations one call makes, as (count, where): torch's sync debug mode warns on each."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (torch also warns, once, that the debug mode is a prototype: not a sync)
    hits = [w for w in caught if "called a synchronizing" in str(w.message)]
    return len(hits), "; ".join(f"{w.filename}:{w.lineno} {str(w.message)[:60]}" for w in hits)


def test_decode_steps_make_no_host_sync_and_a_padded_forward_at_most_one():
    from conftest import cache_keyword

    fast, _, _ = _models("hd128", torch.bfloat16)
    ids = torch.randint(3, 1000, (4, 50), device="cuda")
    left = padding_mask([50, 7, 31, 49], "left", "cuda")
    right = padding_mask([50, 7, 31, 49], "right", "cuda")
    caches = {name: dynamic_cache(fast.config) for name in ("plain", "padded")}
    step = ids[:, -1:]
    one = torch.ones(4, 1, dtype=left.dtype, device="cuda")
    masks = {"plain": None, "padded": left}

    def decode(name):
        if masks[name] is not None:
            masks[name] = torch.cat([masks[name], one], dim=1)
        with torch.no_grad():
            fast.eval()
            fast(input_ids=step, attention_mask=masks[name], use_cache=True, **{cache_keyword(fast): caches[name]})

    def train_forward():  # no labels: the loss's own syncs are not attention's
        fast.train()
        fast(input_ids=ids, attention_mask=right).logits.float().sum().backward()

    def eval_forward():
        with torch.no_grad():
            fast.eval()
            fast(input_ids=ids, attention_mask=right)

    def labelled_step():  # logits and loss on the real tokens; the label check rides on the plan's sync
        fast.train()
        fast(input_ids=ids, attention_mask=left, labels=labels_for(ids, left)).loss.backward()

    with torch.no_grad():
        fast.eval()
        fast(input_ids=ids, use_cache=True, **{cache_keyword(fast): caches["plain"]})
        fast(input_ids=ids, attention_mask=left, use_cache=True, **{cache_keyword(fast): caches["padded"]})
    for _ in range(2):  # first-call costs (allocator, kernel selection) stay out of the count
        decode("plain"), decode("padded"), train_forward(), eval_forward(), labelled_step()
    torch.cuda.synchronize()
    counts = {"decode step, no padding": _syncs(lambda: decode("plain")),
              "decode step, left padding": _syncs(lambda: decode("padded")),
              "training forward+backward, right padding": _syncs(train_forward),
              "evaluation forward, right padding": _syncs(eval_forward),
              "training step with labels, left padding": _syncs(labelled_step)}
    RESULTS.append(("host syncs", str({k: n for k, (n, _) in counts.items()}), 0, 0, float("nan"), float("nan")))
    assert counts["decode step, no padding"][0] == 0, counts["decode step, no padding"][1]
    # transformers < 4.48 checks `0 in attention_mask` in LlamaModel.forward itself on every step: one sync
    assert counts["decode step, left padding"][0] == (1 if legacy_era() else 0), counts["decode step, left padding"][1]
    assert counts["training forward+backward, right padding"][0] <= 1, counts
    assert counts["evaluation forward, right padding"][0] <= 1, counts
    assert counts["training step with labels, left padding"][0] <= 1, counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_keeps_the_layer_stack_in_one_graph(backend):
    import torch._dynamo

    if legacy_era():
        pytest.skip("transformers < 4.48: the packed row reaches attention without keyword arguments")
    if backend == "sdpa":
        pytest.skip("the sdpa backend's masked path is covered on the CPU")
    ids, mask = _case([300, 17, 128, 1], "left")
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
    graphs = {}
    with dispatch.forced(backend):
        for layers in (2, 4):
            torch._dynamo.reset()
            fast, _, _ = _models("hd128", torch.bfloat16, seed=5, num_hidden_layers=layers)
            graphs[layers] = torch._dynamo.explain(fast)(**inputs).graph_count
        fast, eager_half, eager32 = _models("hd128", torch.bfloat16, seed=5, num_hidden_layers=4)
        torch._dynamo.reset()
        compiled = torch.compile(fast)
        for _ in range(2):
            loss = compiled(**inputs).loss
    torch._dynamo.reset()
    with torch.no_grad():
        ref, half = eager32(**inputs).loss, eager_half(**inputs).loss
    err, floor = relative_error(loss.float(), ref), relative_error(half.float(), ref)
    RESULTS.append((f"compiled train graphs {graphs[2]}/{graphs[4]}", backend, err, floor, float("nan"),
                    float("nan")))
    assert graphs[2] == graphs[4], graphs
    assert within_half_precision_floor(err, floor), f"compiled loss {err:.2e} vs floor {floor:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_static_cache_decoding_captures_cuda_graphs_and_matches_eager(backend):
    """transformers' own compiled decoding (static cache: inductor, CUDA graphs) with autoflash active;
    flash_attn, which serves decode steps without a padding mask, through a compiled loop of the user's."""
    from torch._dynamo.utils import counters

    from conftest import cache_keyword, modern_era

    if not modern_era():
        pytest.skip("compiled decoding is covered on transformers >= 4.56")
    fast, eager_half, _ = _models("hd128", torch.bfloat16, seed=3, vocab_size=128)
    fast.eval(), eager_half.eval()
    lengths = [37, 5, 120, 64]
    mask = padding_mask(lengths, "left", device="cuda")
    ids = torch.randint(3, 128, mask.shape, device="cuda").masked_fill(mask == 0, 0)
    settings = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0,
                    cache_implementation="static")
    torch._dynamo.reset()
    counters.clear()
    width = mask.shape[1]
    with torch.no_grad():
        if backend == "flash_attn":  # no mask: one prompt length, a compiled step of the user's
            ids, mask = ids[:, -5:].contiguous(), None
            width = ids.shape[1]
            cache = static_cache_or_skip(fast.config, 64, batch_size=ids.shape[0])
            keyword = cache_keyword(fast)
            step = torch.compile(lambda t: fast(input_ids=t, use_cache=True, **{keyword: cache}).logits[:, -1],
                                 mode="reduce-overhead", fullgraph=True)
            with dispatch.forced(backend):
                last = fast(input_ids=ids, use_cache=True, **{keyword: cache}).logits[:, -1]
                out = [last.argmax(-1, keepdim=True)]
                for _ in range(23):
                    out.append(step(out[-1].clone()).argmax(-1, keepdim=True))
            tokens = torch.cat(out, dim=1)
        else:
            with dispatch.forced(backend):
                tokens = fast.generate(input_ids=ids, attention_mask=mask, **settings)[:, width:]
        reference = eager_half.generate(input_ids=ids, attention_mask=mask, output_scores=True,
                                        return_dict_in_generate=True, disable_compile=True, **settings)
    skips = dict(counters["inductor"])
    torch._dynamo.reset()
    expected = reference.sequences[:, width:]
    same = (tokens == expected).all(dim=0).long().cumprod(0).sum().item()
    RESULTS.append(("compiled static decode bf16", dispatch.last_decisions["cache"].backend, same, float("nan"),
                    float("nan"), float("nan")))
    assert skips.get("cudagraph_skips", 0) == 0, skips
    _assert_first_16_or_near_tie(tokens, expected, reference.scores, same)


def test_under_sdpa_kernel_math_the_flash_kernels_step_aside_and_a_double_backward_runs():
    """A user's `with sdpa_kernel(SDPBackend.MATH)` (a gradient penalty needs the math kernel's double backward)
    is obeyed as transformers' own sdpa obeys it; outside it, the same padded batch runs on a flash kernel."""
    from conftest import gradient_penalty_under_math

    fast, eager_half, _ = _models("hd128", torch.bfloat16)
    ids, mask = _case([40, 17, 33], "right")
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)
    assert dispatch.last_decisions["varlen"].backend in backends.FLASH_KERNELS
    penalties = [gradient_penalty_under_math(model, ids, mask)[1] for model in (fast, eager_half)]
    assert dispatch.last_decisions["varlen"].backend == "sdpa"
    error = relative_error(penalties[0], penalties[1])
    RESULTS.append(("double backward, MATH", "sdpa", error, float("nan"), float("nan"), float("nan")))
    assert error < 5e-2, error


def test_print_summary():
    print("\ncase                         backend     error     eager-floor  grad-error  grad-floor")
    for case, backend, err, floor, gerr, gfloor in RESULTS:
        print(f"{case:<28} {backend:<11} {err:<9.3g} {floor:<12.3g} {gerr:<11.3g} {gfloor:.3g}")
