"""transformers 4.37-4.47: attention classes chosen from LLAMA_ATTENTION_CLASSES, no AttentionInterface.

Those releases have no registry to add an implementation to, so the patch works through
the one implementation whose data layout matches autoflash's: ``flash_attention_2``. Its
model code keeps the 2-D padding mask (no 4-D mask is built), and its attention class
hands q, k and v to one function, which the patch replaces with autoflash's:

- 4.43-4.47: the module-level ``_flash_attention_forward(q, k, v, attention_mask,
  query_length, is_causal, dropout, position_ids, ...)`` that modeling_llama imported;
- 4.37-4.42: the method ``LlamaFlashAttention2._flash_attention_forward(q, k, v,
  attention_mask, query_length, dropout, softmax_scale)``, which is not given position ids:
  the class's ``forward`` is wrapped to hand them over (packed sequences need them).

Models that asked for no implementation, for ``sdpa`` or for ``flash_attention_2`` are set
to ``flash_attention_2`` without transformers' check that the flash-attn package is
installed (``_autoset_attn_implementation``); ``eager`` is honoured. Their config says
``flash_attention_2``; the kernels are autoflash's.

Padding is removed from the whole decoder stack as in later eras; ``LlamaModel.forward``
takes no extra keyword arguments here, so the packed row reaches the routed function in the
forward's record, published for its duration (``autoflash.forward``), which attention reads.

Known gaps of this era (transformers' own flash-attention class sets them): a static cache
is refused by that class, and ``output_attentions`` returns no weights (autoflash says so once).
"""

from __future__ import annotations

import inspect
import logging
from typing import List

from autoflash import handover
from autoflash.attention import attention_forward
from autoflash.forward import padded_width
from autoflash.patches.base import Patch
from autoflash.patches.whole_model import remove_padding_for_whole_model
from autoflash.settings import say_once

ERA = "attention-classes"
REPLACED_REQUESTS = (None, "sdpa", "flash_attention_2")


def predates(module) -> bool:
    return False  # the oldest era autoflash knows: an older release is an unknown one


def missing(module, family) -> List[str]:
    gaps = []
    classes = f"{family.prefix.upper()}_ATTENTION_CLASSES"
    if not isinstance(getattr(module, classes, None), dict):
        gaps.append(f"no {classes}")
    flash_class = family.cls(module, "FlashAttention2")
    if flash_class is None:
        gaps.append(f"no {family.prefix}FlashAttention2")
    elif not (callable(getattr(module, "_flash_attention_forward", None))
              or hasattr(flash_class, "_flash_attention_forward")):
        gaps.append("no _flash_attention_forward to route")
    base = family.cls(module, "PreTrainedModel")
    if base is None or not hasattr(base, "_autoset_attn_implementation"):
        gaps.append("no PreTrainedModel._autoset_attn_implementation")
    return gaps


class _Caller:
    """What autoflash's attention function reads of the module that calls it."""

    def __init__(self, is_causal: bool, config=None, training: bool = False):
        self.is_causal = is_causal
        self.config = config
        self.training = training  # (4.43-4.47 hand the function no module: not known there)


def _run(module_or_caller, query, key, value, attention_mask, dropout, softmax_scale, position_ids):
    # this era's flash path holds q/k/v as (batch, len, heads, dim); autoflash's function takes
    # transformers' other layout, (batch, heads, len, dim), and returns (batch, len, heads, dim)
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    # (a whole-stack packed row: attention finds the forward's record, published, as this era's model code
    # passes nothing on)
    out, _ = attention_forward(module_or_caller, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                               mask, dropout=dropout, scaling=softmax_scale, position_ids=position_ids)
    return out


def _module_level(query_states, key_states, value_states, attention_mask, query_length, is_causal=True,
                  dropout=0.0, position_ids=None, softmax_scale=None, **_unused):
    """Stands in for modeling_llama._flash_attention_forward (transformers 4.43-4.47)."""
    return _run(_Caller(is_causal), query_states, key_states, value_states, attention_mask, dropout, softmax_scale,
                position_ids)


def _method(self, query_states, key_states, value_states, attention_mask, query_length, dropout=0.0,
            softmax_scale=None):
    """Stands in for LlamaFlashAttention2._flash_attention_forward (transformers 4.37-4.42)."""
    return _run(_Caller(self.is_causal, getattr(self, "config", None), self.training), query_states, key_states,
                value_states, attention_mask, dropout, softmax_scale, getattr(self, "_autoflash_position_ids", None))


def _warn_no_weights():
    say_once(("attention", "weights"), logging.WARNING,
             "output_attentions=True returns no attention weights under transformers < 4.48, whose flash-attention "
             "model code autoflash runs behind; load the model with attn_implementation='eager' to get them")


def route_requests(patch: Patch, base, name: str) -> None:
    """Make models that asked for no implementation, sdpa or flash_attention_2 use ``name``,
    skipping transformers' check that the flash-attn package is installed."""
    original_autoset = base._autoset_attn_implementation.__func__

    def _autoset_attn_implementation(cls, config, use_flash_attention_2=False, *args, **kwargs):
        requested = getattr(config, "_attn_implementation_internal", None)
        if use_flash_attention_2 or requested in REPLACED_REQUESTS:
            handover.remember_request(config, "flash_attention_2" if use_flash_attention_2 else requested)
            config._attn_implementation = name
            return config
        return original_autoset(cls, config, use_flash_attention_2, *args, **kwargs)

    patch.set_attribute(base, "_autoset_attn_implementation", classmethod(_autoset_attn_implementation))


def _rotary_sized_for_the_batch(original):
    """transformers 4.37-4.38: the rotary embedding sized by the padded batch, not the packed row."""
    def forward(self, x, seq_len=None, *args, **kwargs):
        width = padded_width(seq_len)
        return original(self, x, width if width is not None else seq_len, *args, **kwargs)

    forward.__wrapped__ = original
    return forward


def _not_the_float32_cast_notice(record) -> bool:
    return not record.getMessage().startswith("The input hidden states seems to be silently casted in float32")


def apply(module, family) -> Patch:
    patch = Patch(module.__name__, ERA)
    try:
        route_requests(patch, family.cls(module, "PreTrainedModel"), "flash_attention_2")
        attention_class = family.cls(module, "FlashAttention2")
        original_forward = attention_class.forward

        def forward(self, hidden_states, attention_mask=None, position_ids=None, *args, **kwargs):
            if kwargs.get("output_attentions") or (len(args) > 1 and args[1] is True):
                _warn_no_weights()
            # 4.37-4.42 pass neither position ids nor keywords on to the kernel call: the one attribute
            # autoflash sets on a transformers module (a context variable would break a torch.compile
            # trace in every layer; dynamo cannot trace ContextVar.set)
            self._autoflash_position_ids = position_ids
            try:
                return original_forward(self, hidden_states, attention_mask, position_ids, *args, **kwargs)
            finally:
                self._autoflash_position_ids = None

        patch.set_attribute(attention_class, "forward", forward)
        # LlamaFlashAttention2 warns that float32 inputs are "silently casted" for flash-attn; autoflash
        # casts nothing (float32 runs SDPA), so the warning would only mislead
        patch.add_log_filter(module.__name__, _not_the_float32_cast_notice)
        if callable(getattr(module, "_flash_attention_forward", None)):
            patch.set_attribute(module, "_flash_attention_forward", _module_level)
        else:
            patch.set_attribute(attention_class, "_flash_attention_forward", _method)
        remove_padding_for_whole_model(patch, module, family, "flash_attention_2", as_kwargs=False,
                                       mask_for_packed_row=False)
        rotary = family.cls(module, "RotaryEmbedding")
        if rotary is not None and "seq_len" in inspect.signature(rotary.forward).parameters:
            patch.set_attribute(rotary, "forward", _rotary_sized_for_the_batch(rotary.forward))
    except BaseException:
        patch.undo()
        raise
    return patch
