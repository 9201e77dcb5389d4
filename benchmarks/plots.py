"""Figures of the benchmark results, drawn from their JSON (``bench.py`` calls ``plot`` after each run).

    python benchmarks/plots.py docs/benchmarks     # redraw every figure and the summary from the JSON there

One figure per workload: horizontal bars with the competitors' names readable, autoflash's
bars in colour and the others grey, the reference drawn as a dashed line (W1: the same tokens
packed padding-free by hand for flash_attention_2; W2: transformers' sdpa), W1's tokens/s and
peak memory side by side, and the machine, versions and date under the title.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

AUTOFLASH_COLOUR = "#d95f02"
OTHER_COLOUR = "#9e9e9e"
REFERENCE_COLOUR = "#1b9e77"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _caption(result) -> str:
    env = result.get("environment") or {}
    flash_attn = (env.get("flash-attn") or "-").split("+")[0]
    parts = ([f"{env['family']}-shaped model"] if env.get("family", "llama") != "llama" else []) + \
        [(env.get("gpu") or "").replace("NVIDIA ", ""), f"torch {(env.get('torch') or '').split('+')[0]}",
             f"transformers {env.get('transformers')}", f"flash-attn {flash_attn}", env.get("date")]
    return ", ".join(p for p in parts if p)


def _colour(competitor: str) -> str:
    return AUTOFLASH_COLOUR if competitor.startswith("autoflash") else OTHER_COLOUR


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _bars(ax, rows, key, unit, reference=None, log=False):
    """Horizontal bars, one per row (top to bottom in the given order); skipped rows say why."""
    rows = [r if _number(r.get(key)) or "skipped" in r else dict(r, skipped="not measured here") for r in rows]
    labels = [r["label"] for r in rows][::-1]
    values = [r[key] if _number(r.get(key)) else 0 for r in rows][::-1]
    ax.barh(labels, values, color=[_colour(r["competitor"]) for r in rows][::-1])
    top = max(values) if any(values) else 1
    for y, r in enumerate(rows[::-1]):
        if "skipped" in r:
            note = r["skipped"] if len(r["skipped"]) <= 70 else r["skipped"][:67] + "..."
            ax.text(top * 0.01 if not log else 1, y, f"  {note}", va="center", fontsize=6.5, color="#555")
        else:
            # the value sits right of its bar, on a white ground: neither the frame nor the reference strikes it
            ax.text(r[key], y, f" {r[key]:,.{1 if r[key] < 100 else 0}f}", va="center", fontsize=7,
                    bbox=dict(facecolor="white", edgecolor="none", pad=0.5))
    if reference:
        # named in a legend, not beside the line, where it crossed the bars' labels
        ax.axvline(reference[1], color=REFERENCE_COLOUR, linestyle="--", linewidth=1, label=reference[0], zorder=0)
        ax.legend(loc="lower right", fontsize=7, framealpha=1)
    if log:
        ax.set_xscale("log", base=2)
        ax.set_xlim(left=min(v for v in values if v) / 2 if any(values) else 1)
    ax.set_xlabel(unit)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlim(right=top * (4 if log else 1.35))


def _training(plt, result, title):
    rows = [dict(r, label=r["competitor"]) for r in result["rows"]]
    reference = next((r for r in rows if r["competitor"] == "fa2 padding-free" and "skipped" not in r), None)
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 0.35 * len(rows) + 1.6), sharey=True)
    _bars(speed, rows, "tokens_per_s", "real tokens/s (higher is better)",
          reference and ("packed by hand", reference["tokens_per_s"]))
    _bars(memory, rows, "peak_gib", "peak GiB (lower is better)", reference and ("packed by hand",
                                                                                  reference["peak_gib"]))
    return fig, title


def _decoding(plt, result, title):
    groups = list(dict.fromkeys((r["batch"], r["cache"]) for r in result["rows"]))
    height = sum(0.25 * sum(1 for r in result["rows"] if (r["batch"], r["cache"]) == g) + 0.6 for g in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, height + 0.8), squeeze=False)
    for ax, (batch, cache) in zip(axes[:, 0], groups):
        rows = [dict(r, label=r["competitor"]) for r in result["rows"] if (r["batch"], r["cache"]) == (batch, cache)]
        sdpa = next((r for r in rows if r["competitor"] == "sdpa" and "skipped" not in r), None)
        _bars(ax, rows, "tokens_per_s", "", sdpa and ("sdpa", sdpa["tokens_per_s"]))
        ax.set_title(f"batch {batch}, {cache}", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("generated tokens/s (higher is better)")
    return fig, title


OTHER_LINES = ("#4d4d4d", "#7570b3", "#1f78b4", "#66a61e", "#a6761d", "#e7298a")
AUTOFLASH_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def _kernels(plt, result, title):
    fig, ax = plt.subplots(figsize=(8, 4))
    kernels = list(dict.fromkeys(r["kernel"] for r in result["rows"]))
    ours = [k for k in kernels if "autoflash" in k]
    theirs = [k for k in kernels if k not in ours]
    for kernel in kernels:
        rows = [r for r in result["rows"]  # (W1's packed lengths are a row of the table, not a point here)
                if r["kernel"] == kernel and "skipped" not in r and isinstance(r["length"], (int, float))]
        if kernel in ours:  # autoflash in its one colour everywhere, its backends told apart by line and marker
            style, marker = AUTOFLASH_STYLES[ours.index(kernel) % len(AUTOFLASH_STYLES)]
            colour, width = AUTOFLASH_COLOUR, 2.5
        else:
            style, marker, colour, width = "-", "o", OTHER_LINES[theirs.index(kernel) % len(OTHER_LINES)], 1.2
        ax.plot([r["length"] for r in rows], [r["fwd_bwd_tflops"] for r in rows], marker=marker, linestyle=style,
                color=colour, label=kernel, linewidth=width)
    if not ours:
        ax.text(0.01, 0.02, "this run timed bare kernels only: no autoflash line", transform=ax.transAxes,
                fontsize=7, color="#555")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (16k tokens per call)")
    ax.set_ylabel("TFLOP/s, forward + backward")
    ax.legend(fontsize=8)
    return fig, title


def _longest(plt, result, title):
    rows = [dict(r, label=r["competitor"]) for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.4))
    _bars(ax, rows, "longest", "longest sequence that trains one step (tokens, log scale)", log=True)
    return fig, title


TITLES = {"w1": "W1: one training step on a padded batch", "w1packed": "W1-packed: the same tokens in one row",
          "w2": "W2: greedy decoding, 128 new tokens", "w3": "W3: attention kernels alone",
          "w4": "W4: longest single sequence"}


def plot(workload: str, result: dict, path: Path, variant: str = "") -> str:
    """``variant``: what tells this run from the workload's others (the file's name after the workload's)."""
    plt = _pyplot()
    if plt is None:
        return "(matplotlib not installed: no plot)"
    draw = {"w1": _training, "w1packed": _training, "w2": _decoding, "w3": _kernels, "w4": _longest}[workload]
    fig, title = draw(plt, result, TITLES[workload] + (f" ({variant})" if variant else ""))
    fig.suptitle(f"{title}\n{_caption(result)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# the summary's two panels, from runs on one GPU: W1 with FlashAttention-4 beside flash-attn 2 and transformers'
# own (H200), and the first W2 run on transformers 5.25 (H200; the second run's ratio was the higher one)
SUMMARY_SOURCES = ("w1-fa4.json", "w2-transformers-5.25.json")


def summary(directory: Path, path: Path, sources=SUMMARY_SOURCES) -> str:
    """Training speed (W1) and compiled decoding speed (W2, batch 16) of autoflash and transformers' own, from
    runs on one GPU (a figure never sets two machines side by side)."""
    plt = _pyplot()
    if plt is None:
        return "(matplotlib not installed: no plot)"
    w1 = json.loads((directory / sources[0]).read_text())
    w2 = json.loads((directory / sources[1]).read_text())
    gpus = {(w.get("environment") or {}).get("gpu") for w in (w1, w2)}
    if len(gpus) != 1:
        return f"(no summary: {sources[0]} and {sources[1]} come from different GPUs: {sorted(map(str, gpus))})"
    fig, (train, decode) = plt.subplots(1, 2, figsize=(10, 3.4))
    wanted = ("sdpa", "flash_attention_2", "fa2 padding-free", "autoflash")
    rows = [dict(r, label=r["competitor"].replace("fa2 padding-free", "fa2, packed by hand"))
            for r in w1["rows"] if r["competitor"] in wanted]
    _bars(train, rows, "tokens_per_s", "training: real tokens/s")
    train.set_title(f"padded training step\n{_caption(w1)}".replace(", transformers", "\ntransformers"), fontsize=7,
                    loc="left")
    rows = [dict(r, label=r["competitor"]) for r in w2["rows"] if r.get("batch") == 16
            and r.get("cache") == "static compiled" and r["competitor"] in ("eager", "sdpa", "autoflash")]
    _bars(decode, rows, "tokens_per_s", "decoding: generated tokens/s")
    decode.set_title(f"transformers' compiled decoding, batch 16\n{_caption(w2)}".replace(", transformers",
                                                                                          "\ntransformers"),
                     fontsize=7, loc="left")
    fig.suptitle(f"autoflash against transformers' own attention on one {gpus.pop().replace('NVIDIA ', '')} "
                 "(LLaMA-3-8B-shaped layers x4, bf16)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def redraw(directory: Path) -> None:
    """Every ``<workload>[-variant].json`` in ``directory`` redrawn next to it, and the summary."""
    for source in sorted(directory.glob("w*.json")):
        workload = max((w for w in TITLES if source.stem == w or source.stem.startswith(w + "-")), key=len,
                       default=None)
        if workload is not None:
            variant = source.stem[len(workload) + 1:]
            print(plot(workload, json.loads(source.read_text()), source.with_suffix(".png"), variant))
    if all((directory / name).exists() for name in SUMMARY_SOURCES):
        print(summary(directory, directory / "summary.png"))


if __name__ == "__main__":
    redraw(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out"))
