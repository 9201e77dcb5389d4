"""Tiny random models of every causal language model in the installed transformers' registry.

The list comes from transformers (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), never written by hand; a config is
the model type's defaults shrunk to a few thousand parameters: only the fields its config class has are
set, so one table of sizes serves every model type.
"""

from __future__ import annotations

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False,
             # the same sizes under GPT-2's and other older names
             n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=256, n_ctx=256, num_layers=2, num_heads=4,
             d_model=64, ffn_dim=96, rotary_dim=8, ffn_hidden_size=96,
             # mixtures of experts: several experts per token, the router's auxiliary loss in the loss
             moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             n_shared_experts=1, shared_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
             moe_num_experts=4, moe_k=2, output_router_logits=True, router_jitter_noise=0.0,
             # multi-head latent attention
             kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16)
# a sliding window longer than the test batches (a binding window is tested on its own)
WINDOW = 64


def causal_lm_types() -> list:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str, **overrides):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    fields = set(config_class().to_dict())
    given = {k: v for k, v in SIZES.items() if k in fields}
    # no dropout anywhere: the training steps of two implementations are compared
    given.update({k: 0.0 for k in fields if "dropout" in k or k.endswith("pdrop")})
    if "qk_rope_head_dim" in fields:  # latent attention: keys come from the latent, one per query head
        given.pop("head_dim", None)
        given["num_key_value_heads"] = given["num_attention_heads"]
    if "sliding_window" in fields:
        given["sliding_window"] = WINDOW
    types = getattr(config_class(), "layer_types", None)
    if types:  # one layer of each of the first two kinds the defaults hold (a sliding and a global one, say)
        kinds = list(dict.fromkeys(types))
        given["layer_types"] = (kinds * 2)[:2]
    given.update(overrides)
    return config_class(**given)


# a config the sizes above do not shrink (a field of another name) builds a model of this many parameters or more
TOO_LARGE = 5_000_000


def causal_lm(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)


def parameters_on_meta(config) -> int:
    """How many parameters a model of ``config`` has, counted without allocating them."""
    import copy

    import torch

    with torch.device("meta"):
        model = causal_lm(copy.deepcopy(config))
    return sum(p.numel() for p in model.parameters())
