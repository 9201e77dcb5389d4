"""Greedy decoding through the KV-cache paths produces exactly eager's tokens."""

import pytest
import torch

from autoflash import dispatch
from conftest import (cache_keyword, dynamic_cache, legacy_era, model_pair, padding_mask, patch_era,
                      static_cache_or_skip)


def _prompts(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = padding_mask(lengths, "left")
    ids = torch.randint(3, 97, mask.shape, generator=generator).masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("lengths", [[7, 3, 1, 5], [12, 12, 12], [1, 9, 4, 16, 2]])
def test_left_padded_greedy_generation_matches_eager(backend, cache, lengths):
    if cache == "static" and legacy_era():
        pytest.skip("transformers < 4.48: its flash-attention class, which autoflash runs behind, refuses StaticCache")
    fast, eager = model_pair(seed=sum(lengths))
    fast.eval(), eager.eval()
    ids, mask = _prompts(lengths, seed=len(lengths))
    settings = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    if cache == "static":
        settings["cache_implementation"] = "static"
    with torch.no_grad():
        with dispatch.forced(backend):
            tokens = fast.generate(input_ids=ids, attention_mask=mask, **settings)
        reference = eager.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(tokens, reference)
    if cache == "static" and patch_era() == "attention-route":
        return  # transformers 4.48-4.5x builds a 4-D mask for a static cache: SDPA with that mask serves it
    assert dispatch.last_decisions["cache"].backend == ("sdpa" if backend == "auto" else backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_chunked_prefill_against_a_cache_matches_eager(backend):
    """q_len > 1 with a non-empty cache: the causal mask is aligned to the end of the cache."""
    fast, eager = model_pair(seed=11)
    fast.eval(), eager.eval()
    ids, mask = _prompts([14, 9, 5], seed=3)
    outputs = {}
    for name, model in (("fast", fast), ("eager", eager)):
        cache = dynamic_cache(model.config)
        logits = []
        with torch.no_grad(), dispatch.forced(backend):
            for start, stop in ((0, 6), (6, 11), (11, 14)):
                out = model(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop], use_cache=True,
                            **{cache_keyword(model): cache})
                logits.append(out.logits)
        outputs[name] = torch.cat(logits, dim=1)
    real = mask.bool()
    diff = (outputs["fast"] - outputs["eager"])[real].abs().max() / outputs["eager"][real].abs().max()
    assert diff < 1e-5


def greedy_loop(model, ids, steps, cache):
    """Prefill, then one-token steps with no attention mask at all: the kv-cache kernels' own path.

    Returns (tokens (batch, steps), the next-token logits of each step).
    """
    keyword = cache_keyword(model)
    out = model(input_ids=ids, use_cache=True, **{keyword: cache})
    scores = [out.logits[:, -1].float()]
    tokens = [scores[-1].argmax(-1, keepdim=True)]
    for _ in range(steps - 1):
        out = model(input_ids=tokens[-1], use_cache=True, **{keyword: cache})
        scores.append(out.logits[:, -1].float())
        tokens.append(scores[-1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1), scores


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_unpadded_greedy_loop_without_masks_matches_eager(backend, cache):
    fast, eager = model_pair(seed=13)
    fast.eval(), eager.eval()
    ids = torch.randint(3, 97, (3, 9))

    def new_cache(model):
        if cache == "dynamic":
            return dynamic_cache(model.config)
        return static_cache_or_skip(model.config, 32, batch_size=ids.shape[0])

    with torch.no_grad():
        with dispatch.forced(backend):
            tokens, _ = greedy_loop(fast, ids, 16, new_cache(fast))
        reference, _ = greedy_loop(eager, ids, 16, new_cache(eager))
    assert torch.equal(tokens, reference)


def test_inference_mode_forward_and_left_padded_generation_match_eager():
    """Inference tensors keep no version counter: the per-forward plan must not ask them for one."""
    fast, eager = model_pair(seed=17)
    fast.eval(), eager.eval()
    ids, mask = _prompts([6, 2, 4], seed=5)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        logits = fast(input_ids=ids).logits
        reference = eager(input_ids=ids).logits
        tokens = fast.generate(input_ids=ids, attention_mask=mask, **settings)
        reference_tokens = eager.generate(input_ids=ids, attention_mask=mask, **settings)
    assert ((logits - reference).abs().max() / reference.abs().max()).item() < 1e-5
    assert torch.equal(tokens, reference_tokens)
