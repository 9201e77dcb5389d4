"""Training steps where no flash kernel serves and SDPA does (a CPU; float32 on a GPU; a GPU older than
Ampere): transformers' own sdpa against autoflash, padding removed for the whole model or per layer.

    python benchmarks/sdpa_training.py                                  # CPU, float32, the sizes below
    python benchmarks/sdpa_training.py --device cuda --dtype float32 --hidden 4096 --heads 32 --kv-heads 8

Each competitor runs in a process of its own (``AUTOFLASH_DISABLE=1`` for transformers' sdpa,
``AUTOFLASH_UNPAD_MODEL=0`` for the per-layer path), on the same random LLaMA and the same padded
batch: ``--batch`` sequences of lengths uniform in [max_len / 16, max_len], right padding. The
step is forward, backward and an SGD update; the table shows the fastest of ``--steps`` steps after
one warm-up, and the peak memory (GPU) or the process's peak resident memory (CPU).
Nothing here is asserted; ``--smoke`` runs tiny sizes so that a test can keep the script alive.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

COMPETITORS = {  # name -> environment
    "sdpa (transformers)": {"AUTOFLASH_DISABLE": "1"},
    "autoflash (whole model)": {},
    "autoflash (per layer)": {"AUTOFLASH_UNPAD_MODEL": "0"},
}


def one(args) -> dict:
    import resource
    import time

    import torch

    import autoflash  # noqa: F401 - activates where no autoflash.pth is installed (a checkout on PYTHONPATH)
    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = transformers.LlamaConfig(vocab_size=32000 if not args.smoke else 256, hidden_size=args.hidden,
                                      intermediate_size=int(args.hidden * 3.5), num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                      max_position_embeddings=max(8192, args.max_len), pad_token_id=0)
    torch.manual_seed(0)
    with device:
        model = transformers.LlamaForCausalLM(config).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, args.max_len // 16), args.max_len + 1, (args.batch,), generator=generator).tolist()
    ids = torch.randint(3, config.vocab_size, (args.batch, max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # (Linux: KiB)
    from autoflash import dispatch

    return dict(step_s=min(times), real_tokens=sum(lengths), padded_tokens=len(lengths) * max(lengths), peak_gib=peak,
                backend=",".join(sorted(f"{k}:{d.backend}" for k, d in dispatch.last_decisions.items())) or "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a competitor's own process
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.heads, args.kv_heads, args.layers, args.batch, args.max_len, args.steps = (32, 4, 2, 1, 3,
                                                                                                     32, 1)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    rows = {}
    for name, env in COMPETITORS.items():
        environment = {k: v for k, v in os.environ.items() if not k.startswith("AUTOFLASH_")}
        result = subprocess.run([sys.executable, __file__, *forwarded, "--one"], capture_output=True, text=True,
                                env={**environment, **env})
        if result.returncode != 0:
            print(f"{name}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows[name] = json.loads(result.stdout.strip().splitlines()[-1])
    first = next(iter(rows.values()))
    print(f"{args.device} {args.dtype}: hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, {args.layers} "
          f"layers, batch {args.batch}, lengths up to {args.max_len}: {first['real_tokens']} real tokens in a "
          f"{first['padded_tokens']}-token padded batch")
    reference = rows["sdpa (transformers)"]["step_s"]
    print(f"{'competitor':26} {'step s':>8} {'x sdpa':>7} {'peak GiB':>9}  backend")
    for name, row in rows.items():
        print(f"{name:26} {row['step_s']:8.3f} {reference / row['step_s']:7.2f} {row['peak_gib']:9.2f}  "
              f"{row['backend']}")
    if args.json:
        args.json.write_text(json.dumps(dict(arguments={k: v for k, v in vars(args).items() if k != "json"},
                                             rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
