"""Which decoders beyond the four families autoflash serves, decided from the config when a model is built.

A model transformers routes through its attention interface (``_supports_attention_backend``) is adopted
when autoflash computes its attention exactly: a causal decoder whose every attention call is causal
softmax attention over the keys its padding, packing and sliding window allow, its logits soft-capped where
a kernel of this machine applies that (flash-attn 2 built with it, on an Ampere+ GPU). What a config says
beyond that keeps the model out (it then runs what transformers gives it, and ``autoflash doctor`` names the
feature): a softcap no kernel here applies, attention sinks, chunked attention, query/key heads of another
width than the value heads (multi-head latent attention), layers of another kind than full or sliding
attention, cross-attention, an encoder's bidirectional attention, a composite model (its language model is
built, and judged, as a model of its own).

A vision-language model's language model is a class of its own in some releases (Qwen2-VL's
``Qwen2VLTextModel``), named in no causal-LM registry: those autoflash was taught (``LANGUAGE_MODELS``: their
layers see text and image tokens alike, positioned by 3-D M-RoPE ids computed before the decoder) are judged
as decoders; any other is not adopted (its layers may take visual inputs of the padded layout, as Qwen3-VL's
deepstack does).

An adopted model has padding removed for its whole stack where its classes take autoflash's wrappers
(``patches/other_decoders.py``), else inside each attention call (per layer). A call of an adopted model
that autoflash was not taught still goes to transformers' attention (``autoflash.handover``).

Imported when transformers builds a model: no torch here.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import threading
from typing import Dict, Optional

from autoflash.settings import FAMILIES_VARIABLE, settings

WHOLE_MODEL, PER_LAYER = "whole model", "per layer"
ATTENTION_LAYER_KINDS = frozenset({"full_attention", "sliding_attention"})
# What a model's code shows that no config field says, read once per modeling module: it hands attention
# sinks to the attention function (gpt-oss: ``s_aux``), or reads the attention mask as the 4-D tensor
# transformers' own mask functions build (autoflash's mask function returns a 2-D one at most).
SOURCE_FEATURES = (
    ("attention sinks", re.compile(r"\b(s_aux|sinks)=")),
    ("its code reads the attention mask as a 4-D tensor", re.compile(r"attention_mask\[[^\]\n]*,[^\]\n]*,[^\]\n]*,")),
)

SOFTCAP_UNAPPLIED = "soft-capped attention logits (attn_logit_softcapping), which no kernel of this machine applies"
# where a softcap is applied: said where the machine's own refusals are not (the README's table)
SOFTCAP_APPLIED_BY = "flash-attn 2 built with soft-capping applies them, on an Ampere+ GPU: adopted there"

# language model type -> the composite (vision-language) model type it is built inside
LANGUAGE_MODELS = {"qwen2_vl_text": "qwen2_vl", "qwen2_5_vl_text": "qwen2_5_vl"}

_lock = threading.Lock()
_decisions: Dict[str, str] = {}  # model type -> "adopted: ..." or "not adopted: <why>", for doctor


def why_not_adopted(model_class, config) -> Optional[str]:
    """None where a model of ``model_class`` and ``config`` is served by autoflash exactly; else the feature
    (or the admin's setting) that keeps it out."""
    model_type = getattr(config, "model_type", "") or ""
    if not getattr(model_class, "_supports_attention_backend", False):
        return "its attention is not on transformers' attention interface"
    if not settings().adopts(model_type):
        return f"left out by {FAMILIES_VARIABLE}"
    if getattr(config, "sub_configs", None):
        return "a composite model: its language model is judged as a model of its own"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder"
    decoder = _registry_types("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    if decoder is not None and model_type not in decoder and model_type not in LANGUAGE_MODELS:
        return ("not a causal language model in transformers' registry, nor a vision-language model's language "
                "model autoflash was taught")
    if _is_encoder(config):
        return "an encoder (bidirectional attention; causal only where configured as a decoder)"
    if getattr(config, "add_cross_attention", False):
        return "cross-attention"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        unapplied = _softcap_unapplied(config)
        if unapplied:
            return f"{SOFTCAP_UNAPPLIED}: {unapplied}"
    if getattr(config, "attention_chunk_size", None) is not None:
        return "chunked attention (attention_chunk_size)"
    widths = _head_widths(config)
    if widths is not None:
        return f"query/key heads {widths[0]} wide and value heads {widths[1]} (multi-head latent attention)"
    kinds = sorted(set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_KINDS)
    if kinds:
        return f"layers of kind {', '.join(kinds)}"
    return _seen_in_source(model_class.__module__)


def judged(model_class, config) -> Optional[str]:
    """``why_not_adopted``, never raising: it runs inside the model's constructor."""
    try:
        return why_not_adopted(model_class, config)
    except Exception as exc:  # noqa: BLE001 - a config read otherwise than autoflash expects: left alone
        return f"its config could not be read as autoflash expects ({type(exc).__name__})"


def decide(model_class, config) -> bool:
    """Whether to adopt; the answer is kept per model type for doctor."""
    why = judged(model_class, config)
    model_type = getattr(config, "model_type", "") or type(config).__name__
    if why is not None:
        with _lock:
            _decisions[model_type] = f"not adopted: {why}"
    return why is None


def path_said(why_not_whole_model: Optional[str]) -> str:
    """How an adopted model runs, in doctor's and the README's words."""
    return WHOLE_MODEL if why_not_whole_model is None else f"{PER_LAYER} ({why_not_whole_model})"


def record_path(model_type: str, why_not_whole_model: Optional[str]) -> None:
    """An adopted model type, and whether its padding is removed for the whole stack (else why not)."""
    with _lock:
        _decisions[model_type] = f"adopted: {path_said(why_not_whole_model)}"


def decisions() -> Dict[str, str]:
    with _lock:
        return dict(sorted(_decisions.items()))


def _is_encoder(config) -> bool:
    """BERT and its kin: attention is bidirectional unless the config makes the model a decoder (even then
    its mask is built otherwise than a decoder's). Their configs carry both of these switches."""
    masked = _registry_types("MODEL_FOR_MASKED_LM_MAPPING_NAMES")
    if masked is not None and getattr(config, "model_type", None) in masked:
        return True
    return hasattr(config, "is_decoder") and hasattr(config, "add_cross_attention")


def _head_widths(config):
    """(query/key width, value width) where they differ, else None."""
    value = getattr(config, "v_head_dim", None)
    query = getattr(config, "qk_head_dim", None)
    if query is None and getattr(config, "qk_nope_head_dim", None) is not None:
        query = config.qk_nope_head_dim + (getattr(config, "qk_rope_head_dim", None) or 0)
    if value is None or query is None or value == query:
        return None
    return query, value


def _softcap_unapplied(config) -> str:
    """"" where a kernel of this machine applies the config's softcap to a half-precision call of its sizes (on its
    GPU; a call that cannot have it, in float32 or on a CPU, goes to transformers' eager attention), else why not.
    Adopted with no kernel for the softcap, such a model would run transformers' eager attention call by call:
    no gain over transformers' default for it (eager from 5.24; before, sdpa, which drops the softcap)."""
    import torch

    from autoflash import dispatch
    from autoflash.call import AttentionCall, capability_of

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    fields = vars(config)  # (5.x spells it dtype, and warns on a read of torch_dtype; 4.x spells it torch_dtype)
    dtype = fields.get("dtype", fields.get("torch_dtype"))
    heads = config.num_attention_heads
    call = AttentionCall(
        kind="varlen", device_type=device.type, capability=capability_of(device),
        dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, q_len=2, kv_len=2, dropout=0.0,
        causal=True, needs_grad=False, softcap=float(config.attn_logit_softcapping))
    choice = dispatch.describe_choice(call)
    if choice["backend"] is not None:
        return ""
    return "; ".join(f"{r['backend']}: {', '.join(r['reasons'])}" for r in choice["refused"])


@functools.lru_cache(maxsize=None)
def _seen_in_source(module_name: str) -> Optional[str]:
    """The first of SOURCE_FEATURES the modeling module's code shows, else None."""
    module = sys.modules.get(module_name)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return None
    return next((feature for feature, pattern in SOURCE_FEATURES if pattern.search(source)), None)


@functools.lru_cache(maxsize=None)
def _registry_types(mapping: str):
    """The model types of one of transformers' auto-class registries, or None where this release has none."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return None
    names = getattr(modeling_auto, mapping, None)
    return None if names is None else frozenset(names)
