"""``autoflash demo``: a small random LLaMA, trained one step and decoded, with autoflash, with transformers'
own sdpa (what a model runs without autoflash) and with eager (the reference every path is checked against).

Needs no download: the model comes from a LlamaConfig with random weights. On a GPU it
runs in bfloat16, elsewhere in float32.
"""

from __future__ import annotations

import copy
import time


def _progress(stage: str) -> None:
    print(f"[demo] {stage}", flush=True)


def _timed(fn, device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def run(seed: int = 0, new_tokens: int = 20) -> int:
    _progress("importing torch and transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import autoflash
    from autoflash import dispatch, handover

    if not autoflash.enable():
        print("autoflash is not active in this process; run `autoflash doctor` to see why")
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    _progress(f"building a random LLaMA (hidden 256, 8 query / 2 kv heads, 2 layers) on {device}, {dtype}")
    fast = LlamaForCausalLM(copy.deepcopy(config)).to(device=device, dtype=dtype)
    eager = LlamaForCausalLM(copy.deepcopy(config)).to(device=device, dtype=dtype)
    eager.set_attn_implementation("eager")
    eager.load_state_dict(fast.state_dict())
    sdpa = copy.deepcopy(fast)
    with handover.passing_through():  # transformers' own sdpa, as a model runs it without autoflash
        sdpa.set_attn_implementation("sdpa")
    print(f"[demo] attention implementation: autoflash model -> {fast.config._attn_implementation!r}, "
          f"transformers' default -> {sdpa.config._attn_implementation!r}, "
          f"reference -> {eager.config._attn_implementation!r}")

    lengths = [48, 17, 33, 5]
    batch, width = len(lengths), max(lengths)
    ids = torch.randint(3, config.vocab_size, (batch, width), device=device)
    rows = []

    _progress("training step on a right-padded batch (lengths 48/17/33/5): forward + backward")
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)

    def train_step(model):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    for model in (fast, sdpa, eager):
        train_step(model)  # warm-up: first-call costs stay out of the timing
    (logits_fast, grads_fast), t_fast = _timed(lambda: train_step(fast), device)
    _, t_sdpa = _timed(lambda: train_step(sdpa), device)
    (logits_eager, grads_eager), t_eager = _timed(lambda: train_step(eager), device)
    real = mask.bool()
    logit_err = ((logits_fast - logits_eager)[real].float().norm() / logits_eager[real].float().norm()).item()
    grad_err = max(((grads_fast[n] - grads_eager[n]).float().norm() / grads_eager[n].float().norm()).item()
                   for n in grads_eager)
    used = dispatch.last_decisions.get("varlen") or dispatch.last_decisions.get("dense")
    rows.append(("training step", used.backend if used else "?", f"logits {logit_err:.1e}, grads {grad_err:.1e}",
                 t_fast, t_sdpa, t_eager))

    _progress(f"greedy generation, left-padded batch of {batch} prompts, {new_tokens} new tokens")
    mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    prompts = ids.masked_fill(mask == 0, config.pad_token_id)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=config.pad_token_id)
    with torch.no_grad():
        fast.eval(), sdpa.eval(), eager.eval()
        for model in (fast, sdpa):
            model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=2, do_sample=False)
        out_fast, g_fast = _timed(lambda: fast.generate(input_ids=prompts, attention_mask=mask, **settings), device)
        _, g_sdpa = _timed(lambda: sdpa.generate(input_ids=prompts, attention_mask=mask, **settings), device)
        out_eager, g_eager = _timed(lambda: eager.generate(input_ids=prompts, attention_mask=mask, **settings),
                                    device)
    new_fast, new_eager = out_fast[:, width:], out_eager[:, width:]
    same = (new_fast == new_eager).all(dim=0)
    agree = int(same.long().cumprod(0).sum())
    used = dispatch.last_decisions.get("cache")
    rows.append(("greedy decode", used.backend if used else "?", f"{agree}/{new_tokens} tokens identical",
                 g_fast, g_sdpa, g_eager))

    _progress("done")
    print()
    print(f"{'stage':<15} {'backend':<10} {'difference to eager':<32} {'autoflash':>10} {'sdpa':>10} {'eager':>10}")
    for stage, backend, diff, t_a, t_s, t_e in rows:
        print(f"{stage:<15} {backend:<10} {diff:<32} {t_a * 1e3:>8.1f}ms {t_s * 1e3:>8.1f}ms {t_e * 1e3:>8.1f}ms")
    print("(sdpa: transformers' own, what the model runs without autoflash; eager: the reference)")
    if device.type != "cuda":
        print("\n(times on a CPU say nothing about GPU speed; see docs/benchmarks.md)")
    return 0
