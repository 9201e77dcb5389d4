"""One HF Trainer step on a padded batch, run alone or as one rank of `torchrun` (test_distributed.py).

The dataset is fixed rows of different lengths; a collator pads each batch to its own longest row, so
under torchrun each rank's padded width differs. Rank 0 (or the lone process) saves the updated weights
and the path its padded forward took."""

from __future__ import annotations

import gc
import os
import sys

import torch

from conftest import labels_for, tiny_config

LENGTHS = [9, 3, 6, 2, 7, 4, 5, 8]  # 8 rows: 4 per rank under two ranks, one step either way


def rows():
    generator = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(3, 97, (n,), generator=generator).tolist()} for n in LENGTHS]


def collate(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, f in enumerate(features):
        ids[row, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[row, :len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels_for(ids, mask)}


def train(out_dir: str, per_device_batch: int, attention=None) -> dict:
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from autoflash import unpad_model

    torch.manual_seed(0)
    config = tiny_config()
    if attention is not None:
        config._attn_implementation = attention
    model = LlamaForCausalLM(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # SGD at learning rate 1 without clipping: the update is the gradient, large enough not to be lost
    # in the rounding of the weights it is added to (at 1e-2, float32 subtraction alone moved the
    # smallest updates by 4e-5)
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=per_device_batch, max_steps=1,
                             learning_rate=1.0, max_grad_norm=0.0, optim="sgd", report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, remove_unused_columns=False,
                             average_tokens_across_devices=True, dataloader_drop_last=False,
                             ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
    Trainer(model=model, args=args, train_dataset=rows(), data_collator=collate).train()
    return {"update": {n: (p.detach() - before[n]) for n, p in model.named_parameters()},
            "path": unpad_model.last_decision()}


if __name__ == "__main__":
    result = train(sys.argv[1], per_device_batch=4)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, os.path.join(sys.argv[1], "rank0.pt"))
    if torch.distributed.is_initialized():
        # the Trainer set the process group up and leaves it to the interpreter's exit, where gloo's
        # threads, torn down with DDP's reducer still alive, now and then abort both ranks ("terminate
        # called without an active exception", CI, after the step had finished): the reducer goes first
        gc.collect()
        torch.distributed.destroy_process_group()
