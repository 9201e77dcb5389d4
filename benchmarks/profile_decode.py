"""Where a decode step's time goes: torch profiler over greedy decoding, per attention implementation.

    python benchmarks/profile_decode.py [--static]

Prints, for each implementation, the wall time per decode step, the GPU time its kernels
took, and the host time spent inside its attention and mask functions per step (kernel
launches included). Shapes are W2's (LLaMA-3-8B-shaped layers x4, 16 left-padded prompts).
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import autoflash
from bench import build_model, competing_as, sizes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--static", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    autoflash.enable()
    s = sizes(False)
    model = build_model(s).eval()
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(64, 1025, (16,), generator=generator).tolist()
    width = max(lengths)
    mask = torch.zeros(16, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    ids = torch.randint(3, s["vocab"], mask.shape, generator=generator).masked_fill(mask == 0, 0).cuda()
    mask = mask.cuda()
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    if args.static:
        settings.update(cache_implementation="static", disable_compile=True)
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

    print(f"{'implementation':<18}{'ms/step wall':>14}{'GPU ms/step':>13}{'attention+mask host ms/step':>29}")
    for competitor in ("sdpa", "autoflash"):
        with competing_as(model, competitor), torch.no_grad():
            name = model.config._attn_implementation
            originals = [(m, m[name]) for m in (ALL_ATTENTION_FUNCTIONS._global_mapping,
                                                ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)]
            for mapping, fn in originals:
                mapping[name] = timed(fn)
            model.generate(input_ids=ids, attention_mask=mask, **settings)
            torch.cuda.synchronize()
            spent[0] = 0.0
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, **settings)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
            host = spent[0]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model.generate(input_ids=ids, attention_mask=mask, **settings)
                torch.cuda.synchronize()
            for mapping, fn in originals:
                mapping[name] = fn
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events)
        steps = args.new_tokens
        print(f"{competitor:<18}{wall / steps * 1e3:>14.2f}{gpu_us / steps / 1e3:>13.2f}{host / steps * 1e3:>29.2f}")
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:6]
        for e in top:
            print(f"    {e.key[:60]:<60} {e.self_device_time_total / steps / 1e3:8.3f} ms/step GPU, {e.count} calls")


if __name__ == "__main__":
    main()
