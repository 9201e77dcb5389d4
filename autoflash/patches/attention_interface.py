"""transformers with AttentionInterface (4.48+, 5.x): register, don't replace.

The patch registers autoflash's attention function and mask function under
``ATTENTION_NAME`` and teaches LLaMA models to choose it: a model that asked for no
implementation, for ``sdpa`` or for ``flash_attention_2`` gets autoflash; ``eager``
and every other explicit choice are honoured. ``flash_attention_2`` thereby works where
the flash-attn package is not installed (transformers itself raises ImportError there).

What it relies on in transformers:
- ``AttentionInterface`` / ``AttentionMaskInterface`` keep their registry in the class
  attribute ``_global_mapping`` (``register`` writes there);
- ``PreTrainedModel._check_and_adjust_attn_implementation(attn_implementation, ...)``
  is where a model's constructor, ``from_pretrained`` and ``set_attn_implementation``
  turn the requested name into the one stored on the config;
- ``LlamaModel.forward(input_ids, attention_mask, position_ids, ..., **kwargs)`` passes
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` through to the attention function, which
  is how padding removal for the whole stack (``autoflash.unpad_model``) hands over the
  sequence boundaries it computed.
"""

from __future__ import annotations

import copy
from typing import List

from autoflash import handover
from autoflash.attention import ATTENTION_NAME, attention_forward, mask_function
from autoflash.patches.base import Patch
from autoflash.patches.whole_model import remove_padding_for_whole_model

ERA = "attention-interface"
REPLACED_REQUESTS = (None, "sdpa", "flash_attention_2")


def predates(module) -> bool:
    """A release older than this era (no mask-function registry): not an unknown one."""
    try:
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
    except ImportError:
        return True
    return False


def missing(module, family) -> List[str]:
    gaps = []
    try:
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
        from transformers.modeling_utils import AttentionInterface  # noqa: F401
    except ImportError as exc:
        gaps.append(f"no AttentionInterface/AttentionMaskInterface ({exc})")
    if family.cls(module, "Model") is None:
        gaps.append(f"no {family.prefix}Model")
    base = family.cls(module, "PreTrainedModel")
    if base is None:
        gaps.append(f"no {family.prefix}PreTrainedModel")
    elif not hasattr(base, "_check_and_adjust_attn_implementation"):
        gaps.append("no PreTrainedModel._check_and_adjust_attn_implementation")
    return gaps


def apply(module, family) -> Patch:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    patch = Patch(module.__name__, ERA)
    try:
        patch.set_item(AttentionInterface._global_mapping, ATTENTION_NAME, attention_forward)
        patch.set_item(AttentionMaskInterface._global_mapping, ATTENTION_NAME, mask_function)
        base = family.cls(module, "PreTrainedModel")
        original = base._check_and_adjust_attn_implementation

        def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
            if attn_implementation in REPLACED_REQUESTS and not handover.is_passing_through():
                # kept for the calls autoflash hands back: they go where this request would have gone
                handover.remember_request(getattr(self, "config", None), attn_implementation)
                return ATTENTION_NAME
            return original(self, attn_implementation, *args, **kwargs)

        _check_and_adjust_attn_implementation.__wrapped__ = original
        patch.set_attribute(base, "_check_and_adjust_attn_implementation", _check_and_adjust_attn_implementation)
        remove_padding_for_whole_model(patch, module, family, ATTENTION_NAME)
        _keep_pickles_portable(patch, family.cls(module, "Config"))
    except BaseException:
        patch.undo()
        raise
    return patch


def _keep_pickles_portable(patch: Patch, config_class) -> None:
    """A config pickled here (``torch.save(model)``, a process pool) names transformers' own ``sdpa``, not
    ``autoattn``: the process that loads it may not run autoflash, and there ``autoattn`` is a KeyError
    on the first forward. Copies made in this process (``copy.copy``, ``copy.deepcopy``, which transformers
    makes of configs) keep the name."""
    if config_class is None:
        return
    base = next((c for c in type.mro(config_class) if c.__name__ in ("PreTrainedConfig", "PretrainedConfig")),
                None)
    if base is None or any(name in base.__dict__ for name in ("__getstate__", "__copy__", "__deepcopy__")):
        return  # a release that pickles or copies configs its own way: left alone

    def __getstate__(self):
        state = dict(self.__dict__)
        if state.get("_attn_implementation_internal") == ATTENTION_NAME:
            state["_attn_implementation_internal"] = "sdpa"
        return state

    def __copy__(self):
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    for function in (__getstate__, __copy__, __deepcopy__):
        patch.set_attribute(base, function.__name__, function)
