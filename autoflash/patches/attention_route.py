"""transformers 4.48 to about 4.55: AttentionInterface exists, but no mask-function registry.

In these releases the LLaMA model code builds a 4-D mask for every implementation name but
one: ``flash_attention_2``, for which it keeps the 2-D padding mask, which is what
autoflash needs. So models run under that name, and the name is routed to autoflash's
attention function in the LLaMA module alone: ``modeling_llama.ALL_ATTENTION_FUNCTIONS``
(the module's own binding of the global registry) is replaced by a view that answers
``flash_attention_2`` with autoflash and everything else as before. Other model families
keep transformers' flash-attention.

``LlamaAttention.forward`` is wrapped only to hand the cache positions over (as a keyword its
``**kwargs`` pass on to attention): with a static cache and no padding mask they are the one
record of how far the cache is filled.

Models that asked for no implementation, ``sdpa`` or ``flash_attention_2`` get that name
without transformers' check for the flash-attn package (``_autoset_attn_implementation``);
``eager`` and other explicit choices are honoured. Padding is removed from the whole
decoder stack for training forwards, as in 5.x (``LlamaModel.forward`` passes
``cu_seq_lens_q/k`` through ``**flash_attn_kwargs`` here).
"""

from __future__ import annotations

from typing import List

from autoflash.attention import attention_forward, mask_function
from autoflash.patches.attention_classes import REPLACED_REQUESTS, route_requests
from autoflash.patches.base import Patch
from autoflash.patches.whole_model import remove_padding_for_whole_model

ERA = "attention-route"
ROUTED_NAME = "flash_attention_2"
CACHE_POSITION = "autoflash_cache_position"


def predates(module) -> bool:
    """A release older than this era (its model code imports no attention registry)."""
    return getattr(module, "ALL_ATTENTION_FUNCTIONS", None) is None


def missing(module, family) -> List[str]:
    gaps = []
    if getattr(module, "ALL_ATTENTION_FUNCTIONS", None) is None:
        gaps.append(f"no ALL_ATTENTION_FUNCTIONS in {module.__name__}")
    classes = f"{family.prefix.upper()}_ATTENTION_CLASSES"
    if hasattr(module, classes):
        gaps.append(f"{classes} still chooses the attention class")
    base = family.cls(module, "PreTrainedModel")
    if base is None or not hasattr(base, "_autoset_attn_implementation"):
        gaps.append("no PreTrainedModel._autoset_attn_implementation")
    if family.cls(module, "Model") is None:
        gaps.append(f"no {family.prefix}Model")
    return gaps


def _routed_attention(module, query, key, value, attention_mask, **kwargs):
    # Without a mask function, nothing tells autoflash how much of a static cache is filled
    # (transformers passes no mask when there is no padding): the cache positions, which
    # LlamaAttention.forward receives but does not pass on, say it.
    positions = kwargs.pop(CACHE_POSITION, None)
    if attention_mask is None and key.shape[2] > query.shape[2]:
        if positions is not None:
            attention_mask = mask_function(query.shape[0], query.shape[2], key.shape[2], cache_position=positions)
    # (a packed row's record is dropped with the other keywords under gradient checkpointing in these
    # releases: attention then finds it published)
    return attention_forward(module, query, key, value, attention_mask, **kwargs)


class _Routed:
    """The registry as the LLaMA module sees it: flash_attention_2 is autoflash."""

    def __init__(self, registry):
        self._registry = registry

    def __getitem__(self, name):
        return _routed_attention if name == ROUTED_NAME else self._registry[name]

    def get(self, name, default=None):
        return _routed_attention if name == ROUTED_NAME else self._registry.get(name, default)

    def __contains__(self, name):
        return name == ROUTED_NAME or name in self._registry

    def __getattr__(self, attribute):
        return getattr(self._registry, attribute)


def apply(module, family) -> Patch:
    patch = Patch(module.__name__, ERA)
    try:
        route_requests(patch, family.cls(module, "PreTrainedModel"), ROUTED_NAME)
        patch.set_attribute(module, "ALL_ATTENTION_FUNCTIONS", _Routed(module.ALL_ATTENTION_FUNCTIONS))
        attention_class = family.cls(module, "Attention")
        original_forward = attention_class.forward

        def forward(self, *args, **kwargs):
            # this era's attention forward passes its **kwargs on to the attention function: the cache
            # positions ride along under a name of autoflash's own (for autoflash's function only)
            if self.config._attn_implementation == ROUTED_NAME:
                kwargs[CACHE_POSITION] = kwargs.get("cache_position")
            return original_forward(self, *args, **kwargs)

        patch.set_attribute(attention_class, "forward", forward)
        # no all-ones mask for the packed row: this era's model code would scan it (a host sync)
        # and finds no packed sequences by itself anyway
        remove_padding_for_whole_model(patch, module, family, ROUTED_NAME, mask_for_packed_row=False,
                                       lost_under_checkpointing=True)
    except BaseException:
        patch.undo()
        raise
    return patch


__all__ = ["ERA", "REPLACED_REQUESTS", "apply", "missing"]
