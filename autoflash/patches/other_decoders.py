"""Every decoder on transformers' attention interface, beyond the families: adopted where it is served exactly.

Hooked on ``transformers.modeling_utils``: ``PreTrainedModel._check_and_adjust_attn_implementation``, where
every model's constructor, ``from_pretrained`` and ``set_attn_implementation`` turn the requested name into
the one stored on the config, answers ``autoattn`` for a model that asked for no implementation, ``sdpa`` or
``flash_attention_2`` when ``autoflash.adoption`` finds its attention computed exactly; any other model,
and every other request, is answered by transformers as before. A family's own patch (on its
``<Family>PreTrainedModel``) comes first in its classes' lookup and decides for them.
"""

from __future__ import annotations

import sys
import threading
from typing import Optional

from autoflash import adoption, handover
from autoflash.attention import ATTENTION_NAME
from autoflash.families import BY_MODULE as FAMILY_MODULES
from autoflash.families import BY_NAME as FAMILIES
from autoflash.families import INTERFACE_ERA, Family
from autoflash.patches import registration, whole_model
from autoflash.patches.attention_interface import REPLACED_REQUESTS
from autoflash.patches.base import Patch

ERA = "adoption"
MODULE = "transformers.modeling_utils"


def apply(module) -> Patch:
    patch = Patch(module.__name__, ERA)
    base = getattr(module, "PreTrainedModel", None)
    original = getattr(base, "_check_and_adjust_attn_implementation", None)
    if original is None:
        return patch  # a release before the attention interface's check: the families' eras serve it
    lock = threading.Lock()
    # (decoder class, causal LM class) -> why their padding is not removed for the whole stack (None: it is), once
    # wired: several model types may load as the same classes (sarvam_moe and param2moe as GLM-4-MoE's)
    whole = {}
    heads = {}  # composite model type -> its causal LM class wired (None: not wired), once

    def wire(model, config):
        with lock:
            classes = _classes(type(model), config.model_type)
            if classes not in whole:
                whole[classes] = _remove_padding(patch, classes, config.model_type)
        adoption.record_path(config.model_type, whole[classes])

    def wire_head(model_type, config):
        with lock:
            if model_type not in heads:
                heads[model_type] = _remove_padding_of_head(patch, model_type, config)

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        config = getattr(self, "config", None)
        # (a model type that loads as a family's classes, InternLM 3 or EXAONE as LLaMA's, is the family's patch's)
        ours = (not handover.is_passing_through() and config is not None and registration.registered()
                and getattr(config, "model_type", None) not in FAMILIES and type(self).__module__ not in FAMILY_MODULES)
        if ours and config.model_type in FAMILY_COMPOSITES:
            wire_head(config.model_type, config)  # (its language model asks for itself, as a family's class)
        if ours and attn_implementation in REPLACED_REQUESTS and adoption.decide(type(self), config):
            wire(self, config)
            handover.remember_request(config, attn_implementation)  # for the calls autoflash hands back
            return ATTENTION_NAME
        if ours and attn_implementation == ATTENTION_NAME and adoption.judged(type(self), config) is None:
            # asked for by name (at load, or set_attn_implementation after autoflash was disabled and enabled
            # again): the whole-model path too, where the model would have been adopted
            wire(self, config)
        return original(self, attn_implementation, *args, **kwargs)

    _check_and_adjust_attn_implementation.__wrapped__ = original
    try:
        patch.set_attribute(base, "_check_and_adjust_attn_implementation", _check_and_adjust_attn_implementation)
    except BaseException:
        patch.undo()
        raise
    return patch


def classes_of(model_type: str, modeling_module):
    """(decoder class, causal LM class) of ``model_type`` in its modeling module, as transformers' registry names
    them (None for one it does not name there). A vision-language model's language model
    (``adoption.LANGUAGE_MODELS``): its composite's image-text-to-text class is the one with the LM head and loss."""
    from transformers.models.auto import modeling_auto

    def named(mapping, key=model_type):
        name = getattr(modeling_auto, mapping, {}).get(key)
        return getattr(modeling_module, name, None) if isinstance(name, str) else None

    composite = adoption.LANGUAGE_MODELS.get(model_type)
    if composite is not None:
        return named("MODEL_MAPPING_NAMES"), named("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", composite)
    return named("MODEL_MAPPING_NAMES"), named("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")


# Vision-language model types whose language model is a family's class (LLaVA's and InternVL's: LLaMA's, Qwen2's,
# Mistral's), padding removed for it by the family's patch: their image-text-to-text class takes the packed row back,
# so that their LM head and loss run on the real tokens too (Qwen2-VL's are wired with their text model)
FAMILY_COMPOSITES = ("llava", "internvl")


# Model types whose classes take the wrappers but whose answer on the packed row differs from eager's (further than
# the tests allow, or the causal LM does not call the registry's decoder class): they run per layer (findings 89, 93)
PER_LAYER_ONLY = {
    "diffllama": "its λ gradients are cancelling sums over every position, which the packed row rounds 2.5e-5 "
                 "from eager's (float32), further than transformers' own sdpa does",
    "opt": "its causal LM calls OPTDecoder, not the registry's OPTModel, and its learned positions count from each "
           "row's first real token",
}


def why_not_whole_model(model_type: str, classes) -> Optional[str]:
    """None where ``model_type``'s (decoder, causal LM) classes take the whole-model wrappers, else why not."""
    return PER_LAYER_ONLY.get(model_type) or whole_model.why_not_whole_model(*classes)


def _classes(model_class, model_type: str):
    try:
        return classes_of(model_type, sys.modules.get(model_class.__module__))
    except Exception:  # noqa: BLE001 - a registry shaped otherwise than autoflash expects: per layer, said
        return None, None


def _remove_padding(patch: Patch, classes, model_type: str):
    """Wire whole-model padding removal for ``model_type``'s classes; None where done, else why not. Never raises:
    it runs inside the model's constructor."""
    try:
        decoder, lm = classes
        why = why_not_whole_model(model_type, classes)
        if why is None and getattr(decoder.forward, "autoflash_whole_model", False):
            return None  # wired already (never twice: each wrapper would pack the row again)
        if why is None:
            # the window a config states keeps a long batch per layer, as a family's does (its has_window)
            family = Family(model_type, decoder.__module__, "", (INTERFACE_ERA,), has_window=True)
            whole_model.remove_padding(patch, decoder, lm, family, ATTENTION_NAME, keywords_reach_attention=False,
                                       lm_reads_mask=model_type in adoption.LANGUAGE_MODELS)
        return why
    except Exception as exc:  # noqa: BLE001 - classes shaped otherwise than autoflash expects: per layer
        return f"its classes could not be wired ({type(exc).__name__}: {exc})"


def _remove_padding_of_head(patch: Patch, model_type: str, config):
    """Wire a FAMILY_COMPOSITES model's image-text-to-text class with the causal LM's wrappers, where its language
    model is a family's; its class, else None. Never raises: it runs inside the model's constructor."""
    try:
        from transformers.models.auto import modeling_auto

        family = FAMILIES.get(getattr(getattr(config, "text_config", None), "model_type", None))
        name = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
        module = sys.modules.get(f"transformers.models.{model_type}.modeling_{model_type}")
        lm = getattr(module, name, None) if isinstance(name, str) else None
        if family is None or lm is None or whole_model.why_not_whole_model(lm, lm) is not None:
            return None
        # its forward computes what it hands its language model (image features merged) from the padded batch's mask
        whole_model.remove_padding(patch, None, lm, family, ATTENTION_NAME, lm_reads_mask=True)
        return lm
    except Exception:  # noqa: BLE001 - classes shaped otherwise than autoflash expects: the head runs padded
        return None
