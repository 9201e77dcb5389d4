"""W4: the longest single sequence (powers of two) that trains one step, per competitor.

Each length is one forward, backward and SGD update of the model at W1's sizes; the first that runs out
of memory ends the competitor's climb. (``--smoke`` shrinks everything to run on a CPU.)
"""

from __future__ import annotations

import torch

from harness import COMPETITORS, available, build_model, competing_as, is_oom, peak_gib, reset_memory, sync


def run_long(s, family: str = "llama"):
    model = build_model(s, family)
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


def table_lines(result) -> list[str]:
    lines = [f"{'competitor':<18}{'longest':>10}  tried (length, peak GiB)"]
    for r in result["rows"]:
        lines.append(f"{r['competitor']:<18}  skipped: {r['skipped']}" if "skipped" in r else
                     f"{r['competitor']:<18}{r['longest']:>10}  {r['tried']}")
    return lines
