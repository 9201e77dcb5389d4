"""Every decoder on transformers' attention interface, beyond the families: adopted where it is served exactly.

Hooked on ``transformers.modeling_utils``: ``PreTrainedModel._check_and_adjust_attn_implementation``, where
every model's constructor, ``from_pretrained`` and ``set_attn_implementation`` turn the requested name into
the one stored on the config, answers ``autoattn`` for a model that asked for no implementation, ``sdpa`` or
``flash_attention_2`` when ``autoflash.adoption`` finds its attention computed exactly; any other model,
and every other request, is answered by transformers as before. A family's own patch (on its
``<Family>PreTrainedModel``) comes first in its classes' lookup and decides for them.
"""

from __future__ import annotations

from autoflash import adoption, handover
from autoflash.attention import ATTENTION_NAME
from autoflash.families import BY_NAME as FAMILIES
from autoflash.patches import registration
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

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        config = getattr(self, "config", None)
        if (attn_implementation in REPLACED_REQUESTS and not handover.is_passing_through() and config is not None
                and getattr(config, "model_type", None) not in FAMILIES and registration.registered()
                and adoption.decide(type(self), config)):
            handover.remember_request(config, attn_implementation)  # for the calls autoflash hands back
            return ATTENTION_NAME
        return original(self, attn_implementation, *args, **kwargs)

    _check_and_adjust_attn_implementation.__wrapped__ = original
    try:
        patch.set_attribute(base, "_check_and_adjust_attn_implementation", _check_and_adjust_attn_implementation)
    except BaseException:
        patch.undo()
        raise
    return patch
