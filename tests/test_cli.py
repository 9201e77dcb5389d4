"""`autoflash doctor`, `doctor --json` and `demo` run and print what they promise."""

import json
import os
import subprocess
import sys

CLI = [sys.executable, "-m", "autoflash"]


def _cli(*args, env=None):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, check=True, timeout=600, env=env)


def test_doctor_prints_a_readable_report():
    out = _cli("doctor").stdout
    for expected in ("start-up hook:", "runs in new interpreters:", "AUTOFLASH_DISABLE", "AUTOFLASH_BACKEND",
                     "backends (best first):", "flash_attn", "training (padded batch", "decode (left-padded kv cache)",
                     "refused:"):
        assert expected in out, f"{expected!r} missing from:\n{out}"


def test_doctor_json_is_the_status_dict():
    data = json.loads(_cli("doctor", "--json").stdout)
    assert {"active", "disabled_by_env", "patched", "backends", "versions", "gpu", "startup", "choices"} <= set(data)
    training = data["choices"]["training (padded batch, LLaMA-3-8B heads)"]
    assert training["backend"] in ("flash_attn_4", "flash_attn", "torch", "sdpa")
    assert all(r["reasons"] for r in training["refused"])


def test_doctor_in_a_distributed_job_says_which_rank_it_speaks_for():
    """Under torchrun every rank runs doctor (`torchrun --nproc-per-node N -m autoflash doctor`): each report
    names its rank."""
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    out = _cli("doctor", env=env).stdout
    assert out.splitlines()[0].endswith("[rank 1 of 2, local rank 1]")
    assert json.loads(_cli("doctor", "--json", env=env).stdout)["rank"] == {"rank": 1, "world_size": 2,
                                                                            "local_rank": 1}


def test_doctor_shows_a_requested_deterministic_backward_in_its_training_call():
    """The user who set transformers' switch sees it reach the choice (and, on a Hopper GPU, FlashAttention-4
    step aside for it)."""
    out = _cli("doctor", env={**os.environ, "FLASH_ATTENTION_DETERMINISTIC": "1"}).stdout
    assert any(line.startswith("training (padded batch") and " grad deterministic" in line
               for line in out.splitlines()), out
    plain = _cli("doctor", env={k: v for k, v in os.environ.items() if k != "FLASH_ATTENTION_DETERMINISTIC"}).stdout
    assert " deterministic" not in plain


def test_doctor_under_the_disable_switch_says_so():
    env = {**os.environ, "AUTOFLASH_DISABLE": "1"}
    out = _cli("doctor", env=env).stdout
    assert "DISABLED by AUTOFLASH_DISABLE" in out
    assert "AUTOFLASH_DISABLE is set: the .pth line returns at once" in out


def test_demo_trains_and_decodes_and_compares_with_eager():
    out = _cli("demo").stdout
    for stage in ("[demo] building a random LLaMA", "[demo] training step", "[demo] greedy generation", "[demo] done"):
        assert stage in out
    table = out.split("[demo] done", 1)[1]
    training = next(line for line in table.splitlines() if line.startswith("training step"))
    decode = next(line for line in table.splitlines() if line.startswith("greedy decode"))
    logits_error = float(training.split("logits ")[1].split(",")[0])
    assert logits_error < 1e-5
    assert "20/20 tokens identical" in decode


def test_doctor_opens_with_what_serves_this_machine_and_what_would_be_faster():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU machine's bottom line")
    first = _cli("doctor").stdout.splitlines()[0]
    assert first.startswith("autoflash ") and "training and decoding run sdpa here" in first, first
    assert "faster: an NVIDIA GPU of compute capability 8.0 or newer" in first, first
    assert json.loads(_cli("doctor", "--json").stdout)["bottom_line"] == first.split(": ", 1)[1]
    off = _cli("doctor", env={**os.environ, "AUTOFLASH_DISABLE": "1"}).stdout
    assert "off (AUTOFLASH_DISABLE is set)" in off.splitlines()[0]
    assert " watched (not imported yet)" not in off  # nothing is watched while autoflash is off
