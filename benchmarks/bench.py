"""autoflash against transformers' eager, sdpa and flash_attention_2, side by side.

One process per workload (``python benchmarks/bench.py all`` spawns them); inside a
workload every competitor runs in the same process, one after another, on the same model
and the same data (the competitors: ``harness.py``).

Workloads (sizes of ../docs/benchmarks.md; ``--smoke`` shrinks everything to run on a CPU in CI),
one module each, what it measures in its docstring:

    w1         w1_training.py    train: padded batch (``w1``) or the same tokens packed in one row
    w1packed                     (``w1packed``); ``w1 --profile`` adds one step's time by kernel kind
    w2         w2_decoding.py    decode: greedy tokens per mode of cache and compilation, batch 16 and 1
    w3         w3_kernels.py     attention kernels alone, bare and through autoflash's backends
    w4         w4_long.py        longest single sequence that trains one step

Prints a table per workload and writes ``OUT/<workload>.json`` and ``OUT/<workload>.png``.
Nothing here is asserted: tests run ``--smoke`` only so that the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

import w1_training
import w2_decoding
import w3_kernels
import w4_long
from harness import FAMILY_MODELS, environment, sizes, title

WORKLOADS = ["w1", "w1packed", "w2", "w3", "w4"]
TABLES = {"w1": w1_training, "w1packed": w1_training, "w2": w2_decoding, "w3": w3_kernels, "w4": w4_long}


def run_one(workload: str, smoke: bool, out: Path, family: str = "llama", profile: bool = False,
            decode_batches: list[int] | None = None, decode_modes: list[str] | None = None) -> None:
    import autoflash

    if not autoflash.enable():
        raise SystemExit("autoflash is not active; run `autoflash doctor`")
    s = sizes(smoke)
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    result = {"w1": lambda: w1_training.run_training(s, packed=False, family=family, profile=profile),
              "w1packed": lambda: w1_training.run_training(s, packed=True, family=family, profile=profile),
              "w2": lambda: w2_decoding.run_decoding(s, family, decode_batches, decode_modes),
              "w3": lambda: w3_kernels.run_kernels(s), "w4": lambda: w4_long.run_long(s, family)}[workload]()
    result["environment"] = dict(environment(s), family=family)
    text = table(workload, result)
    out.mkdir(parents=True, exist_ok=True)
    name = workload if family == "llama" else f"{workload}-{family}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    print(text)
    from plots import plot

    print(plot(workload, result, out / f"{name}.png"))


def table(workload, result) -> str:
    return "\n".join([title(workload, result)] + TABLES[workload].table_lines(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=WORKLOADS + ["all"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script runs")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--profile", action="store_true",
                        help="w1/w1packed: one step's CUDA kernel time by kind, GPU idle time, host syncs, host time")
    parser.add_argument("--decode-batch", type=int, action="append", help="w2: batch sizes (default: 16 and 1)")
    parser.add_argument("--decode-mode", action="append", choices=list(w2_decoding.DECODE_MODES),
                        help="w2: modes (default: all)")
    parser.add_argument("--family", choices=list(FAMILY_MODELS), default="llama",
                        help="w1/w1packed/w2: the model family built at the same sizes (default: llama)")
    args = parser.parse_args(argv)
    if args.workload != "all":
        run_one(args.workload, args.smoke, args.out, args.family, args.profile, args.decode_batch, args.decode_mode)
        return 0
    failed = []
    for workload in WORKLOADS:  # one process each: no allocator state or compiled graph carries over
        command = [sys.executable, __file__, workload, "--out", str(args.out), "--family", args.family] + \
            (["--smoke"] if args.smoke else [])
        if subprocess.run(command).returncode:
            failed.append(workload)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
