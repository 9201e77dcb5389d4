"""Where a decode step's time goes: torch profiler over greedy decoding, per attention implementation.

    python benchmarks/profile_decode.py [--static | --compiled] [--batch N] [--rounds R]

Prints, for each implementation, the wall time per decode step, the GPU time its kernels
took, and the host time spent inside its attention and mask functions per step (kernel
launches included). Shapes are W2's (LLaMA-3-8B-shaped layers x4; batch 16: left-padded
prompts U(64, 1024); batch 1: one prompt of 700 tokens).

``--compiled`` is W2's "static compiled" mode (transformers compiles its own decode step with
CUDA graphs). Each implementation gets its own copy of the model (same weights), so both keep
their compiled program, and the timed runs are interleaved, ``--rounds`` of each, the median
reported: a single batch-1 run moved by a third between two machines (docs/findings.md 76).
"""

import argparse
import copy
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import autoflash
from harness import build_model, competing_as, sizes
from w2_decoding import decode_prompts

COMPETITORS = ("sdpa", "autoflash")


def main():
    parser = argparse.ArgumentParser()
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--static", action="store_true", help="static cache, uncompiled")
    mode.add_argument("--compiled", action="store_true", help="static cache, compiled by transformers itself")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="timed runs of each, interleaved (median reported)")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    autoflash.enable()
    s = sizes(False)
    first = build_model(s).eval()
    models = {"sdpa": first, "autoflash": copy.deepcopy(first)}
    _, ids, mask = decode_prompts(s, args.batch)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    if args.static or args.compiled:
        settings["cache_implementation"] = "static"
    if args.static:
        settings["disable_compile"] = True
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapper

    def generate(competitor, wrapped=False):
        model = models[competitor]
        with competing_as(model, competitor), torch.no_grad():
            name = model.config._attn_implementation
            originals = [(m, m[name]) for m in (ALL_ATTENTION_FUNCTIONS._global_mapping,
                                                ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)] if wrapped else []
            for mapping, fn in originals:
                mapping[name] = timed(fn)
            try:
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, **settings)
                torch.cuda.synchronize()
                return time.perf_counter() - start, out
            finally:
                for mapping, fn in originals:
                    mapping[name] = fn

    steps = args.new_tokens
    tokens = {}
    for competitor in COMPETITORS:  # warm-up: compiles (twice for transformers' compiled call), graphs captured
        generate(competitor)
        _, tokens[competitor] = generate(competitor)
    walls = {c: [] for c in COMPETITORS}
    for _ in range(args.rounds):
        for competitor in COMPETITORS:
            walls[competitor].append(generate(competitor)[0])
    same = (tokens["sdpa"] == tokens["autoflash"]).all(dim=1).sum().item()
    print(f"batch {args.batch}, {'compiled' if args.compiled else 'static' if args.static else 'dynamic'}, "
          f"{steps} new tokens, {args.rounds} interleaved rounds; rows with the same tokens: {same}/{args.batch}")
    print(f"{'implementation':<18}{'tok/s (median)':>15}{'rounds tok/s':>40}")
    for competitor, runs in walls.items():
        rates = [args.batch * steps / w for w in runs]
        print(f"{competitor:<18}{statistics.median(rates):>15,.1f}{str([round(r) for r in rates]):>40}")
    ratio = statistics.median(walls["sdpa"]) / statistics.median(walls["autoflash"])
    print(f"autoflash / sdpa: {ratio:.2f}x")

    print(f"{'implementation':<18}{'ms/step wall':>14}{'GPU ms/step':>13}{'attention+mask host ms/step':>29}")
    for competitor in COMPETITORS:
        spent[0] = 0.0
        wall, _ = generate(competitor, wrapped=not args.compiled)  # compiled: the wrappers would force a recompile
        host = spent[0]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate(competitor)
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events)
        print(f"{competitor:<18}{wall / steps * 1e3:>14.2f}{gpu_us / steps / 1e3:>13.2f}"
              f"{host / steps * 1e3 if not args.compiled else float('nan'):>29.2f}")
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:8]
        for e in top:
            print(f"    {e.key[:70]:<70} {e.self_device_time_total / steps / 1e3:8.3f} ms/step GPU, {e.count} calls")


if __name__ == "__main__":
    main()
