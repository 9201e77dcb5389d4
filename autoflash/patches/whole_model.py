"""Padding removal for the whole model, hooked in the same way in every era.

Three wrappers, each undone with the rest of the patch: ``LlamaModel.forward`` (the packed
row, ``autoflash.unpad_model``), ``LlamaForCausalLM.forward`` (logits and loss on the real
tokens, ``autoflash.packed_loss``) and ``LlamaForCausalLM.generate`` (whose forwards keep
the padded layout: they fill the cache they decode from).
"""

from __future__ import annotations

from autoflash import packed_loss, unpad_model
from autoflash.patches.base import Patch


def remove_padding_for_whole_model(patch: Patch, module, attention_name: str, **how) -> None:
    """``how``: what the era's model code passes to attention (``unpad_model.Boundaries``)."""
    boundaries = unpad_model.Boundaries(**how)
    patch.set_attribute(module.LlamaModel, "forward",
                        unpad_model.wrap(module.LlamaModel.forward, module.LlamaModel, attention_name, boundaries))
    lm = getattr(module, "LlamaForCausalLM", None)
    if lm is None:
        return
    patch.set_attribute(lm, "forward", packed_loss.wrap(lm.forward, lm, attention_name, boundaries))
    patch.set_attribute(lm, "generate", unpad_model.wrap_generate(lm.generate))
