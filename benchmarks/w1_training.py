"""W1: training steps, the competitors' tokens per second, peak memory and MFU.

    w1         train: LLaMA-3-8B-shaped layers x4, batch 8, lengths U(128, 4096), right padding
    w1packed   the same tokens packed into one row through position_ids

(``--smoke`` shrinks everything to run on a CPU.) Besides the competitors every workload has
(``harness``), W1 also runs:

    fa2 padding-free      the same real tokens packed into one row by the caller (position ids
                          restarting, cu_seq_lens_q/k, use_cache=False) with flash_attention_2
    flash_attention_4     transformers' FlashAttention-4 integration, padded, and ``fa4 padding-free`` the
                          same tokens packed by hand (rows only where transformers finds flash-attn-4)
    autoflash-per-layer   AUTOFLASH_UNPAD_MODEL=0: padding removed inside attention only
    autoflash-cache-on    the unchanged loop: use_cache left at its default (a cache is returned)
    autoflash-torch-per-layer

``w1 --profile``: the CUDA kernel time of one step by kind, the GPU's idle time (the step less its
kernels), its host syncs and the host's time until it returns: autoflash, autoflash-torch, the
padding-free runs and transformers' flash_attention_4.
"""

from __future__ import annotations

import statistics

import torch

from harness import (COMPETITORS, PADDING_FREE, PADDING_FREE_FA2, PADDING_FREE_FA4, VISION_LANGUAGE, add_ratios,
                     available, backend_used, build_model, competing_as, competitor_lines, is_oom, lengths_for,
                     matmul_peak_tflops, peak_gib, reset_memory, sync, timed)

# W1 adds: autoflash with padding removed per layer only (AUTOFLASH_UNPAD_MODEL=0), autoflash in
# the unchanged loop (use_cache left at its default), and the padding-free runs (harness.PADDING_FREE)
TRAINING_COMPETITORS = ["eager", "sdpa", "flash_attention_2", PADDING_FREE_FA2, "flash_attention_4", PADDING_FREE_FA4,
                        "autoflash", "autoflash-fa2",
                        "autoflash-per-layer", "autoflash-cache-on", "autoflash-torch", "autoflash-torch-per-layer"]


def padded_batch(s, lengths):
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(3, s["vocab"], (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.to(s["device"]) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def packed_batch(s, lengths, boundaries=False, family="llama"):
    """The padded batch's real tokens in one row; ``boundaries``: also cu_seq_lens_q/k, as
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) hands them to the model. A vision-language model's
    positions: M-RoPE's three rows after a text row, from which transformers reads the sequences."""
    padded = padded_batch(s, lengths)
    ids = torch.cat([padded["input_ids"][row, :n] for row, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(s["device"])
    labels = ids.clone()
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[0, starts.to(s["device"])] = -100
    if family in VISION_LANGUAGE:
        positions = positions[None].expand(4, 1, -1)
    batch = dict(input_ids=ids, position_ids=positions, labels=labels)
    if boundaries:
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(s["device"])
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return batch


def train_flops(model, s, lengths):
    per_token = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    attention = s["layers"] * 3 * 2 * s["heads"] * (s["hidden"] // s["heads"]) * sum(n * n for n in lengths)
    return 6 * per_token * sum(lengths) + attention


def run_training(s, packed: bool, family: str = "llama", profile: bool = False):
    model = build_model(s, family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=s["device"] == "cuda")
    lengths = lengths_for(s)
    batch = packed_batch(s, lengths, family=family) if packed else padded_batch(s, lengths)
    padding_free = packed_batch(s, lengths, boundaries=True, family=family)
    real_tokens = sum(lengths)
    flops = train_flops(model, s, lengths)
    peak = matmul_peak_tflops(s["device"])
    inputs = {}

    held = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        if profile and s["device"] == "cuda":  # what the forward keeps for the backward (and the weights, states)
            held.append(torch.cuda.memory_allocated() / 2**30)
        loss.backward()
        optimizer.step()

    rows = []
    for competitor in TRAINING_COMPETITORS if not packed else COMPETITORS:
        why = available(competitor, model)
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
                                 backend=backend_used()))
                if profile and competitor in ("autoflash", "autoflash-torch", *PADDING_FREE, "flash_attention_4"):
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


def table_lines(result) -> list[str]:
    add_ratios(result["rows"], "tokens_per_s")
    lines = [f"real tokens {result['real_tokens']}, padded grid {result['padded_tokens']}, "
             f"matmul peak {result['matmul_peak_tflops']:.0f} TFLOP/s"]
    lines += competitor_lines(
        result["rows"], f"{'tokens/s':>10}{'step ms':>9}{'peak GiB':>9}{'MFU':>7}",
        lambda r: f"{r['tokens_per_s']:>10.0f}{r['step_ms']:>9.1f}{r['peak_gib']:>9.1f}{r['mfu']:>7.1%}")
    for r in result["rows"]:
        if r.get("profile"):
            # GPU idle: the step less its kernels; host ms: until the step returns, not waiting for the GPU
            lines.append(f"  profile of {r['competitor']} (kernel ms by kind, GPU idle, host syncs, host ms): " +
                         ", ".join(f"{k} {v}" for k, v in r["profile"].items()))
    return lines
