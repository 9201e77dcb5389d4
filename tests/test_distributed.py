"""Data-parallel training over two CPU processes (gloo), with padding that differs per rank: DDP and FSDP2
with whole-model padding removal take the same step as one process on the concatenated batch.

Each rank is a process started by torch.multiprocessing.spawn, so this also shows autoflash active in
spawned ranks with no code change (the .pth line arms it there)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import _distributed_worker as worker
from conftest import FLOAT32_RTOL, legacy_era


def _concatenated(case):
    """The ranks' batches as one: padded on the right to the widest (padding added where none was real)."""
    parts = worker.batches(case)
    width = max(ids.shape[1] for ids, _, _ in parts)

    def widen(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return (torch.cat([widen(ids, 0) for ids, _, _ in parts]), torch.cat([widen(m, 0) for _, m, _ in parts]),
            torch.cat([widen(labels, -100) for _, _, labels in parts]))


def _single_process_step(case, bf16=False):
    model = worker.build(attention="eager")
    before = {name: value.detach().clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=worker.LEARNING_RATE)
    ids, mask, labels = _concatenated(case)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=worker.targets(labels))
    out.loss.backward()
    optimizer.step()
    return out.loss.detach(), before, model.state_dict()


def _spawn(function, args, monkeypatch, deadline_s=300):
    """Two ranks, joined with a deadline: a rank that hangs fails the test instead of stalling the run."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # the loopback device: containers' host names may not route
    context = torch.multiprocessing.spawn(function, args=args, nprocs=2, join=False)
    start = time.monotonic()
    while not context.join(timeout=5):
        if time.monotonic() - start > deadline_s:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {deadline_s} s")


def _fsdp2_or_skip():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")


@pytest.mark.parametrize("case", ["different widths", "one real row"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_take_the_single_process_step(tmp_path, monkeypatch, mode, case):
    _two_ranks_take_the_single_process_step(tmp_path, monkeypatch, mode, case)


def _two_ranks_take_the_single_process_step(tmp_path, monkeypatch, mode, case, path="whole-model"):
    from transformers import LlamaForCausalLM

    if not hasattr(LlamaForCausalLM, "loss_function"):
        pytest.skip("num_items_in_batch (the Trainer's token averaging across ranks) needs transformers >= 4.46")
    if mode.startswith("fsdp2"):
        _fsdp2_or_skip()
    out_path = tmp_path / "rank0.pt"
    _spawn(worker.step, (2, str(tmp_path / "rendezvous"), mode, case, str(out_path)), monkeypatch)
    job = torch.load(out_path)
    loss, before, after = _single_process_step(case)
    assert [p["path"] for p in job["paths"]] == [path, path], job["paths"]
    assert abs(job["loss"].item() - loss.item()) <= FLOAT32_RTOL * abs(loss.item())
    for name, reference in after.items():
        update, reference_update = job["state"][name] - before[name], reference - before[name]
        difference = (update.double() - reference_update.double()).norm()
        # an update is read through the float32 weights it changed: two updates closer than one step of the
        # largest weight (a norm weight near 1.0 moving by 1e-4) cannot be told apart, whatever computed them
        resolution = torch.finfo(torch.float32).eps * before[name].abs().max().item()
        assert difference <= FLOAT32_RTOL * max(reference_update.double().norm(), 1e-12) + resolution, name


@pytest.mark.parametrize("mode", ["ddp+checkpointing", "fsdp2+checkpointing"])
def test_gradient_checkpointing_on_two_ranks_takes_the_single_process_step(tmp_path, monkeypatch, mode):
    _two_ranks_take_the_single_process_step(tmp_path, monkeypatch, mode, "different widths")


@pytest.mark.parametrize("mode", ["ddp+compile", "fsdp2+compile"])
def test_the_compiled_sharded_model_takes_the_single_process_step_with_the_same_graphs_on_every_rank(
        tmp_path, monkeypatch, mode):
    """torch.compile of the wrapped model: ranks whose batches differ in width and real tokens capture the
    same graphs (a rank-dependent graph would put collectives out of step)."""
    # transformers < 4.48 pass attention no keywords: a traced forward keeps its padding there (no path
    # recorded), as the README's era notes say
    _two_ranks_take_the_single_process_step(tmp_path, monkeypatch, mode, "different widths",
                                            path=None if legacy_era() else "whole-model")
    breaks = [p["graph_breaks"] for p in torch.load(tmp_path / "rank0.pt")["paths"]]
    assert breaks[0] == breaks[1], breaks


@pytest.mark.parametrize("mode", ["ddp+bf16", "fsdp2+bf16"])
def test_mixed_precision_on_two_ranks_is_within_eager_bf16_error_of_the_float32_step(tmp_path, monkeypatch, mode):
    """bf16 autocast under DDP, FSDP2's MixedPrecisionPolicy (bf16 compute, float32 reduction): the job's
    update is judged as a bf16 path is (../shared/FINDINGS.md item 5), against the float32 single-process
    step, at most twice the error of eager attention under bf16 autocast in one process, plus 1e-3."""
    from transformers import LlamaForCausalLM

    if not hasattr(LlamaForCausalLM, "loss_function"):
        pytest.skip("num_items_in_batch (the Trainer's token averaging across ranks) needs transformers >= 4.46")
    if mode.startswith("fsdp2"):
        _fsdp2_or_skip()
    out_path = tmp_path / "rank0.pt"
    _spawn(worker.step, (2, str(tmp_path / "rendezvous"), mode, "different widths", str(out_path)), monkeypatch)
    job = torch.load(out_path)
    assert [p["path"] for p in job["paths"]] == ["whole-model", "whole-model"], job["paths"]
    _, before, exact = _single_process_step("different widths")
    _, _, eager_bf16 = _single_process_step("different widths", bf16=True)

    def worst(after):
        return max(((after[n] - before[n]).double() - (exact[n] - before[n]).double()).norm().item()
                   / max((exact[n] - before[n]).double().norm().item(), 1e-12) for n in exact)

    assert worst(job["state"]) <= 2 * worst(eager_bf16) + 1e-3, (worst(job["state"]), worst(eager_bf16))


def _free_port() -> int:
    with socket.socket() as probe:  # on the loopback device (a container's host name may not route)
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(script, *args, tmp_path):
    """Two ranks started by torchrun (the CPU build: gloo), as a job script would be; their output."""
    port = _free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), *args],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _reports(tmp_path):
    """Each rank's report, from a file of its own: two ranks printing at once can share one line of output."""
    return [json.loads(path.read_text()) for path in sorted(tmp_path.glob("report-*.json"))]


def test_every_rank_started_by_torchrun_patches_on_import_and_names_its_rank(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import json\n"
                      "import transformers.models.llama.modeling_llama  # the job's first import of LLaMA's code\n"
                      "import autoflash\n"
                      "status = autoflash.status()\n"
                      "report = json.dumps({k: status[k] for k in ('rank', 'active', 'patched')})\n"
                      "open(f\"report-{status['rank']['rank']}.json\", 'w').write(report)\n")
    _torchrun(script, tmp_path=tmp_path)
    reports = _reports(tmp_path)
    assert sorted(r["rank"]["rank"] for r in reports) == [0, 1]
    assert all(r["rank"]["world_size"] == 2 and r["active"] for r in reports)
    assert all(r["patched"] == ["transformers.models.llama.modeling_llama"] for r in reports)


def test_every_process_started_by_accelerate_launch_patches_on_import(tmp_path):
    """``accelerate launch`` starts its processes through torchrun's launcher: each patches on its first
    import of LLaMA's code. (On CPU ranks Accelerate itself runs no process group of its own: findings 59.)"""
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    script = tmp_path / "job.py"
    script.write_text("import json, os\n"
                      "import transformers.models.llama.modeling_llama\n"
                      "import autoflash\n"
                      "report = json.dumps({'rank': os.environ.get('RANK'), 'patched': autoflash.status()['patched']})\n"
                      "open(f\"report-{os.environ.get('RANK')}.json\", 'w').write(report)\n")
    port = _free_port()
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "--main_process_port", str(port), str(script)],
                            capture_output=True, text=True, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = _reports(tmp_path)
    assert sorted(r["rank"] for r in reports) == ["0", "1"]
    assert all(r["patched"] == ["transformers.models.llama.modeling_llama"] for r in reports)


def test_the_trainer_under_torchrun_takes_the_single_process_step(tmp_path):
    """The HF Trainer on two ranks (each padding its own batch to its own width, num_items_in_batch counted
    across ranks) updates the weights as one process does on the whole batch with eager attention."""
    import _trainer_worker

    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    try:
        from transformers import TrainingArguments

        TrainingArguments(output_dir=str(tmp_path), average_tokens_across_devices=True, use_cpu=True)
    except TypeError as exc:
        pytest.skip(f"this transformers' Trainer has no average_tokens_across_devices ({exc})")
    _torchrun(Path(_trainer_worker.__file__), str(tmp_path), tmp_path=tmp_path)
    job = torch.load(tmp_path / "rank0.pt")
    single = _trainer_worker.train(str(tmp_path / "single"), per_device_batch=8, attention="eager")
    assert job["path"]["path"] == "whole-model", job["path"]
    for name, reference in single["update"].items():
        difference = (job["update"][name].double() - reference.double()).norm()
        assert difference <= FLOAT32_RTOL * max(reference.double().norm(), 1e-12), name
