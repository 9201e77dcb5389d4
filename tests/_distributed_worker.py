"""One rank of a data-parallel training step (spawned by test_distributed.py; importable by the spawned
processes). Each rank builds the same model from the same seed, trains one SGD step on its own padded
batch, and rank 0 writes the job's loss, the updated weights and every rank's padding-removal path."""

from __future__ import annotations

import datetime
import gc

import torch
import torch.distributed as dist

from conftest import labels_for, padding_mask, tiny_config

LEARNING_RATE = 0.5


def batches(case: str):
    """[(ids, mask, labels)] per rank; the cases of issue 16: padded widths that differ between ranks, and a
    rank whose rows are all padding but one."""
    layouts = {"different widths": [([7, 3, 5], "right"), ([4, 2], "right")],
               "one real row": [([6, 4], "left"), ([5, 0, 0], "right")]}[case]
    generator = torch.Generator().manual_seed(7)
    out = []
    for lengths, side in layouts:
        mask = padding_mask(lengths, side)
        ids = torch.randint(3, 97, mask.shape, generator=generator).masked_fill(mask == 0, 0)
        out.append((ids, mask, labels_for(ids, mask)))
    return out


def targets(labels) -> int:
    return int((labels[:, 1:] != -100).sum())


def build(seed: int = 0, attention: str | None = None):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_config()
    if attention is not None:
        config._attn_implementation = attention
    return LlamaForCausalLM(config)


def step(rank: int, world: int, init_file: str, mode: str, case: str, out_path: str) -> None:
    # a collective that never completes fails after the timeout instead of hanging the test run
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = _train(rank, world, mode, case)
        gc.collect()  # DDP's reducer, should a cycle hold it, goes before the process group
        if rank == 0:
            torch.save(result, out_path)
    finally:
        # DDP's reducer is gone by now (it lived in _train): a reducer released after the process group is
        # destroyed hangs gloo's teardown now and then, with autoflash off too (docs/findings.md)
        dist.destroy_process_group()


def _train(rank: int, world: int, mode: str, case: str) -> dict:
    from autoflash import unpad_model

    model = build()
    mode, _, extra = mode.partition("+")
    if extra == "checkpointing":  # transformers 4.48-4.5x drop the packed row's keywords here (published instead)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        sharding = {}
        if extra == "bf16":  # FSDP2's mixed precision: bf16 compute, float32 gradient reduction
            from torch.distributed.fsdp import MixedPrecisionPolicy

            sharding["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, **sharding)
        wrapped = fully_shard(model, **sharding)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    ids, mask, labels = batches(case)[rank]
    # the Trainer's average_tokens_across_devices: every rank divides by the job's count of targets and
    # scales by the world size, since DDP and FSDP average the gradients
    items = sum(targets(b[2]) for b in batches(case))
    if extra == "compile":  # dynamo's capture is under test: its graphs run as captured
        from torch import _dynamo

        _dynamo.reset()
        _dynamo.utils.counters.clear()
        wrapped = torch.compile(wrapped, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(mode, extra) == ("ddp", "bf16")):
        out = wrapped(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
    (out.loss * world).backward()
    optimizer.step()
    path = unpad_model.last_decision()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)  # the job's loss: the sum over ranks of each rank's share
    if extra == "compile":
        from torch import _dynamo

        path = dict(path or {"path": None}, graph_breaks=sum(_dynamo.utils.counters["graph_break"].values()))
    paths = [None] * world
    dist.all_gather_object(paths, path)
    state = {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
             for name, value in model.state_dict().items()}
    return {"loss": loss, "state": state, "paths": paths}
