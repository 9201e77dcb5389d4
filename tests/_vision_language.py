"""Tiny random vision-language models (Qwen2-VL, Qwen2.5-VL, LLaVA, InternVL) and their processor's inputs: text,
and images placed among it."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import padding_mask

IMAGE, VIDEO, VISION_START = 5, 6, 7
IMAGE_TOKENS = 4  # every tiny vision tower here gives 4 tokens per image
# Qwen2-VL's patches: 3 channels x 2 frames x 2 x 2 pixels, one frame of 4 x 4 patches merged 2 x 2
PATCH = 2
GRID = (1, 4, 4)
# model type -> its classes' prefix in transformers; the language model: Qwen2-VL's own classes (M-RoPE), LLaVA's
# a LLaMA, InternVL's a Qwen2
COMPOSITES = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "llava": "Llava", "internvl": "InternVL"}
M_ROPE = ("qwen2_vl", "qwen2_5_vl")


def _config(model_type, config_class, text):
    if model_type in M_ROPE:
        half = text["hidden_size"] // text["num_attention_heads"] // 2  # M-RoPE's shares of the rotary pairs
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}
        # (Qwen2-VL's vision hidden_size is its merger's output, the text's width; Qwen2.5-VL's its own width)
        width = text["hidden_size"] if model_type == "qwen2_vl" else 64
        vision = dict(depth=1, embed_dim=32, hidden_size=width, num_heads=2, out_hidden_size=text["hidden_size"],
                      intermediate_size=64, patch_size=PATCH, fullatt_block_indexes=[0])
        return config_class(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                            vision_start_token_id=VISION_START)
    if model_type == "llava":  # a CLIP tower: 8 x 8 pixels in 4 x 4 patches, its class token dropped
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=8, patch_size=4, projection_dim=32)
        return config_class(text_config=dict(model_type="llama", **text), vision_config=vision,
                            image_token_index=IMAGE, image_seq_length=IMAGE_TOKENS)
    # InternVL: 8 x 8 pixels in 2 x 2 patches, shuffled down to a quarter
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=[8, 8],
                  patch_size=[2, 2])
    return config_class(text_config=dict(model_type="qwen2", **text), vision_config=vision, image_token_id=IMAGE,
                        image_seq_length=IMAGE_TOKENS)


def vision_language_pair(model_type, hidden_size=64, heads=4, vocab_size=128):
    """(default model, eager model) of the composite ``model_type``, tiny, with identical random weights (float32,
    on the CPU)."""
    import transformers

    prefix = COMPOSITES[model_type]
    if not hasattr(transformers, f"{prefix}ForConditionalGeneration"):
        pytest.skip(f"this transformers has no {prefix}")
    if model_type in M_ROPE and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("4.x: no decoder beyond the families is adopted (findings 88), Qwen2-VL's language model included")
    text = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=heads // 2, vocab_size=vocab_size, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    config = _config(model_type, getattr(transformers, f"{prefix}Config"), text)
    model_class = getattr(transformers, f"{prefix}ForConditionalGeneration")
    torch.manual_seed(0)
    fast = model_class(copy.deepcopy(config))
    eager = model_class._from_config(copy.deepcopy(config), attn_implementation="eager")
    eager.load_state_dict(fast.state_dict())
    return fast, eager


def batch(padding, images=True, seed=0, lengths=(14, 9, 5), vocab_size=128, device="cpu", model_type="qwen2_vl"):
    """A padded batch of three rows, an image in the first two after two real tokens (the processor's inputs:
    ids, mask, pixel values, each image's grid, the token types M-RoPE reads). ``padding``: "right", "left", or
    "inside" (right padding, and two padded positions after the first row's image: its M-RoPE positions skip
    them, which only the mask says)."""
    mask = padding_mask(list(lengths), "right" if padding == "inside" else padding)
    if padding == "inside":
        mask[0, 2 + IMAGE_TOKENS:4 + IMAGE_TOKENS] = 0
    ids = torch.randint(10, vocab_size, mask.shape, generator=torch.Generator().manual_seed(seed))
    ids = ids.masked_fill(mask == 0, 0)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if images:
        for row in (0, 1):
            first = int(mask[row].nonzero()[0]) + 2
            ids[row, first:first + IMAGE_TOKENS] = IMAGE
        if model_type in M_ROPE:
            grid = torch.tensor([GRID, GRID])
            patches = int(grid.prod(-1).sum())
            pixels = torch.randn(patches, 3 * 2 * PATCH * PATCH, generator=torch.Generator().manual_seed(seed))
            inputs.update(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == IMAGE).int())
        else:
            inputs["pixel_values"] = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return {k: v.to(device) for k, v in inputs.items()}
