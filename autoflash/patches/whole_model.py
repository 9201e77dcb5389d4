"""Padding removal for the whole model, hooked in the same way in every era.

Three wrappers of a family's classes, each undone with the rest of the patch: ``<Family>Model.forward``
(the packed row, ``autoflash.unpad_model``), ``<Family>ForCausalLM.forward`` (logits and loss on
the real tokens, ``autoflash.packed_loss``) and ``<Family>ForCausalLM.generate`` (whose forwards
keep the padded layout: they fill the cache they decode from).
"""

from __future__ import annotations

from autoflash import packed_loss, unpad_model
from autoflash.patches.base import Patch


def remove_padding_for_whole_model(patch: Patch, module, family, attention_name: str, **how) -> None:
    """``how``: what the era's model code passes to attention (``unpad_model.Boundaries``)."""
    boundaries = unpad_model.Boundaries(**how)
    model = family.cls(module, "Model")
    patch.set_attribute(model, "forward", unpad_model.wrap(model.forward, model, family, attention_name, boundaries))
    lm = family.cls(module, "ForCausalLM")
    if lm is None:
        return
    patch.set_attribute(lm, "forward", packed_loss.wrap(lm.forward, lm, family, attention_name, boundaries))
    patch.set_attribute(lm, "generate", unpad_model.wrap_generate(lm.generate))
