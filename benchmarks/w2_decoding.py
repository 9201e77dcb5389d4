"""W2: greedy decoding, the competitors' generated tokens per second and the first call's time.

    w2         decode: 128 greedy tokens at batch 16 (left-padded prompts U(64, 1024)) and batch 1 (700
               tokens); dynamic cache, static cache uncompiled, compiled by transformers (its default,
               CUDA graphs) and by the user's torch.compile(mode="reduce-overhead"); uncompiled modes time
               the competitors interleaved, round after round (the host drifts)

(``--smoke`` shrinks everything to run on a CPU; ``--decode-batch`` and ``--decode-mode`` pick batches
and modes.) ``decode_prompts`` is shared with ``profile_decode.py``.
"""

from __future__ import annotations

import statistics

import torch

from harness import (COMPETITORS, add_ratios, available, backend_used, build_model, competing_as, competitor_lines,
                     is_oom, reset_memory, timed)

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


def run_decoding(s, family: str = "llama", batches: list[int] | None = None, modes: list[str] | None = None):
    """``batches`` and ``modes``: --decode-batch and --decode-mode (None: the defaults below)."""
    model = build_model(s, family).eval()
    new = s["new_tokens"]
    rows = []
    # smoke (CPU): transformers compiles nothing there, and inductor's CPU compile of every row takes minutes
    batches = batches or ([s["decode_batch"]] if s["device"] == "cpu" else [s["decode_batch"], 1])
    modes = modes or [m for m in DECODE_MODES if s["device"] != "cpu" or m != "reduce-overhead"]
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
            backend[competitor] = backend_used()
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
                        first_call_s=cold, backend=backend_used())
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


def table_lines(result) -> list[str]:
    lines = []
    for batch in dict.fromkeys(r["batch"] for r in result["rows"]):
        for mode in dict.fromkeys(r["cache"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["cache"] == mode and r["batch"] == batch]
            add_ratios(rows, "tokens_per_s")
            lines.append(f"batch {batch}, {mode}: {result['modes'][mode]}; {result['new_tokens']} new tokens")
            lines += competitor_lines(rows, f"{'tokens/s':>10}{'1st call s':>11}",
                                      lambda r: f"{r['tokens_per_s']:>10.0f}{r['first_call_s']:>11.2f}")
    return lines
