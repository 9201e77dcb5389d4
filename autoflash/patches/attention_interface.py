"""transformers with AttentionInterface (4.48+, 5.x): register, don't replace.

autoflash's attention function and mask function are registered under ``ATTENTION_NAME``
once per process (``patches/registration.py``); a family's patch teaches its models to choose it: a model that asked for no
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

from typing import List

from autoflash import handover
from autoflash.attention import ATTENTION_NAME
from autoflash.patches import registration
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
    if not registration.registered():
        raise RuntimeError(f"{ATTENTION_NAME} is not registered in transformers' attention registries "
                           f"({registration.MODULE}'s import hook did not run)")
    patch = Patch(module.__name__, ERA)
    try:
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
    except BaseException:
        patch.undo()
        raise
    return patch
