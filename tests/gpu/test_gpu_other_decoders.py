"""Decoders adopted beyond the families (``autoflash.adoption``), on the GPU, in bf16 and fp16, against float32
eager: a training step on padded batches, judged as every half-precision path is (test_gpu_paths.py: below 1e-2,
or at most twice eager's own error in that dtype plus 2e-3), with padding removed for the whole model (the
router of a mixture of experts on the real tokens only, the model's own head and loss), served by a flash
kernel and not handed back to transformers. Windows are longer than the sequences here (a binding window is served by SDPA's
mask on the same path as the families': test_gpu_paths.py), so every call reaches a flash kernel.

    python -m pytest -q tests/gpu/test_gpu_other_decoders.py
"""

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device here", allow_module_level=True)

from autoflash import dispatch, handover
from _decoders import causal_lm, causal_lm_types, tiny_config
from conftest import assert_half_precision_step_matches_eager, labels_for, modern_era, padding_mask

if not modern_era():
    pytest.skip("other decoders are adopted from the attention-interface era on", allow_module_level=True)

# a mixture of experts with a window, a fused qkv projection, sliding and global layers with their own scaling,
# q/k norms, biases and a window, a routed MoE, attention multipliers
SUBJECTS = ["mixtral", "phi3", "gemma3_text", "olmo2", "starcoder2", "qwen3_moe", "granite"]
GPU_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 vocab_size=1000)
WINDOW = 1024  # longer than the sequences below, and than their packed row (whose cache a window would cut)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("side,lengths", [("right", [300, 17, 128, 1]), ("left", [64, 255, 3, 200])])
@pytest.mark.parametrize("model_type", SUBJECTS)
def test_an_adopted_decoders_training_step_in_half_precision_matches_float32_eager(model_type, side, lengths, dtype):
    if model_type not in causal_lm_types():
        pytest.skip(f"this transformers has no {model_type}")
    assert_an_adopted_half_precision_step_matches_eager(tiny_config(model_type, **GPU_SIZES), side, lengths, dtype)


def assert_an_adopted_half_precision_step_matches_eager(config, side, lengths, dtype):
    if hasattr(config, "sliding_window"):
        config.sliding_window = WINDOW
    torch.manual_seed(0)
    fast = causal_lm(copy.deepcopy(config)).cuda()
    assert fast.config._attn_implementation == "autoattn", "not adopted"
    eager_config = copy.deepcopy(config)
    eager_config._attn_implementation = "eager"
    eager32 = causal_lm(eager_config).cuda()
    eager32.load_state_dict(fast.state_dict())
    eager_half = copy.deepcopy(eager32).to(dtype)
    fast = fast.to(dtype)
    for model in (fast, eager32, eager_half):
        model.train()
    mask = padding_mask(lengths, side, device="cuda")
    ids = torch.randint(3, 1000, mask.shape, device="cuda").masked_fill(mask == 0, 0)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask))
    handed = {entry["call"]: entry["count"] for entry in handover.handed_over()}
    dispatch.last_decisions.clear()
    used, last = assert_half_precision_step_matches_eager(fast, eager32, eager_half, mask, inputs)
    assert {entry["call"]: entry["count"] for entry in handover.handed_over()} == handed, "handed back"
    assert used and any(backend != "sdpa" for backend in used.values()), used  # a flash kernel served it
    assert last["path"] == "whole-model" and last["lm_head_and_loss"]["on"] == "real tokens", last
    return used


def _flash_attn_applies_a_softcap() -> bool:
    """Asked of flash-attn itself: a build compiled without soft-capping ignores the argument (or raises)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        pytest.skip("flash-attn is not installed: no kernel here applies a softcap")
    q, k, v = torch.randn(3, 1, 64, 2, 64, dtype=torch.bfloat16, device="cuda")
    try:
        capped = flash_attn_func(q, k, v, softcap=0.1, causal=True)
    except RuntimeError:
        return False
    # a softcap of 0.1 flattens attention towards the causal mean of the values; uncapped, it is not
    return not torch.allclose(capped, flash_attn_func(q, k, v, causal=True), atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("side,lengths", [("right", [300, 17, 128, 1]), ("left", [64, 255, 3, 200])])
def test_a_soft_capped_decoder_is_served_exactly_where_flash_attn_applies_the_softcap_else_left_alone(
        side, lengths, dtype):
    """Gemma 2 with a softcap that binds: with a flash-attn build that applies it, adopted, the whole model on the
    real tokens, every call on flash-attn, eager's step; with one built without it (the GPU machine's wheel), not
    adopted, the build's refusal said, and transformers' own attention runs it."""
    if "gemma2" not in causal_lm_types():
        pytest.skip("this transformers has no gemma2")
    config = tiny_config("gemma2", **GPU_SIZES, attn_logit_softcapping=0.05)
    if _flash_attn_applies_a_softcap():
        used = assert_an_adopted_half_precision_step_matches_eager(config, side, lengths, dtype)
        assert set(used.values()) == {"flash_attn"}, used
        return
    import autoflash

    model = causal_lm(copy.deepcopy(config)).cuda()
    assert model.config._attn_implementation != "autoattn"
    said = autoflash.status()["other_models"]["gemma2"]
    assert "flash_attn: softcap=0.05: this flash-attn" in said and "build refuses it" in said, said


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("padding", ["right", "left", "inside"])
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "llava", "internvl"])
def test_a_vision_language_models_training_step_with_images_in_half_precision_matches_float32_eager(
        model_type, padding, dtype):
    """Its language model on the packed row (images among the real tokens, M-RoPE positions packed), served by a
    flash kernel, its LM head and loss on the real tokens; its vision tower as transformers runs it."""
    from _vision_language import batch, vision_language_pair

    fast, eager32 = vision_language_pair(model_type, hidden_size=256, heads=4, vocab_size=1000)
    fast, eager32 = fast.cuda(), eager32.cuda()
    eager_half = copy.deepcopy(eager32).to(dtype)
    fast = fast.to(dtype)
    for model in (fast, eager32, eager_half):
        model.train()
    inputs = batch(padding, lengths=(300, 17, 128, 1), vocab_size=1000, device="cuda", model_type=model_type)
    # (float32 pixels: each vision tower casts them to its own dtype)
    inputs = {**inputs, "labels": labels_for(inputs["input_ids"], inputs["attention_mask"])}
    dispatch.last_decisions.clear()
    used, last = assert_half_precision_step_matches_eager(fast, eager32, eager_half, inputs["attention_mask"], inputs)
    assert used.get("varlen") not in (None, "sdpa"), used
    assert last["path"] == "whole-model" and last["lm_head_and_loss"]["on"] == "real tokens", last
