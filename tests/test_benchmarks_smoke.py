"""The benchmark script runs end to end (tiny sizes, CPU), so it cannot rot. No speed is asserted."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def test_every_workload_runs_in_smoke_mode_and_writes_json(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "all", "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for workload in ("w1", "w1packed", "w2", "w3", "w4"):
        data = json.loads((tmp_path / f"{workload}.json").read_text())
        assert data["rows"], workload
        assert f"== {workload} ==" in result.stdout
    w1 = json.loads((tmp_path / "w1.json").read_text())
    ran = {r["competitor"] for r in w1["rows"] if "skipped" not in r}
    assert {"eager", "sdpa", "autoflash", "autoflash-torch"} <= ran


def test_a_family_other_than_llama_runs_at_the_same_sizes(tmp_path):
    """``--family qwen2``: the model #13's GPU figures are measured on (q/k/v biases), written beside LLaMA's."""
    result = subprocess.run([sys.executable, str(BENCH), "w1", "--smoke", "--family", "qwen2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "w1-qwen2.json").read_text())
    assert data["environment"]["family"] == "qwen2" and data["rows"]
    assert "== w1 == (qwen2-shaped model, same sizes)" in result.stdout
    ran = {r["competitor"] for r in data["rows"] if "skipped" not in r}
    assert {"eager", "sdpa", "autoflash"} <= ran


def test_the_sdpa_training_comparison_runs_each_competitor_in_its_own_process(tmp_path):
    script = BENCH.parent / "sdpa_training.py"
    result = subprocess.run([sys.executable, str(script), "--smoke", "--json", str(tmp_path / "sdpa.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "sdpa.json").read_text())["rows"]
    assert rows["sdpa (transformers)"]["backend"] == "-"  # autoflash off in that process
    assert rows["autoflash (whole model)"]["backend"] == "varlen:sdpa"
    assert "x sdpa" in result.stdout
