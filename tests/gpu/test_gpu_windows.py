"""Sliding windows on the GPU: flash-attn's ``window_size`` applies transformers' window, on the whole-model
packed row and per layer, in bf16 and fp16 against float32 eager (judged as every half-precision path is:
test_gpu_paths.py), for a family (Mistral: a window on every layer) and an adopted decoder (Gemma 3's text
model: sliding and global layers). A kv-cache call and a sequence with padding inside it keep SDPA's mask.

    python -m pytest -q tests/gpu/test_gpu_windows.py
"""

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device here", allow_module_level=True)

from autoflash import dispatch, unpad_model
from autoflash.backends import FLASH_ATTN
from _decoders import causal_lm, causal_lm_types, tiny_config
from conftest import (assert_half_precision_step_matches_eager, labels_for, modern_era, padding_mask, relative_error,
                      within_half_precision_floor)

if not modern_era():
    pytest.skip("the attention-interface era", allow_module_level=True)
if FLASH_ATTN.unavailable_reasons():
    pytest.skip(f"flash-attn: {FLASH_ATTN.unavailable_reasons()}", allow_module_level=True)

GPU_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 vocab_size=1000, num_hidden_layers=2)
WINDOW = 96  # shorter than most sequences below
# Gemma 3: one global layer and one sliding one (last, so that the kind's last decision recorded is a windowed call's)
SUBJECTS = {"mistral": {}, "gemma3_text": {"layer_types": ["full_attention", "sliding_attention"]}}


def models(model_type, dtype):
    if model_type not in causal_lm_types():
        pytest.skip(f"this transformers has no {model_type}")
    config = tiny_config(model_type, sliding_window=WINDOW, **GPU_SIZES, **SUBJECTS[model_type])
    torch.manual_seed(0)
    fast = causal_lm(copy.deepcopy(config)).cuda()
    assert fast.config._attn_implementation == "autoattn"
    eager_config = copy.deepcopy(config)
    eager_config._attn_implementation = "eager"
    eager32 = causal_lm(eager_config).cuda()
    eager32.load_state_dict(fast.state_dict())
    eager_half = copy.deepcopy(eager32).to(dtype)
    return fast.to(dtype), eager32, eager_half


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("side,lengths", [("right", [300, 17, 128, 97]), ("left", [64, 255, 3, 200])])
@pytest.mark.parametrize("model_type", list(SUBJECTS))
def test_a_binding_window_is_applied_by_flash_attn_on_the_whole_model_and_per_layer(model_type, side, lengths, dtype):
    fast, eager32, eager_half = models(model_type, dtype)
    for model in (fast, eager32, eager_half):
        model.train()
    mask = padding_mask(lengths, side, device="cuda")
    ids = torch.randint(3, 1000, mask.shape, device="cuda").masked_fill(mask == 0, 0)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
    # training without a cache: the whole model on the packed row, the window applied there by flash-attn
    dispatch.last_decisions.clear()
    used, path = assert_half_precision_step_matches_eager(fast, eager32, eager_half, mask, {**inputs, "use_cache": False})
    assert path["path"] == "whole-model", path
    assert used["varlen"] == "flash_attn", used
    # the cache a forward returns by default would be cut by the window on the packed row: per layer, the
    # padded batch's calls, the window applied by flash-attn too
    dispatch.last_decisions.clear()
    used, path = assert_half_precision_step_matches_eager(fast, eager32, eager_half, mask, inputs)
    assert path["path"] == "per-layer" and "use_cache=False" in path["reason"], path
    assert used["varlen"] == "flash_attn", used


@pytest.mark.parametrize("model_type", list(SUBJECTS))
def test_a_window_over_padding_inside_a_sequence_keeps_sdpas_mask(model_type):
    """transformers counts the window in key slots, padding inside a sequence included; a varlen kernel would
    count tokens. That call goes to SDPA, whose mask counts slots, and still answers as eager does."""
    fast, eager32, eager_half = models(model_type, torch.bfloat16)
    for model in (fast, eager32, eager_half):
        model.eval()
    mask = padding_mask([300, 250], "right", device="cuda")
    mask[0, 40:60] = 0  # a hole inside the first sequence
    ids = torch.randint(3, 1000, mask.shape, device="cuda").masked_fill(mask == 0, 0)
    dispatch.last_decisions.clear()
    with torch.no_grad():
        logits = fast(input_ids=ids, attention_mask=mask, use_cache=False).logits
        reference = eager32(input_ids=ids, attention_mask=mask, use_cache=False).logits
        half = eager_half(input_ids=ids, attention_mask=mask, use_cache=False).logits
    windowed = [d for d in dispatch.last_decisions.values() if d.backend == "sdpa"]
    assert windowed, {k: d.backend for k, d in dispatch.last_decisions.items()}
    assert unpad_model.last_decision()["path"] == "per-layer"  # (the packed row would count tokens)
    real = mask.bool()
    error = relative_error(logits[real].float(), reference[real])
    floor = relative_error(half[real].float(), reference[real])
    assert within_half_precision_floor(error, floor), f"{error:.2e} vs {floor:.2e}"
