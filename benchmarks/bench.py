"""autoflash against transformers' eager, sdpa and flash_attention_2, side by side.

One process per workload (``python benchmarks/bench.py all`` spawns them); inside a
workload every competitor runs in the same process, one after another, on the same model
and the same data:

    eager                 transformers' eager attention
    sdpa                  transformers' own sdpa (autoflash switched off while the model is set up)
    flash_attention_2     transformers' flash-attn integration (needs the flash-attn package)
    autoflash             autoflash, every backend available (FlashAttention-4, then flash-attn, where installed)
    autoflash-fa2         autoflash with FlashAttention-4 hidden (a row only where it is installed)
    autoflash-torch       autoflash with both flash-attn packages hidden: PyTorch's built-in kernels only

and in W1 also (training):

    fa2 padding-free      the same real tokens packed into one row by the caller (position ids
                          restarting, cu_seq_lens_q/k, use_cache=False) with flash_attention_2
    flash_attention_4     transformers' FlashAttention-4 integration, padded, and ``fa4 padding-free`` the
                          same tokens packed by hand (rows only where transformers finds flash-attn-4)
    autoflash-per-layer   AUTOFLASH_UNPAD_MODEL=0: padding removed inside attention only
    autoflash-cache-on    the unchanged loop: use_cache left at its default (a cache is returned)
    autoflash-torch-per-layer

Workloads (sizes of ../docs/benchmarks.md; ``--smoke`` shrinks everything to run on a CPU in CI):

    w1         train: LLaMA-3-8B-shaped layers x4, batch 8, lengths U(128, 4096), right padding
    w1packed   the same tokens packed into one row through position_ids
    (``w1 --profile``: the CUDA kernel time of one step by kind, the GPU's idle time (the step less
    its kernels), its host syncs and the host's time until it returns: autoflash, autoflash-torch, the
    padding-free runs and transformers' flash_attention_4)
    w2         decode: 128 greedy tokens at batch 16 (left-padded prompts U(64, 1024)) and batch 1 (700
               tokens); dynamic cache, static cache uncompiled, compiled by transformers (its default,
               CUDA graphs) and by the user's torch.compile(mode="reduce-overhead"); uncompiled modes time
               the competitors interleaved, round after round (the host drifts)
    w3         attention kernels alone: causal, hd 128, 32/8 heads, 16k tokens at 1k..16k per sequence, and
               W1's lengths packed (varlen); bare kernels and autoflash's backends (their run(), layout included)
    w4         longest single sequence (powers of two) that trains one step

Prints a table per workload and writes ``OUT/<workload>.json`` and ``OUT/<workload>.png``.
Nothing here is asserted: tests run ``--smoke`` only so that the script cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

COMPETITORS = ["eager", "sdpa", "flash_attention_2", "autoflash", "autoflash-fa2", "autoflash-torch"]
# W1 adds: autoflash with padding removed per layer only (AUTOFLASH_UNPAD_MODEL=0), autoflash in
# the unchanged loop (use_cache left at its default), and the best a transformers user can do
# today: the same tokens packed padding-free by the caller, run with flash_attention_2.
PADDING_FREE_FA2 = "fa2 padding-free"
# transformers' own FlashAttention-4 integration, padded and packed by hand (rows only where it is available):
# issue 12 asks why it gains nothing end to end; `w1 --profile` breaks its step down beside autoflash's
PADDING_FREE_FA4 = "fa4 padding-free"
PADDING_FREE = {PADDING_FREE_FA2: "flash_attention_2", PADDING_FREE_FA4: "flash_attention_4"}
TRAINING_COMPETITORS = ["eager", "sdpa", "flash_attention_2", PADDING_FREE_FA2, "flash_attention_4", PADDING_FREE_FA4,
                        "autoflash", "autoflash-fa2",
                        "autoflash-per-layer", "autoflash-cache-on", "autoflash-torch", "autoflash-torch-per-layer"]
WORKLOADS = ["w1", "w1packed", "w2", "w3", "w4"]
DECODE_BATCHES = DECODE_MODES_RUN = None  # w2: --decode-batch / --decode-mode


# -- set-up --------------------------------------------------------------------------------------

def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2, vocab=256, batch=3, min_len=4, max_len=24,
                    steps=2, warmup=1, decode_batch=3, prompt_min=3, prompt_max=12, new_tokens=4,
                    kernel_tokens=256, kernel_lengths=[64, 128], long_lengths=[64, 128], device="cpu",
                    dtype=torch.float32)
    return dict(hidden=4096, heads=32, kv_heads=8, mlp=14336, layers=4, vocab=32000, batch=8, min_len=128,
                max_len=4096, steps=5, warmup=2, decode_batch=16, prompt_min=64, prompt_max=1024, new_tokens=128,
                kernel_tokens=16384, kernel_lengths=[1024, 2048, 4096, 8192, 16384],
                long_lengths=[4096, 8192, 16384, 32768, 65536, 131072], device="cuda", dtype=torch.bfloat16)


# --family: the model built at the same sizes (Qwen2's config adds q/k/v biases by default)
FAMILY_MODELS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}
FAMILY = "llama"


def build_model(s):
    import transformers

    config_name, model_name = FAMILY_MODELS[FAMILY]
    extra = {"sliding_window": None} if FAMILY == "mistral" else {}  # LLaMA's attention: no window
    if FAMILY == "qwen3":
        extra["head_dim"] = s["hidden"] // s["heads"]
    config = getattr(transformers, config_name)(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], rope_theta=500000.0,
        max_position_embeddings=262144, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    with torch.device(s["device"]):
        model = getattr(transformers, model_name)(config)
    return model.to(s["dtype"])


def available(competitor: str) -> str | None:
    """None if the competitor can run here, else why not."""
    if competitor in ("flash_attention_4", PADDING_FREE_FA4):
        try:
            from transformers.utils.import_utils import is_flash_attn_4_available

            if not is_flash_attn_4_available():
                return "transformers says FlashAttention-4 is not available"
        except Exception as exc:  # noqa: BLE001
            return f"this transformers has no flash_attention_4 ({type(exc).__name__})"
    if competitor in ("flash_attention_2", PADDING_FREE_FA2):
        try:
            import flash_attn  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"flash-attn not importable ({type(exc).__name__})"
    if competitor == "autoflash-fa2":
        from autoflash import backends

        if backends.FLASH_ATTN_4.unavailable_reasons():
            return "FlashAttention-4 not available: this row equals autoflash's"
    return None


@contextlib.contextmanager
def competing_as(model, competitor: str):
    """Set the model's attention for one competitor; restore autoflash's full backend list after."""
    import autoflash
    from autoflash import dispatch

    from autoflash import settings as settings_module

    exclusion = contextlib.nullcontext()
    per_layer = competitor.endswith("per-layer")
    if per_layer:
        os.environ[settings_module.UNPAD_MODEL_VARIABLE] = "0"
        settings_module.settings.cache_clear()
    if competitor in ("sdpa", "flash_attention_2", "flash_attention_4", *PADDING_FREE):
        competitor = PADDING_FREE.get(competitor, competitor)
        autoflash.disable()  # transformers' own implementation, not autoflash's replacement of it
        try:
            model.set_attn_implementation(competitor)
        finally:
            autoflash.enable()
    elif competitor == "eager":
        model.set_attn_implementation("eager")
    else:
        model.set_attn_implementation("autoattn")
        if competitor.startswith("autoflash-torch"):
            exclusion = dispatch.excluded("flash_attn_4", "flash_attn")
        elif competitor == "autoflash-fa2":
            exclusion = dispatch.excluded("flash_attn_4")
    dispatch.clear_cache()
    try:
        with exclusion:
            yield
    finally:
        if per_layer:
            os.environ.pop(settings_module.UNPAD_MODEL_VARIABLE, None)
            settings_module.settings.cache_clear()
        dispatch.clear_cache()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, wait=True):
    """Seconds for ``fn`` from an empty GPU queue until its work is done, or (``wait=False``) until it
    returns: the host's share, near the whole when the step is host-bound."""
    sync(device)
    start = time.perf_counter()
    fn()
    if wait:
        sync(device)
    seconds = time.perf_counter() - start
    sync(device)
    return seconds


def reset_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


_PEAK = {}


def matmul_peak_tflops(device) -> float:
    """Measured bf16 matmul rate on this GPU (8192^3), the MFU denominator."""
    if device != "cuda":
        return float("nan")
    if "v" not in _PEAK:
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        times = [timed(lambda: a @ b, "cuda") for _ in range(10)]
        _PEAK["v"] = 2 * 8192**3 / statistics.median(times) / 1e12
    return _PEAK["v"]


# -- W1: training ----------------------------------------------------------------------------------

def lengths_for(s, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(s["min_len"], s["max_len"] + 1, (s["batch"],), generator=generator).tolist()


def padded_batch(s, lengths):
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(3, s["vocab"], (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.to(s["device"]) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def packed_batch(s, lengths, boundaries=False):
    """The padded batch's real tokens in one row; ``boundaries``: also cu_seq_lens_q/k, as
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) hands them to the model."""
    padded = padded_batch(s, lengths)
    ids = torch.cat([padded["input_ids"][row, :n] for row, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(s["device"])
    labels = ids.clone()
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[0, starts.to(s["device"])] = -100
    batch = dict(input_ids=ids, position_ids=positions, labels=labels)
    if boundaries:
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(s["device"])
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return batch


def train_flops(model, s, lengths):
    per_token = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    attention = s["layers"] * 3 * 2 * s["heads"] * (s["hidden"] // s["heads"]) * sum(n * n for n in lengths)
    return 6 * per_token * sum(lengths) + attention


def run_training(s, packed: bool):
    model = build_model(s)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=s["device"] == "cuda")
    lengths = lengths_for(s)
    batch = packed_batch(s, lengths) if packed else padded_batch(s, lengths)
    padding_free = packed_batch(s, lengths, boundaries=True)
    real_tokens = sum(lengths)
    flops = train_flops(model, s, lengths)
    peak = matmul_peak_tflops(s["device"])
    inputs = {}

    held = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        if PROFILE and s["device"] == "cuda":  # what the forward keeps for the backward (and the weights, states)
            held.append(torch.cuda.memory_allocated() / 2**30)
        loss.backward()
        optimizer.step()

    rows = []
    for competitor in TRAINING_COMPETITORS if not packed else COMPETITORS:
        why = available(competitor)
        if why:
            rows.append(dict(competitor=competitor, skipped=why))
            continue
        inputs = dict(padding_free if competitor in PADDING_FREE else batch)
        if competitor != "autoflash-cache-on":
            inputs["use_cache"] = False
        with competing_as(model, competitor):
            try:
                for _ in range(s["warmup"]):
                    step()
                reset_memory(s["device"])
                times = [timed(step, s["device"]) for _ in range(s["steps"])]
                median = statistics.median(times)
                rows.append(dict(competitor=competitor, step_ms=median * 1e3, tokens_per_s=real_tokens / median,
                                 peak_gib=peak_gib(s["device"]), mfu=flops / median / 1e12 / peak,
                                 backend=_backend_used()))
                if PROFILE and competitor in ("autoflash", "autoflash-torch", *PADDING_FREE, "flash_attention_4"):
                    profiled = kernel_time_by_kind(step, s["device"])
                    if profiled:
                        # a faster kernel that shortens no step leaves the GPU waiting for the host: the step
                        # (timed unprofiled) less its kernel time, with the host syncs that make it wait, and
                        # how long the host takes to hand the step over (near the step's time: host-bound)
                        profiled["GPU idle"] = round(median * 1e3 - profiled["total"], 1)
                        profiled["host ms"] = round(timed(step, s["device"], wait=False) * 1e3, 1)
                    rows[-1]["profile"] = profiled
                    rows[-1]["profile"]["GiB held after forward"] = round(held[-1], 2) if held else None
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                rows.append(dict(competitor=competitor, skipped="out of memory"))
            reset_memory(s["device"])
    return dict(lengths=lengths, real_tokens=real_tokens, padded_tokens=len(lengths) * max(lengths),
                matmul_peak_tflops=peak, rows=rows)


PROFILE = False

KINDS = (  # substrings of CUDA kernel names, first match wins
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("loss/softmax", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("gather/scatter/copy", ("index", "gather", "scatter", "catarray", "copy", "fill", "pad")),
    ("elementwise/norm/rope", ("elementwise", "reduce", "vectorized", "unrolled")),
)


# CUDA runtime calls that block the host until the GPU catches up (`.item()`, `nonzero`, a `tolist`)
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def kernel_time_by_kind(step, device) -> dict:
    """CUDA kernel time of one step (ms), grouped by kind of kernel, and the host syncs it made."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return {}
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        sync(device)
    grouped, syncs = {}, -1  # -1: the sync above, which closes the step, is the profiler's, not the step's
    for event in prof.key_averages():
        if event.key in HOST_SYNCS:
            syncs += event.count
        if event.device_type != DeviceType.CUDA:  # kernels only: CPU ops would count their kernels again
            continue
        total = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        name = event.key.lower()
        kind = next((k for k, marks in KINDS if any(m in name for m in marks)), "other")
        grouped[kind] = grouped.get(kind, 0.0) + total / 1e3
    grouped["total"] = sum(grouped.values())
    return {**{k: round(v, 1) for k, v in grouped.items()}, "host syncs": syncs}


def _backend_used():
    from autoflash import dispatch

    return ",".join(sorted({f"{k}:{d.backend}" for k, d in dispatch.last_decisions.items()})) or "-"


# -- W2: decoding ----------------------------------------------------------------------------------

DECODE_MODES = {
    "dynamic": "plain generate(): DynamicCache, uncompiled",
    "static": "static cache, uncompiled (disable_compile=True)",
    "static compiled": "static cache, compiled by transformers itself (its default compile_config: CUDA graphs)",
    "reduce-overhead": "static cache, the user's torch.compile(model.forward, mode='reduce-overhead')",
}


def decode_prompts(s, batch):
    """Batch 16: left-padded prompts U(prompt_min, prompt_max); batch 1: one prompt of 700 tokens."""
    generator = torch.Generator().manual_seed(2)
    if batch == 1:
        lengths = [min(700, s["prompt_max"])]
    else:
        lengths = torch.randint(s["prompt_min"], s["prompt_max"] + 1, (batch,), generator=generator).tolist()
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    ids = torch.randint(3, s["vocab"], mask.shape, generator=generator).masked_fill(mask == 0, 0)
    return lengths, ids.to(s["device"]), mask.to(s["device"])


def run_decoding(s):
    model = build_model(s).eval()
    new = s["new_tokens"]
    rows = []
    # smoke (CPU): transformers compiles nothing there, and inductor's CPU compile of every row takes minutes
    batches = DECODE_BATCHES or ([s["decode_batch"]] if s["device"] == "cpu" else [s["decode_batch"], 1])
    modes = DECODE_MODES_RUN or [m for m in DECODE_MODES if s["device"] != "cpu" or m != "reduce-overhead"]
    for batch in batches:
        lengths, ids, mask = decode_prompts(s, batch)
        for mode in modes:
            runnable = [c for c in COMPETITORS if not available(c)]
            rows += [dict(competitor=c, cache=mode, batch=batch, skipped=available(c))
                     for c in COMPETITORS if available(c)]
            if mode in UNCOMPILED_MODES:
                rows += _interleaved_decode_rows(model, s, runnable, mode, batch, ids, mask, new)
                continue
            for competitor in runnable:
                rows.append(_decode_row(model, s, competitor, mode, batch, ids, mask, new))
                reset_memory(s["device"])
    return dict(prompt_lengths=lengths, new_tokens=new, modes=DECODE_MODES, rows=rows)


UNCOMPILED_MODES = ("dynamic", "static")


def _interleaved_decode_rows(model, s, competitors, mode, batch, ids, mask, new):
    """Uncompiled decoding is bound by the host, whose speed drifts by tens of percent within minutes
    on a shared machine (docs/findings.md): every competitor is timed once per round, rounds
    interleaved, and the median taken, so that drift hits all of them alike."""
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if mode == "static":
        settings.update(cache_implementation="static", disable_compile=True)
    rounds = 2 if s["device"] == "cpu" else 5
    first, times, backend = {}, {c: [] for c in competitors}, {}

    def run(competitor):
        with competing_as(model, competitor), torch.no_grad():
            elapsed = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **settings), s["device"])
            backend[competitor] = _backend_used()
            return elapsed

    for competitor in competitors:
        first[competitor] = run(competitor)
    for _ in range(rounds):
        for competitor in competitors:
            times[competitor].append(run(competitor))
    reset_memory(s["device"])
    return [dict(competitor=c, cache=mode, batch=batch, tokens_per_s=batch * new / statistics.median(times[c]),
                 first_call_s=first[c], backend=backend[c], rounds=rounds) for c in competitors]


def _decode_row(model, s, competitor, mode, batch, ids, mask, new):
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if mode != "dynamic":
        settings["cache_implementation"] = "static"
    if mode in ("static", "reduce-overhead"):
        settings["disable_compile"] = True
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)  # transformers keeps its compiled forward on the model
    forward = model.__dict__.pop("forward", None)
    with competing_as(model, competitor), torch.no_grad():
        if mode == "reduce-overhead":
            model.forward = torch.compile(type(model).forward.__get__(model), mode="reduce-overhead")
        try:
            cold = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **settings), s["device"])
            times = [timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **settings), s["device"])
                     for _ in range(2)]
            median = statistics.median(times)
            return dict(competitor=competitor, cache=mode, batch=batch, tokens_per_s=batch * new / median,
                        first_call_s=cold, backend=_backend_used())
        except Exception as exc:  # noqa: BLE001
            if mode == "reduce-overhead" and "overwritten by a subsequent run" in str(exc):
                # transformers 5.17's generate() itself, with sdpa and autoflash off too (docs/findings.md)
                return dict(competitor=competitor, cache=mode, batch=batch,
                            skipped="generate() reads a CUDA-graph output after its next replay (transformers)")
            if not is_oom(exc):
                raise
            return dict(competitor=competitor, cache=mode, batch=batch, skipped="out of memory")
        finally:
            model.__dict__.pop("forward", None)
            if forward is not None:
                model.forward = forward
            model.__dict__.pop("_compiled_call", None)
            torch._dynamo.reset()


# -- W3: kernels alone -----------------------------------------------------------------------------

def kernel_functions(device):
    """name -> fn(q, k, v) on (batch, len, heads, dim) tensors, causal, GQA."""
    import torch.nn.functional as F

    fns = {}
    try:
        from flash_attn import flash_attn_func

        fns["flash_attn FA2"] = lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    except Exception:  # noqa: BLE001
        pass

    def sdpa_with(backends):
        from torch.nn.attention import sdpa_kernel

        def fn(q, k, v):
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, enable_gqa=True)
            return out.transpose(1, 2)

        return fn

    if device == "cuda":
        from torch.nn.attention import SDPBackend

        fns["torch built-in (sdpa flash)"] = sdpa_with([SDPBackend.FLASH_ATTENTION])
    fns["sdpa (default choice)"] = sdpa_with(None)
    return fns


def autoflash_kernel_functions():
    """name -> prepare(q, k, v, lengths) -> fn() through autoflash's own backends: their run() with a varlen
    layout of ``lengths`` packed in one row (what the whole-model path hands them). The layout and the
    backend's decision are made once, in prepare, as the model makes them once per forward: the timed
    calls hold only what a layer's attention call does."""
    from autoflash import dispatch
    from autoflash.call import AttentionCall, capability_of
    from autoflash.layout import Layout

    def preparer(backend):
        def prepare(q, k, v, lengths):
            total = sum(lengths)
            cu = torch.tensor([0] + lengths, device=q.device).cumsum(0).to(torch.int32)
            layout = Layout(kind="varlen", batch=1, q_len=total, kv_len=total, cu_seqlens=cu, max_seqlen=max(lengths),
                            total=total)
            call = AttentionCall(kind="varlen", device_type=q.device.type, capability=capability_of(q.device),
                                 dtype=q.dtype, head_dim=q.shape[-1], num_heads=q.shape[2], num_kv_heads=k.shape[2],
                                 q_len=total, kv_len=total, dropout=0.0, causal=True, needs_grad=q.requires_grad)
            why = backend.reasons_not_supported(call)
            if why:
                raise RuntimeError("; ".join(why))
            heads_first = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return lambda: backend.run(*heads_first, layout, call, q.shape[-1] ** -0.5)

        return prepare

    return {f"autoflash {name} (varlen)": preparer(dispatch.backend(name)) for name in ("flash_attn_4", "flash_attn",
                                                                                       "torch")}


QUEUED = 10  # W3: calls between two syncs in the "queued" timing


def kernel_rates(forward, forward_backward, flops, device) -> dict:
    """TFLOP/s forward and forward+backward (backward counted as 2.5x forward), of one call timed alone
    (synced before and after: its host time counts in full) and of QUEUED calls between two syncs (as in
    a training step, where the host runs ahead of the GPU)."""
    alone = statistics.median([timed(forward, device) for _ in range(10)])
    alone_both = statistics.median([timed(forward_backward, device) for _ in range(10)])
    queued = statistics.median([timed(lambda: [forward() for _ in range(QUEUED)], device) for _ in range(3)])
    queued_both = statistics.median([timed(lambda: [forward_backward() for _ in range(QUEUED)], device)
                                     for _ in range(3)])
    return dict(fwd_tflops=flops / alone / 1e12, fwd_bwd_tflops=3.5 * flops / alone_both / 1e12,
                fwd_tflops_queued=QUEUED * flops / queued / 1e12,
                fwd_bwd_tflops_queued=QUEUED * 3.5 * flops / queued_both / 1e12)


def run_kernels(s):
    device, dtype = s["device"], s["dtype"]
    heads, kv_heads, dim = s["heads"], s["kv_heads"], s["hidden"] // s["heads"]
    peak = matmul_peak_tflops(device)
    rows = []
    for name, fn in kernel_functions(device).items():
        for length in s["kernel_lengths"]:
            batch = max(1, s["kernel_tokens"] // length)
            q = torch.randn(batch, length, heads, dim, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(batch, length, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(batch, length, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(batch, length, heads, dim, device=device, dtype=dtype)
            flops = 4 * batch * heads * dim * length * length / 2  # causal forward
            try:
                for _ in range(3):
                    fn(q, k, v).backward(grad)
                rows.append(dict(kernel=name, length=length, batch=batch, **kernel_rates(
                    lambda: fn(q, k, v), lambda: fn(q, k, v).backward(grad), flops, device)))
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(kernel=name, length=length, skipped=f"{type(exc).__name__}: {str(exc)[:80]}"))
    # through autoflash's backends, packed in one row: equal lengths as above, then W1's lengths
    shapes = [(n, [n] * max(1, s["kernel_tokens"] // n)) for n in s["kernel_lengths"]]
    shapes.append(("W1 lengths", lengths_for(s)))
    for name, prepare in autoflash_kernel_functions().items():
        for label, lengths in shapes:
            total = sum(lengths)
            q = torch.randn(1, total, heads, dim, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(1, total, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(1, total, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(1, total, heads, dim, device=device, dtype=dtype)
            flops = sum(4 * heads * dim * n * n / 2 for n in lengths)
            try:
                fn = prepare(q, k, v, lengths)
                for _ in range(3):
                    fn().backward(grad)
                rows.append(dict(kernel=name, length=label, batch=len(lengths), **kernel_rates(
                    fn, lambda: fn().backward(grad), flops, device)))
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(kernel=name, length=label, skipped=f"{type(exc).__name__}: {str(exc)[:100]}"))
    return dict(matmul_peak_tflops=peak, rows=rows)


# -- W4: longest sequence --------------------------------------------------------------------------

def run_long(s):
    model = build_model(s)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    rows = []
    for competitor in COMPETITORS:
        why = available(competitor)
        if why:
            rows.append(dict(competitor=competitor, skipped=why))
            continue
        longest, tried = 0, []
        with competing_as(model, competitor):
            for length in s["long_lengths"]:
                ids = torch.randint(3, s["vocab"], (1, length), device=s["device"])
                reset_memory(s["device"])
                try:
                    optimizer.zero_grad(set_to_none=True)
                    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                    optimizer.step()
                    sync(s["device"])
                    longest = length
                    tried.append((length, round(peak_gib(s["device"]), 1)))
                except Exception as exc:  # noqa: BLE001
                    if not is_oom(exc):
                        raise
                    tried.append((length, "OOM"))
                    break
                finally:
                    del ids
                    optimizer.zero_grad(set_to_none=True)
                    reset_memory(s["device"])
        rows.append(dict(competitor=competitor, longest=longest, tried=tried))
    return dict(rows=rows, memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30
                if s["device"] == "cuda" else None)


# -- reporting -------------------------------------------------------------------------------------

def add_ratios(rows, key):
    """Each row's `key` over flash_attention_2's, sdpa's and the padding-free flash_attention_2 run's
    (x_flash_attention_2 / x_sdpa / "x pf" in the table)."""
    by = {r["competitor"]: r.get(key) for r in rows if key in r}
    for r in rows:
        if key in r:
            for base in ("flash_attention_2", "sdpa", PADDING_FREE_FA2):
                if by.get(base):
                    r[f"x_{base}"] = r[key] / by[base]


def _competitor_lines(rows, header, cells):
    """A table of competitors: `cells(row)` formats a measured row; skipped rows say why."""
    padding_free = any(f"x_{PADDING_FREE_FA2}" in r for r in rows)
    lines = [f"{'competitor':<26}{header}{'x fa2':>7}{'x sdpa':>7}" + (f"{'x pf':>7}" if padding_free else "")
             + "  backend"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['competitor']:<26}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['competitor']:<26}{cells(r)}{r.get('x_flash_attention_2', float('nan')):>7.2f}"
                     f"{r.get('x_sdpa', float('nan')):>7.2f}"
                     + (f"{r.get('x_' + PADDING_FREE_FA2, float('nan')):>7.2f}" if padding_free else "")
                     + f"  {r['backend']}")
    return lines


def table(workload, result) -> str:
    family = (result.get("environment") or {}).get("family", "llama")
    lines = [f"== {workload} ==" + ("" if family == "llama" else f" ({family}-shaped model, same sizes)")]
    if workload in ("w1", "w1packed"):
        add_ratios(result["rows"], "tokens_per_s")
        lines.append(f"real tokens {result['real_tokens']}, padded grid {result['padded_tokens']}, "
                     f"matmul peak {result['matmul_peak_tflops']:.0f} TFLOP/s")
        lines += _competitor_lines(
            result["rows"], f"{'tokens/s':>10}{'step ms':>9}{'peak GiB':>9}{'MFU':>7}",
            lambda r: f"{r['tokens_per_s']:>10.0f}{r['step_ms']:>9.1f}{r['peak_gib']:>9.1f}{r['mfu']:>7.1%}")
        for r in result["rows"]:
            if r.get("profile"):
                # GPU idle: the step less its kernels; host ms: until the step returns, not waiting for the GPU
                lines.append(f"  profile of {r['competitor']} (kernel ms by kind, GPU idle, host syncs, host ms): " +
                             ", ".join(f"{k} {v}" for k, v in r["profile"].items()))
    elif workload == "w2":
        for batch in dict.fromkeys(r["batch"] for r in result["rows"]):
            for mode in dict.fromkeys(r["cache"] for r in result["rows"]):
                rows = [r for r in result["rows"] if r["cache"] == mode and r["batch"] == batch]
                add_ratios(rows, "tokens_per_s")
                lines.append(f"batch {batch}, {mode}: {result['modes'][mode]}; {result['new_tokens']} new tokens")
                lines += _competitor_lines(rows, f"{'tokens/s':>10}{'1st call s':>11}",
                                           lambda r: f"{r['tokens_per_s']:>10.0f}{r['first_call_s']:>11.2f}")
    elif workload == "w3":
        lines.append(f"matmul peak {result['matmul_peak_tflops']:.0f} TFLOP/s; TFLOP/s forward / forward+backward")
        for suffix, what in (("", "one call timed alone"), ("_queued", f"{QUEUED} calls between two syncs")):
            if not any(f"fwd_tflops{suffix}" in r for r in result["rows"]):
                continue  # (results saved before the queued timing existed)
            lines.append(f"-- {what}")
            header = None
            for kernel in dict.fromkeys(r["kernel"] for r in result["rows"]):
                mine = [r for r in result["rows"] if r["kernel"] == kernel]
                if header != [r["length"] for r in mine]:  # bare kernels by length, autoflash's backends by shape
                    header = [r["length"] for r in mine]
                    lines.append(f"{'kernel':<34}" + "".join(f"{h:>14}" for h in header))
                cells = ["skipped" if "skipped" in r else
                         f"{r[f'fwd_tflops{suffix}']:.0f}/{r[f'fwd_bwd_tflops{suffix}']:.0f}" for r in mine]
                lines.append(f"{kernel:<34}" + "".join(f"{c:>14}" for c in cells))
        for reason in dict.fromkeys(f"{r['kernel']}: {r['skipped']}" for r in result["rows"] if "skipped" in r):
            lines.append(f"  skipped {reason}")
    else:
        lines.append(f"{'competitor':<18}{'longest':>10}  tried (length, peak GiB)")
        for r in result["rows"]:
            lines.append(f"{r['competitor']:<18}  skipped: {r['skipped']}" if "skipped" in r else
                         f"{r['competitor']:<18}{r['longest']:>10}  {r['tried']}")
    return "\n".join(lines)


def run_one(workload: str, smoke: bool, out: Path) -> None:
    import autoflash

    if not autoflash.enable():
        raise SystemExit("autoflash is not active; run `autoflash doctor`")
    s = sizes(smoke)
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    result = {"w1": lambda: run_training(s, packed=False), "w1packed": lambda: run_training(s, packed=True),
              "w2": lambda: run_decoding(s), "w3": lambda: run_kernels(s), "w4": lambda: run_long(s)}[workload]()
    result["environment"] = dict(environment(s), family=FAMILY)
    text = table(workload, result)
    out.mkdir(parents=True, exist_ok=True)
    name = workload if FAMILY == "llama" else f"{workload}-{FAMILY}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    print(text)
    from plots import plot

    print(plot(workload, result, out / f"{name}.png"))


def environment(s) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"gpu": torch.cuda.get_device_name(0) if s["device"] == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": version("transformers"), "flash-attn": version("flash-attn") or version("flash_attn"),
            "flash-attn-4": version("flash-attn-4"),
            "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=WORKLOADS + ["all"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script runs")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--profile", action="store_true",
                        help="w1/w1packed: one step's CUDA kernel time by kind, GPU idle time, host syncs, host time")
    parser.add_argument("--decode-batch", type=int, action="append", help="w2: batch sizes (default: 16 and 1)")
    parser.add_argument("--decode-mode", action="append", choices=list(DECODE_MODES), help="w2: modes (default: all)")
    parser.add_argument("--family", choices=list(FAMILY_MODELS), default="llama",
                        help="w1/w1packed/w2: the model family built at the same sizes (default: llama)")
    args = parser.parse_args(argv)
    global PROFILE, DECODE_BATCHES, DECODE_MODES_RUN, FAMILY
    PROFILE = args.profile
    FAMILY = args.family
    DECODE_BATCHES, DECODE_MODES_RUN = args.decode_batch, args.decode_mode
    if args.workload != "all":
        run_one(args.workload, args.smoke, args.out)
        return 0
    failed = []
    for workload in WORKLOADS:  # one process each: no allocator state or compiled graph carries over
        command = [sys.executable, __file__, workload, "--out", str(args.out), "--family", FAMILY] + \
            (["--smoke"] if args.smoke else [])
        if subprocess.run(command).returncode:
            failed.append(workload)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
