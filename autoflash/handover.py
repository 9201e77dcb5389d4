"""Calls autoflash does not serve, handed to the attention transformers would have used.

autoflash is on in every process of a machine, so every way transformers runs a model reaches it:
continuous batching's paged cache, context parallelism's shards, arguments a later release adds.
It serves the calls whose convention it knows and nothing else. Any other call goes to
transformers' own attention for what the user asked for (``request_of``), with the mask that
function expects, and is recorded (``status()["handed_over"]``; once at INFO in the log): a
hand-over computes what transformers alone would have, never an approximation.

Two grains:

- **one call** (``why_not_mine`` / ``run``): a keyword autoflash does not read, a key-length table
  per layer type, sinks, a softcap that no kernel here applies, a 4-D mask, attention weights. The call
  goes to transformers' ``sdpa`` (``eager`` where sdpa cannot compute it), with the dense mask of the keys
  the call may see (autoflash's mask function hands attention a 2-D mask at most);
- **a whole model** (``give_back`` / ``take_back``): a transformers feature that decides by the
  model's attention name before any call is made (continuous batching accepts only its own names;
  the Trainer's context parallelism only ``sdpa``). The model is set to the name transformers would
  have given it while the feature runs, then back to autoflash.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import logging
import sys
import threading
import weakref
from typing import Dict, List, Optional

import torch

from autoflash import families, tracing
from autoflash.settings import logger

# The name autoflash registers under. It must not contain "flash": transformers treats
# any such name as its own flash-attention and tries to load it as a kernel.
ATTENTION_NAME = "autoattn"

# What transformers' model code hands the attention function, in the releases autoflash knows, beside
# (module, query, key, value, attention_mask, dropout, scaling, is_causal); and autoflash's own keywords.
# A keyword outside this set that carries a value is a convention autoflash was not taught.
KNOWN_KEYWORDS = frozenset({
    "position_ids", "cache_position", "use_cache", "output_attentions", "sliding_window", "softcap",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
    "output_router_logits",  # (mixtures of experts pass their router's flag on to every layer's attention)
    "autoflash_forward", "autoflash_cache_position",
})
# Keywords that change what attention computes; autoflash's kernels apply none of them.
NEEDS_EAGER = ("softcap", "s_aux", "sinks")
# Continuous batching's paged cache (transformers 5.20+): indices into the cache's pages.
PAGED_KEYWORDS = ("read_index", "write_index", "block_table")

_lock = threading.Lock()
_requests: Dict[int, tuple] = {}  # id(config) -> (weak reference, what the user asked for)
_handed_over: Dict[tuple, dict] = {}  # (what, to) -> the record status() shows
_passing_through = contextvars.ContextVar("autoflash_passing_through", default=False)


class NotHandedOver(RuntimeError):
    """A call autoflash does not serve and cannot hand to transformers exactly either."""


# ---------------------------------------------------------------- what the user asked for


def remember_request(config, requested: Optional[str]) -> None:
    """Keep what a model of ``config`` asked for (``None``, ``sdpa``, ``flash_attention_2``) when autoflash
    answers ``autoattn`` instead. Kept beside the config, not on it: a config's attributes are saved with
    the model, and configs are not hashable (they compare by value)."""
    if config is None:
        return
    key = id(config)
    try:
        reference = weakref.ref(config, lambda _, key=key: _requests.pop(key, None))
    except TypeError:
        return
    with _lock:
        _requests[key] = (reference, requested)


def request_of(config) -> Optional[str]:
    """What the model of ``config`` asked for; None where it asked for nothing or is not known here (a copy
    of a config made after loading: transformers' default then, as for a model that asked for nothing)."""
    entry = _requests.get(id(config))
    if entry is None or entry[0]() is not config:
        return None
    return entry[1]


def transformers_choice(config, model=None) -> str:
    """The attention name transformers alone would have given a model of ``config``: ``flash_attention_2``
    where it was asked for and flash-attn is installed, else ``sdpa`` (transformers' default; a request
    for flash_attention_2 without flash-attn fails to load without autoflash), or ``eager`` for a ``model``
    whose class refuses sdpa (Gemma 2: its sdpa has no softcap)."""
    if request_of(config) == "flash_attention_2" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa" if getattr(type(model), "_supports_sdpa", True) else "eager"


# ---------------------------------------------------------------- one call


def is_paged(kwargs: dict) -> bool:
    return any(kwargs.get(name) is not None for name in PAGED_KEYWORDS)


def why_not_mine(kwargs: dict, attention_mask, module=None) -> Optional[str]:
    """Why autoflash's kernels cannot serve this call as transformers described it, or None.

    Asked by every layer of every forward, decode steps included: the usual call (only known keywords, a
    mask of at most two dimensions) is told apart by one pass over the keywords and three lookups."""
    if all(name in KNOWN_KEYWORDS for name in kwargs):
        # (a softcap is the call record's: a kernel that applies it serves the call, else attention hands it over)
        if isinstance(kwargs.get("cu_seq_lens_k"), dict) or isinstance(kwargs.get("max_length_k"), dict):
            return "key lengths given per layer type"
    else:
        paged = [name for name in PAGED_KEYWORDS if kwargs.get(name) is not None]
        if paged:
            return "continuous batching's paged cache (" + ", ".join(paged) + ")"
        if isinstance(kwargs.get("cu_seq_lens_k"), dict) or isinstance(kwargs.get("max_length_k"), dict):
            return "key lengths given per layer type"
        eager = [name for name in _asks_more_than_softmax(kwargs) if name != "softcap"]
        if eager:
            return "attention " + " and ".join(_WHAT[name] for name in eager)
        unknown = sorted(name for name, value in kwargs.items()
                         if name not in KNOWN_KEYWORDS and name not in NEEDS_EAGER and value is not None
                         and value is not False)
        if unknown:
            return "keyword arguments autoflash does not read (" + ", ".join(unknown) + ")"
    if kwargs.get("output_attentions") or config_asks_for_weights(module):
        return "output_attentions=True (flash kernels return no attention weights)"
    if attention_mask is not None and attention_mask.dim() > 2:
        return ("a 4-D attention mask (built by the caller, by transformers for a mask pattern autoflash does not "
                "compute, or by transformers 4.48-4.5x for a static cache)")
    return None


_WHAT = {"s_aux": "sinks", "sinks": "sinks"}


def _asks_more_than_softmax(kwargs: dict) -> list:
    """The keywords of NEEDS_EAGER this call gives a value (sdpa computes none of them)."""
    return [name for name in NEEDS_EAGER if kwargs.get(name) not in (None, 0, 0.0)]


# ---------------------------------------------------------------- one forward's mask

# transformers' mask functions (transformers.masking_utils) whose pattern autoflash computes by itself:
# causality (the kernels' flag), a sliding window (attention's sliding_window keyword), padding and packed
# sequences (read from the 2-D mask and the position ids), and the compositions that only combine them.
UNDERSTOOD_MASKS = frozenset({
    "causal_mask_function", "and_masks.<locals>.and_mask", "sliding_window_overlay.<locals>.inner_mask",
    "padding_mask_function.<locals>.inner_mask", "packed_sequence_mask_function.<locals>.inner_mask",
    "remap_positions_for_packed_sequence.<locals>.inner_mask", "add_offsets_to_mask_function.<locals>.inner_mask",
})
MASKS_MODULE = "transformers.masking_utils"


PACKED_MASK = "packed_sequence_mask_function.<locals>.inner_mask"
UNSEEN_PACKING = "packed sequences, in a model whose attention is not known to be handed the position ids that mark them"


def why_mask_not_mine(mask_function, config, kv_extent, packing_possible=False) -> Optional[str]:
    """Why the pattern transformers describes by ``mask_function`` is not one autoflash computes, or None.

    A config whose chunked attention binds (``attention_chunk_size`` shorter than the keys: Llama 4) is
    answered from the config, in traced calls too. Outside a trace every function the mask composes is
    checked against the patterns autoflash computes; inside one, nothing more (dynamo cannot open them).

    Packed sequences are read by autoflash's attention from the position ids, which the families' attention
    layers are handed; another model's may not be (Persimmon's consumes them): its packed forwards go to
    transformers' mask. In a trace, where the pattern cannot be read, that is any forward where packing is
    possible (no padding mask, no cache: transformers composes packing into every such traced forward)."""
    chunk = getattr(config, "attention_chunk_size", None)
    if isinstance(chunk, int) and kv_extent > chunk:
        return f"chunked attention (attention_chunk_size={chunk}, shorter than the keys)"
    if mask_function is None:
        return None
    family = getattr(config, "model_type", None) in families.BY_NAME
    if tracing.is_tracing():
        # dynamo reads a traced function's name unreliably (a module-level function's compares unequal to its
        # own text) and not what it closes over: a traced call is judged by its config only (docs/findings.md)
        return UNSEEN_PACKING if packing_possible and not family else None
    for part in _composed_of(mask_function, 0):
        name = getattr(part, "__qualname__", type(part).__name__)
        if getattr(part, "__module__", None) != MASKS_MODULE or name not in UNDERSTOOD_MASKS:
            return f"a mask pattern autoflash does not compute ({getattr(part, '__module__', '?')}.{name})"
        if name == PACKED_MASK and not family:
            return UNSEEN_PACKING
    return None


def _composed_of(function, depth):
    yield function
    if depth > 8:
        return
    for cell in getattr(function, "__closure__", None) or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue
        for inner in contents if isinstance(contents, tuple) else (contents,):
            if callable(inner) and not isinstance(inner, torch.Tensor):
                yield from _composed_of(inner, depth + 1)


def transformers_mask(why: str, config, **given):
    """The mask transformers' sdpa would be given for this forward (a 4-D boolean mask, or None where it is
    plain causal): autoflash's attention then hands every call that receives it to transformers (``run``)."""
    record(why, "transformers' sdpa (its own mask)", config)
    registry = getattr(sys.modules.get(MASKS_MODULE), "AttentionMaskInterface", None)
    return registry._global_mapping["sdpa"](**{name: value for name, value in given.items() if value is not None},
                                            config=config)


def run(module, query, key, value, attention_mask, allowed, dropout, scaling, is_causal, kwargs, why: str):
    """The call, as transformers' own attention computes it for this model.

    ``allowed``: where ``attention_mask`` is not 4-D, the (batch or 1, 1, q_len, kv_len) boolean mask of the
    keys each query may see, built from autoflash's understanding of the batch (padding, packed sequences,
    the causal offset of a cache, a sliding window), or None where no mask is needed (a plain causal call).
    """
    needs_eager = kwargs.get("output_attentions") or _asks_more_than_softmax(kwargs) or config_asks_for_weights(module)
    to = "eager" if needs_eager else "sdpa"
    record(why, f"transformers' {to}", getattr(module, "config", None))
    if attention_mask is not None and attention_mask.dim() > 2:
        mask = attention_mask[:, :, :, : key.shape[2]]
    else:
        mask = allowed
    passed = {name: v for name, v in kwargs.items() if not name.startswith("autoflash_")
              and not (name == "output_attentions" and to == "sdpa")}
    if to == "eager":
        if mask is not None and mask.dtype == torch.bool:
            additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
            mask = additive.masked_fill_(~mask, torch.finfo(query.dtype).min)
        passed.pop("position_ids", None)
        return _eager_of(module)(module, query, key, value, mask, dropout=dropout, scaling=scaling, **passed)
    function = _transformers_function("sdpa")
    if function is None:
        # transformers 4.37-4.47 keep no registry of attention functions; their routed flash path hands autoflash
        # only the arguments it knows, so no call should get here
        raise NotHandedOver(f"autoflash: {why}, and this transformers has no attention function to hand it to; "
                            "load the model with attn_implementation='eager' and please report this")
    if is_causal is not None:
        passed["is_causal"] = is_causal
    return function(module, query, key, value, mask, dropout=dropout, scaling=scaling, **passed)


def config_asks_for_weights(module) -> bool:
    # read from the config's own attributes: transformers' attribute lookup on configs costs ~4 us,
    # paid by every layer of every decode step (5.x keeps the flag as ``_output_attentions``)
    attributes = getattr(getattr(module, "config", None), "__dict__", {})
    return bool(attributes.get("output_attentions", attributes.get("_output_attentions", False)))


def _transformers_function(name: str):
    registry = getattr(sys.modules.get("transformers.modeling_utils"), "ALL_ATTENTION_FUNCTIONS", None)
    if registry is None:
        return None
    mapping = getattr(registry, "_global_mapping", registry)
    return mapping.get(name)


def _eager_of(module):
    """The calling model's own eager attention; LLaMA's (the family every other one follows) where it has none."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        eager = importlib.import_module(families.FAMILIES[0].module).eager_attention_forward
    return eager


# ---------------------------------------------------------------- a whole model


def give_back(model, why: str) -> Optional[str]:
    """Set ``model`` to the attention transformers would have given it, for a feature that decides by the
    name. Returns that name, or None where the model does not run autoflash."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        return None
    to = transformers_choice(config, model)
    with passing_through():
        model.set_attn_implementation(to)
    record(why, f"transformers' {to} for the whole model", config)
    return to


def take_back(model) -> None:
    """autoflash again for a model ``give_back`` handed over."""
    with passing_through():
        model.set_attn_implementation(ATTENTION_NAME)


@contextlib.contextmanager
def passing_through():
    """Names set inside reach transformers as given (autoflash's request hook steps aside)."""
    token = _passing_through.set(True)
    try:
        yield
    finally:
        _passing_through.reset(token)


def is_passing_through() -> bool:
    return _passing_through.get()


# ---------------------------------------------------------------- the record


def record(what: str, to: str, config=None) -> None:
    """Count one hand-over; the first of each kind is logged at INFO (nothing for the user to fix: the
    answer is transformers' own)."""
    if tracing.is_tracing():
        return  # a traced program keeps no Python state; its untraced calls are recorded
    key = (what, to)
    with _lock:
        entry = _handed_over.get(key)
        if entry is None:
            entry = _handed_over[key] = {"call": what, "to": to, "asked_for": None, "count": 0}
            logger.log(logging.INFO, "%s: handed to %s, which computes it as transformers alone would",
                       what, to)
        entry["count"] += 1
        if config is not None:
            entry["asked_for"] = request_of(config) or "(transformers' default)"


def handed_over() -> List[dict]:
    """Every kind of call handed to transformers in this process, with how often (``status()``)."""
    with _lock:
        return [dict(entry) for entry in _handed_over.values()]
