"""Padding removal for the whole model, hooked in the same way in every era.

Three wrappers of a family's classes, each undone with the rest of the patch: ``<Family>Model.forward``
(the packed row, ``autoflash.unpad_model``), ``<Family>ForCausalLM.forward`` (logits and loss on
the real tokens, ``autoflash.packed_loss``) and ``<Family>ForCausalLM.generate`` (whose forwards
keep the padded layout: they fill the cache they decode from).

What those wrappers must know of the release in use is decided here, by feature, and handed to
them as one record (``unpad_model.Release``): the cache's argument name, how each release's cache
is laid out, and how its loss is computed.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

from autoflash import packed_loss, unpad_model
from autoflash.layout import Layout, scatter
from autoflash.patches.base import Patch
from autoflash.settings import UNPAD_MODEL_VARIABLE


def remove_padding_for_whole_model(patch: Patch, module, family, attention_name: str, **how) -> None:
    """``how``: what the era's model code passes to attention (``unpad_model.Release``'s first fields)."""
    remove_padding(patch, family.cls(module, "Model"), family.cls(module, "ForCausalLM"), family, attention_name,
                   **how)


def remove_padding(patch: Patch, model, lm, family, attention_name: str, **how) -> None:
    """The three wrappers on a decoder class ``model`` and its causal LM ``lm`` (None where there is none).
    ``model`` None: ``lm`` only, a vision-language model's whose language model is a family's, wrapped with it."""
    release = unpad_model.Release(cache_names=cache_names((model or lm).forward), repad_cache=repad_cache,
                                  zero_padded_cache=zero_padded_cache, loss=causal_lm_loss, **how)
    if model is not None:
        patch.set_attribute(model, "forward", _in_its_own_order(
            model.forward, lambda forward: unpad_model.wrap(forward, model, family, attention_name, release)))
    if lm is None:
        return
    patch.set_attribute(lm, "forward", packed_loss.wrap(lm.forward, lm, family, attention_name, release))
    patch.set_attribute(lm, "generate", unpad_model.wrap_generate(lm.generate))


# the decoder's arguments the whole-model wrapper reads, in the order it takes them (``unpad_model.wrap``)
WRAPPER_ORDER = ["input_ids", "attention_mask", "position_ids"]


def why_not_whole_model(model, lm) -> Optional[str]:
    """For a decoder autoflash adopted rather than was taught: None where its classes take the wrappers, else why
    they do not (its layers then run per layer). The decoder's forward must take ``input_ids, attention_mask,
    position_ids`` (by name: in another order, GPT-2's, the wrapper takes them by name), and keywords for its
    layers; the causal LM's, keywords for its decoder (the packed row's record reaches the decoder through them)."""
    if model is None or not callable(getattr(model, "forward", None)):
        return "no decoder class found in transformers' registry"
    parameters = list(inspect.signature(model.forward).parameters.values())
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [name for name in WRAPPER_ORDER if name not in named]
    if missing:
        return f"{model.__name__}.forward takes no {', '.join(missing)}"
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        return f"{model.__name__}.forward takes no keyword arguments on to its layers"
    if lm is not None and not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(lm.forward).parameters.values()):
        return f"{lm.__name__}.forward takes no keyword arguments on to its decoder"
    return None


def _in_its_own_order(forward, wrap):
    """``wrap(forward)`` where ``forward`` takes ``input_ids, attention_mask, position_ids`` first; else a forward
    that takes every argument by the name it has in ``forward`` (a caller's positional arguments included:
    GPT-2's causal LM passes input_ids, then keywords) and hands the wrapper those three first."""
    parameters = list(inspect.signature(forward).parameters.values())
    if [p.name for p in parameters[1:4]] == WRAPPER_ORDER:
        return wrap(forward)
    # (positional names listed once, at wiring: a traced call zips them, it does not bind a signature)
    positional = [p.name for p in parameters[1:] if p.kind is p.POSITIONAL_OR_KEYWORD]

    def in_wrapper_order(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    wrapped = wrap(in_wrapper_order)

    @functools.wraps(forward)
    def by_name(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{type(self).__name__}.forward takes {len(positional)} positional arguments but "
                            f"{len(args)} were given")
        for name, value in zip(positional, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.forward got multiple values for argument '{name}'")
            kwargs[name] = value
        return wrapped(self, **kwargs)

    by_name.__wrapped__ = forward
    by_name.autoflash_whole_model = True
    return by_name


def cache_names(decoder_forward) -> tuple:
    """The decoder's cache argument: ``cache`` from the release that renamed it (which still accepts
    ``past_key_values``, deprecated), ``past_key_values`` before."""
    parameters = inspect.signature(decoder_forward).parameters
    return ("cache", "past_key_values") if "cache" in parameters else ("past_key_values",)


def repad_cache(cache, layout: Layout):
    """A KV cache filled on the packed row, in the padded layout eager would have built.

    Covers what a family's decoder builds when no cache is passed in: legacy tuples (transformers
    < 4.4x), ``DynamicCache`` with per-layer lists (4.36-4.55) or with ``layers`` (4.56+, 5.x).
    """
    def repad(t):  # (1, kv_heads, real tokens, dim) -> (batch, kv_heads, length, dim)
        return scatter(t.transpose(1, 2), layout).transpose(1, 2)

    repadded = _map_cache(cache, repad)
    if repadded is None:
        raise TypeError(f"autoflash: cannot lay out a {type(cache).__name__} built on a packed row in the padded "
                        f"form; set {UNPAD_MODEL_VARIABLE}=0 and please report this")
    if getattr(repadded, "layers", None) is None and hasattr(repadded, "_seen_tokens"):
        # transformers 4.36-4.4x count tokens seen separately
        repadded._seen_tokens = layout.q_len
    return repadded


def zero_padded_cache(cache, attention_mask):
    """A KV cache built by the padded batch's forward (the per-layer path), with zeros at its padded
    positions, as ``repad_cache`` leaves them on the whole-model path: one answer on every path.

    Only what spans the mask's positions is touched (a sliding-window layer that keeps fewer is left as
    built); a cache of a kind not known here is returned as it is (its padded positions are never read).
    """
    batch, length = attention_mask.shape
    padding = ~attention_mask.to(dtype=torch.bool)[:, None, :, None]

    def zero(t):  # (batch, kv_heads, length, dim)
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != batch or t.shape[2] != length:
            return t
        return t.masked_fill(padding.to(t.device), 0)

    zeroed = _map_cache(cache, zero)
    return cache if zeroed is None else zeroed


def _map_cache(cache, function):
    """``function`` applied to every key and value tensor of a cache, in place where the cache is an
    object; None for a kind of cache not known here."""
    if isinstance(cache, tuple):
        return tuple(tuple(function(t) for t in layer) for layer in cache)
    if getattr(cache, "layers", None) is not None:
        for layer in cache.layers:
            layer.keys, layer.values = function(layer.keys), function(layer.values)
        return cache
    if isinstance(getattr(cache, "key_cache", None), list):
        cache.key_cache[:] = [function(t) for t in cache.key_cache]
        cache.value_cache[:] = [function(t) for t in cache.value_cache]
        return cache
    return None


def causal_lm_loss(module, logits, shift_labels, extra):
    """transformers' causal-LM loss over the real tokens' (already shifted) labels."""
    loss_function = getattr(module, "loss_function", None)  # transformers >= 4.46
    if loss_function is not None and "shift_labels" in inspect.signature(loss_function).parameters:
        return loss_function(logits=logits, labels=None, vocab_size=module.config.vocab_size,
                             shift_labels=shift_labels, **extra)
    # transformers < 4.5x compute it inline (or without shift_labels): mean over counted
    # targets, or the sum over num_items_in_batch when the Trainer passes it
    items = extra.get("num_items_in_batch")
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), shift_labels.reshape(-1),
                                             ignore_index=packed_loss.IGNORE_INDEX,
                                             reduction="sum" if items is not None else "mean")
    return loss / items if items is not None else loss
