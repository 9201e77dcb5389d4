"""W5: transformers' continuous batching (``generate_batch``) with autoflash installed, against transformers alone.

Two parts, every competitor in this one process, one after another, on the same weights:

    agreement   a LLaMA of hidden 1024, 16/4 heads, 4 layers, its LM head scaled so that greedy tokens are not
                near-ties; 16 requests of 16-300 prompt tokens, 32 greedy tokens; each request's
                ``generate_batch`` tokens against its own plain ``generate()`` tokens (same competitor, same
                process): how many requests are identical, and the first token where the others part
    throughput  W2's model (LLaMA-3-8B-shaped layers x4); 64 requests, prompts U(64, 1024), 128 new tokens;
                generated tokens per second of one ``generate_batch`` after a warm-up call; the competitors
                interleaved, round after round, the median of each reported

Competitors: ``autoflash`` (the model as a user loads it with autoflash installed), transformers' own
``flash_attention_2`` (needs flash-attn) and ``sdpa`` (autoflash switched off while the model is set).

    python benchmarks/continuous_batching.py [--smoke] [--out DIR] [--rounds R] [--attention-ceiling]

``--attention-ceiling`` (GPU, flash-attn) adds a third part: transformers' flash_attention_2 served
as usual, interleaved with the same serving where flash-attn's two entry points (varlen prefill and
the paged decode kernel) return zeros at once. The time left is everything but attention; their
ratio bounds what any attention kernel, autoflash's or another, can gain on this workload.

Prints two tables and writes ``OUT/w5.json``. Nothing here is asserted; tests run ``--smoke``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (the competitors and W2's model, shared with the other workloads)

COMPETITORS = ["autoflash", "flash_attention_2", "sdpa"]


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(agree=dict(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2, vocab=256, requests=4,
                               prompt=(3, 20), new=4),
                    speed=dict(requests=4, prompt=(3, 20), new=4), device="cpu", dtype=torch.float32)
    return dict(agree=dict(hidden=1024, heads=16, kv_heads=4, mlp=2816, layers=4, vocab=32000, requests=16,
                           prompt=(16, 300), new=32),
                speed=dict(requests=64, prompt=(64, 1024), new=128), device="cuda", dtype=torch.bfloat16)


def agreement_model(s):
    import transformers

    a = s["agree"]
    config = transformers.LlamaConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["mlp"],
                                      num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
                                      num_key_value_heads=a["kv_heads"], pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(s["device"]):
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # greedy tokens far from ties: a parting token is a real difference
    return model.to(s["dtype"]).eval()


def prompts(n, lengths, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    sizes_ = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=generator).tolist()
    return [torch.randint(3, vocab, (size,), generator=generator).tolist() for size in sizes_]


def generation_config(new):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)


def batched(model, inputs, new):
    outputs = model.generate_batch(inputs=inputs, generation_config=generation_config(new), progress_bar=False)
    by_prompt = {tuple(o.prompt_ids): o.generated_tokens for o in outputs.values()}
    return [by_prompt[tuple(p)] for p in inputs]


def agreement(model, s, competitor):
    a = s["agree"]
    inputs = prompts(a["requests"], a["prompt"], a["vocab"], seed=1)
    with harness.competing_as(model, competitor):
        cb = batched(model, inputs, a["new"])
        parted = []
        for p, tokens in zip(inputs, cb):
            alone = model.generate(torch.tensor([p], device=s["device"]), generation_config=generation_config(a["new"]))
            alone = alone[0, len(p):].tolist()
            parted.append(next((i + 1 for i, (x, y) in enumerate(zip(tokens, alone)) if x != y),
                               None if tokens == alone else min(len(tokens), len(alone)) + 1))
    different = [i for i in parted if i is not None]
    return {"identical": len(parted) - len(different), "requests": len(parted),
            "parting_tokens": sorted(different)}


def throughput(model, s, competitor, inputs):
    sp = s["speed"]
    with harness.competing_as(model, competitor):
        batched(model, inputs[:8], 8)  # warm-up: CUDA graphs, kernels loaded
        harness.sync(s["device"])
        start = time.perf_counter()
        out = batched(model, inputs, sp["new"])
        harness.sync(s["device"])
        seconds = time.perf_counter() - start
    return sum(len(t) for t in out), seconds, model.config._attn_implementation


def throughputs(model, s, competitors, rounds):
    """Each competitor once per round, round after round (the GPU's clocks and the host drift between runs):
    the median round of each."""
    inputs = prompts(s["speed"]["requests"], s["speed"]["prompt"], model.config.vocab_size, seed=2)
    runs = {c: [] for c in competitors}
    for _ in range(rounds):
        for competitor in competitors:
            runs[competitor].append(throughput(model, s, competitor, inputs))
    rows = {}
    for competitor, timings in runs.items():
        tokens, _, after = timings[0]
        rates = sorted(t / sec for t, sec, _ in timings)
        rows[competitor] = {"tokens": tokens, "tokens_per_s": round(statistics.median(rates), 1),
                            "rounds": [round(r, 1) for r in rates], "attn_after": after}
    return rows


@contextlib.contextmanager
def attention_zeroed(zeroed):
    """While ``zeroed[0]`` is true, transformers' flash-attn entry points return zeros without running.

    Bound once for the whole part (transformers keeps the functions it imported in module globals,
    and a compiled decode step guards on them), toggled per run by the caller."""
    from transformers import modeling_flash_attention_utils as fa

    kept = {}
    for name in ("_flash_varlen_fn", "_flash_with_kvcache_fn"):
        real = getattr(fa, name)
        if real is None:
            continue

        @functools.wraps(real)
        def maybe_zero(q, *args, _real=real, **kwargs):
            return q.new_zeros(q.shape) if zeroed[0] else _real(q, *args, **kwargs)

        kept[name] = real
        setattr(fa, name, maybe_zero)
    try:
        yield sorted(kept)
    finally:
        for name, real in kept.items():
            setattr(fa, name, real)


def attention_ceiling(model, s, rounds):
    """Generated tokens/s of flash_attention_2 serving, and of the same with attention's kernels skipped."""
    inputs = prompts(s["speed"]["requests"], s["speed"]["prompt"], model.config.vocab_size, seed=2)
    zeroed = [False]
    runs = {"flash_attention_2": [], "attention skipped": []}
    tokens = {}
    with harness.competing_as(model, "flash_attention_2"):
        batched(model, inputs[:8], 8)  # imports flash-attn into transformers' globals
    with attention_zeroed(zeroed) as patched:
        for _ in range(rounds):
            for name in runs:
                zeroed[0] = name == "attention skipped"
                with harness.competing_as(model, "flash_attention_2"):
                    batched(model, inputs[:8], 8)
                    harness.sync(s["device"])
                    start = time.perf_counter()
                    out = batched(model, inputs, s["speed"]["new"])
                    harness.sync(s["device"])
                    runs[name].append(sum(len(t) for t in out) / (time.perf_counter() - start))
                tokens[name] = out
        zeroed[0] = False
    differ = sum(a != b for a, b in zip(tokens["flash_attention_2"], tokens["attention skipped"]))
    rows = {name: {"tokens_per_s": round(statistics.median(r), 1), "rounds": sorted(round(x, 1) for x in r)}
            for name, r in runs.items()}
    return {"rows": rows, "patched": patched, "requests_whose_tokens_changed": differ,
            "ceiling": round(rows["attention skipped"]["tokens_per_s"] / rows["flash_attention_2"]["tokens_per_s"], 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what the tests run)")
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (the median is reported)")
    parser.add_argument("--attention-ceiling", action="store_true",
                        help="also time flash_attention_2 serving with attention's kernels skipped (GPU)")
    args = parser.parse_args(argv)
    import autoflash

    autoflash.enable()
    s = sizes(args.smoke)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    small = agreement_model(s)
    big = None
    for competitor in COMPETITORS:
        why = harness.available(competitor)
        if why:
            rows[competitor] = {"skipped": why}
            continue
        rows[competitor] = {"agreement": agreement(small, s, competitor)}
    del small
    w2 = harness.sizes(args.smoke)
    big = harness.build_model(w2).eval()
    running = [c for c in COMPETITORS if "skipped" not in rows[c]]
    for competitor, row in throughputs(big, s, running, args.rounds).items():
        rows[competitor]["throughput"] = row
    result = {"workload": "w5", "environment": harness.environment(w2), "rows": rows,
              "handed_over": autoflash.status()["handed_over"]}
    if args.attention_ceiling and "flash_attention_2" in running:
        result["attention_ceiling"] = attention_ceiling(big, s, args.rounds)
    (out / "w5.json").write_text(json.dumps(result, indent=2))
    print(f"W5 continuous batching ({'smoke, CPU' if args.smoke else 'GPU'}): requests identical to generate()")
    for name, row in rows.items():
        if "skipped" in row:
            print(f"  {name:<18} skipped: {row['skipped']}")
            continue
        a = row["agreement"]
        print(f"  {name:<18} {a['identical']:>3} / {a['requests']}   parting at tokens {a['parting_tokens']}")
    print("W5 throughput: generated tokens/s of one generate_batch")
    base = rows.get("flash_attention_2", {}).get("throughput") or rows["sdpa"]["throughput"]
    for name, row in rows.items():
        if "throughput" in row:
            t = row["throughput"]
            print(f"  {name:<18} {t['tokens_per_s']:>10,.1f} tok/s  {t['tokens_per_s'] / base['tokens_per_s']:.2f}x"
                  f"   (rounds: {t['rounds']}; {t['tokens']} tokens; attention after: {t['attn_after']})")
    print("handed to transformers:", json.dumps(result["handed_over"]))
    if "attention_ceiling" in result:
        c = result["attention_ceiling"]
        print("W5 attention's share: flash_attention_2 serving, and the same with its attention kernels skipped "
              f"({', '.join(c['patched'])} return zeros)")
        for name, row in c["rows"].items():
            print(f"  {name:<18} {row['tokens_per_s']:>10,.1f} tok/s   (rounds: {row['rounds']})")
        print(f"  ceiling on any attention kernel's gain: {c['ceiling']:.2f}x "
              f"(tokens changed in {c['requests_whose_tokens_changed']} of {s['speed']['requests']} requests: "
              "the skip took effect)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
