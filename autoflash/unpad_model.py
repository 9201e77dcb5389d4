"""Padding removal for the whole decoder stack, not only for attention.

Unpadding inside attention alone still leaves the embedding, every projection, MLP and
norm, the LM head and the loss computing on padding: on LLaMA-3-8B-shaped layers with
lengths U(128, 4096), 44 % of a padded batch's tokens are padding. For a padded forward
that fills no cache for later decoding (training, evaluation, scoring), autoflash packs
the batch's real tokens into one row right after the embedding (their position ids kept,
``cu_seqlens`` marking each sequence), runs the layers on that row, and scatters the
outputs back to the padded shape: padded positions hold zeros. ``autoflash.packed_loss``
goes one step further when labels are given: logits and loss on the real tokens only.

Where this would change an answer it is not done, and the per-layer path (unpad inside
attention, pad on the way out) runs instead, with one debug line per reason
(``why_keep_padding``): a cache passed in or a call from ``generate``, a mask that is
not a 2-D key-padding mask, per-layer attention weights asked for, a model class
autoflash does not know, ``AUTOFLASH_UNPAD_MODEL=0``. A forward that returns a cache only
because ``use_cache`` defaults to True keeps the saving: the cache built on the packed
row is returned in the padded layout, equal to eager's at real positions.

How the packed row reaches attention: in one record per forward (``autoflash.forward.Forward``),
which transformers >= 4.48 passes from the decoder's forward (``LlamaModel.forward``) to the attention
function as a keyword argument, beside ``cu_seq_lens_q/k`` and ``max_length_q/k`` for its own code
(4.48-4.5x drop keywords under gradient checkpointing; 4.37-4.47 pass nothing on). Where they may not
arrive, the record is also published for the duration of the forward, and attention reads it there.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from autoflash import tracing
from autoflash.attention import decide_row, row_kernel, softcap_of
from autoflash.backend_names import FLASH_KERNELS
from autoflash.forward import KEYWORD as FORWARD_KEYWORD
from autoflash.forward import Forward, published
from autoflash.layout import Layout, pack, plan_from_given_boundaries, plan_traced, plan_without_cache, scatter
from autoflash.settings import UNPAD_MODEL_VARIABLE, say_once, settings

WHOLE_MODEL = "whole-model"
PER_LAYER = "per-layer"
ROUTER_LOGITS = "router_logits"  # a mixture of experts' output: one (tokens, experts) tensor per layer
# the decoder's keyword arguments that hold one value per input position (batch, length, ...), packed with its
# input ids: GPT-2's token types (embedded and added to the tokens' embeddings)
PER_TOKEN_KEYWORDS = ("token_type_ids",)


# State of the forward in progress, for the eras whose model code passes nothing on to attention.
# Context variables, read and written only outside traced code (``tracing.is_tracing()`` is checked
# first, and torch.compile folds it to a constant): a traced program holds none of it.
# depth of generate() calls
_generating = contextvars.ContextVar("autoflash_generating", default=0)
# (path, reason) of the last padded forward
_last = contextvars.ContextVar("autoflash_last_path", default=None)
# (where, reason) the last padded forward's LM head and loss ran, for a causal LM given labels (packed_loss)
_last_head = contextvars.ContextVar("autoflash_last_head", default=None)


def last_decision() -> Optional[dict]:
    """The path the last padded forward in this thread (context) took, and why: for tests, ``status()``
    and doctor."""
    last = _last.get()
    if last is None:
        return None
    path, reason = last
    decision = {"path": path, "reason": reason}
    head = _last_head.get()
    if head is not None:
        decision["lm_head_and_loss"] = {"on": head[0], "reason": head[1]}
    return decision


def record_head(on: str, reason: Optional[str]) -> None:
    """Where the LM head and the loss of the forward just recorded ran: "real tokens" or "padded layout"
    (and why), so that status() never reports a whole-model path whose head ran padded as all saved."""
    if not tracing.is_tracing():
        _last_head.set((on, reason))


@torch.compiler.assume_constant_result  # a compiled program's path is recorded when it is traced
def record(path: str, reason: Optional[str]) -> None:
    _last.set((path, reason))
    _last_head.set(None)  # a causal LM's wrapper says where its head ran, after its decoder
    if reason is not None:
        say_once(("per layer", reason), logging.DEBUG, "padding removed per layer, not for the whole model: %s",
                 reason)


# -- when -----------------------------------------------------------------------------------------

def runs_autoflash(module, attention_name) -> bool:
    """Models loaded with another implementation (eager, say) are left entirely alone."""
    return decoder_config(module)._attn_implementation == attention_name


def decoder_config(module):
    """The config of ``module``'s decoder stack: its own, or a vision-language model's text config (the composite's
    own holds no window and keeps transformers' implementation name; its language model's holds autoflash's)."""
    text = getattr(module.config, "text_config", None)
    return module.config if text is None else text


def is_model_class(module, model_class) -> bool:
    """``model_class`` itself, or what torch's FSDP2 (``fully_shard``) makes of it: a class of bases
    (FSDPModule, model_class) that adds sharding hooks and methods but runs the model's own forward."""
    cls = type(module)
    if cls is model_class:
        return True
    bases = cls.__bases__
    return (len(bases) == 2 and bases[1] is model_class and bases[0].__name__ == "FSDPModule"
            and bases[0].__module__.startswith("torch.distributed") and "forward" not in cls.__dict__)


@torch.compiler.assume_constant_result
def _whole_model_allowed() -> bool:
    # read at trace time (dynamo would trace the settings' lru_cache wrapper and its logger set-up: three
    # graph breaks per forward); a compiled program keeps the switch as it was when traced
    return settings().unpad_model


def why_keep_padding(module, model_class, family, attention_mask, kwargs, attention_name,
                     release: "Release") -> Optional[str]:
    """None where the whole stack may run on the real tokens; else the reason it may not."""
    # decode steps (a cache passed in) are the most frequent calls: answered first
    if release.cache_passed(kwargs):
        return "a KV cache was passed in"
    if not _whole_model_allowed():
        return f"{UNPAD_MODEL_VARIABLE}=0"
    if not is_model_class(module, model_class):
        return f"{type(module).__qualname__} is a subclass of {model_class.__name__} autoflash does not know"
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return "the attention mask is not a 2-D key-padding mask"
    if _generating_now():
        return "the call comes from generate(), which decodes from the cache it fills"
    if kwargs.get("cu_seq_lens_q") is not None:
        return "the caller passed cu_seq_lens_q (the batch is packed already)"
    for name in PER_TOKEN_KEYWORDS:
        given = kwargs.get(name)
        if given is not None and tuple(given.shape[:2]) != tuple(attention_mask.shape):
            return f"{name} is not laid out as the attention mask is (batch, length)"
    if kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
        return "output_attentions=True asks for per-layer weights in the padded layout"
    config = decoder_config(module)
    window = family.window(config)
    window = window if window is not None and attention_mask.shape[1] > window else None
    softcap = softcap_of(config)
    if window is not None or softcap is not None:
        dtype = kwargs["inputs_embeds"].dtype if kwargs.get("inputs_embeds") is not None else \
            module.get_input_embeddings().weight.dtype
        kernel = row_kernel(config, attention_mask.device, dtype, module.training, window, attention_mask.numel())
        if softcap is not None and not kernel:
            # each layer's call goes to transformers' eager attention, with a mask of the padded batch's rows
            return ("soft-capped attention logits (attn_logit_softcapping), which no kernel applies to this "
                    "forward's packed row")
        if window is not None and kernel not in FLASH_KERNELS:
            # SDPA would apply the window to the packed row by a mask of the row's size; per layer, each call's
            # mask stays the size of the padded batch's rows
            return (f"a sliding window of {window} applies to sequences this long, and only SDPA's mask would apply "
                    "it to the packed row (flash-attn applies windows)")
    return None


def unknown_per_token(kwargs, attention_mask) -> Optional[str]:
    """The first keyword argument holding a value per input position (a tensor laid out (batch, length, ...)) that
    the packed row does not lay out (``PER_TOKEN_KEYWORDS``), as the reason to keep the padding, else None: a
    vision-language model's per-position visual inputs (Qwen3-VL-style deepstack masks, Gemma 3n's per-layer
    inputs) would meet a packed row in the padded layout."""
    shape = tuple(attention_mask.shape)
    for name, value in kwargs.items():
        if (name not in PER_TOKEN_KEYWORDS and name != "inputs_embeds" and isinstance(value, torch.Tensor)
                and value.dim() >= 2 and tuple(value.shape[:2]) == shape):
            return f"{name} holds a value per input position, which autoflash does not lay out on the packed row"
    return None


def why_layout_keeps_padding(module, family, kwargs, layout: Layout) -> Optional[str]:
    """What the planned layout shows that keeps a sliding-window model's padding (``module``: the decoder or its
    causal LM: their config is read), else None.

    Padding inside a sequence: transformers counts the window in key slots, the packed row in tokens. And the
    cache a packed forward returns: a sliding window's cache layer keeps the window's last tokens of the row,
    which are not each row's own (eager's cache of rows no longer than the window keeps every token)."""
    config = decoder_config(module)
    window = family.window(config)
    if window is None:
        return None
    if layout.holes and layout.q_len > window:  # (a sequence spans more slots than tokens: the padded length bounds it)
        return (f"a sliding window of {window} over sequences with padding inside them (transformers counts the "
                "window in key slots)")
    use_cache = kwargs.get("use_cache")
    if not (use_cache if use_cache is not None else getattr(config, "use_cache", False)):
        return None
    tokens = layout.total if layout.indices is not None else layout.batch * layout.q_len
    if tokens <= window:
        return None
    return (f"the cache it returns would keep {window} of the packed row's {tokens} tokens (a sliding window); "
            "pass use_cache=False to keep the saving")


def wants_tuple(module, kwargs) -> bool:
    """Whether the caller asked for a tuple (``return_dict=False``, by argument or by the config)."""
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        config = module.config
        return not getattr(config, "return_dict", True) or bool(getattr(config, "torchscript", False))
    return not return_dict


def check_mask_shape(source, attention_mask, kwargs, release: "Release") -> None:
    """A 2-D mask of a forward without a cache has one column per input position: say so in the
    user's terms rather than fail inside attention with an internal reshape error."""
    if release.cache_passed(kwargs) or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    given = "input_ids" if kwargs.get("inputs_embeds") is None else "inputs_embeds"
    if tuple(attention_mask.shape) != tuple(source.shape[:2]):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but {given} has "
                         f"{tuple(source.shape[:2])} (batch, length): a 2-D attention mask needs one row per sequence "
                         "and one column per input position (autoflash)")


def zero_padded_positions(out, attention_mask):
    """The per-layer path's hidden states (and a mixture of experts' router logits) with zeros on padding, as the
    whole-model path returns them: padded positions hold zeros on every path (their values are not defined by any
    implementation)."""
    real = attention_mask.to(device=out["last_hidden_state"].device, dtype=torch.bool)[:, :, None]
    out["last_hidden_state"] = out["last_hidden_state"].masked_fill(~real, 0)
    if out.get("hidden_states") is not None:
        out["hidden_states"] = tuple(None if h is None else h.masked_fill(~real, 0) for h in out["hidden_states"])
    if out.get(ROUTER_LOGITS) is not None:
        flat = real.reshape(-1, 1)
        out[ROUTER_LOGITS] = tuple(t.masked_fill(~flat, 0) if _per_token(t, flat.shape[0]) else t
                                   for t in out[ROUTER_LOGITS])
    return out


def _per_token(t, tokens: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == tokens


def repad_router_logits(out, layout: Layout):
    """A mixture of experts' router logits of the packed row (one (real tokens, experts) tensor per layer) in the
    padded layout transformers returns them in, (batch * length, experts), zeros on padding. Its auxiliary loss is
    computed before, on the real tokens only (``autoflash.packed_loss``)."""
    if out.get(ROUTER_LOGITS) is not None:
        tokens = layout.batch * layout.q_len
        out[ROUTER_LOGITS] = tuple(scatter(t[None], layout).reshape(tokens, t.shape[-1])
                                   if _per_token(t, layout.total if layout.indices is not None else tokens) else t
                                   for t in out[ROUTER_LOGITS])
    return out


def plan(attention_mask, position_ids, batch, length, device, extra_check=None) -> Layout:
    """The packed layout of this forward (its one host sync); ``extra_check`` rides along on it."""
    mask = attention_mask.to(device=device, dtype=torch.bool)
    return plan_without_cache(mask, _positions(sequence_positions(position_ids), batch, length, device), batch,
                              length, device, extra_check=extra_check)


def sequence_positions(position_ids):
    """The position ids whose restarts mark packed sequences. M-RoPE's 3-D ids (rows, batch, length) (Qwen2-VL's
    temporal, height and width positions; an image's tokens share a temporal one): transformers reads sequences
    from a text row put first (4 rows), and from the mask alone where there is none (3 rows)."""
    if position_ids is None or position_ids.dim() != 3:
        return position_ids
    return position_ids[0] if position_ids.shape[0] == 4 else None


def _positions(position_ids, batch, length, device):
    # eager's own default: positions 0..length-1 in every row, left padding included (RoPE
    # depends on position differences only, so this equals positions counted from each row's
    # first real token)
    positions = position_ids if position_ids is not None else torch.arange(length, device=device)[None]
    return positions.expand(batch, length)


def _packed_positions(position_ids, batch, length, device, layout: Layout):
    """The position ids of the packed row: (1, real tokens), or (rows, 1, real tokens) for M-RoPE's."""
    if position_ids is not None and position_ids.dim() == 3:
        return pack(position_ids.permute(1, 2, 0), layout).permute(2, 0, 1)  # (one gather for every row)
    return pack(_positions(position_ids, batch, length, device), layout)


# -- the wrapper of the decoder's forward ---------------------------------------------------------

@dataclass(frozen=True)
class Release:
    """What the whole-model wrappers must know of the transformers release they run in. Its era's
    patch builds it (``patches/whole_model.py``): the runtime path names no release.

    How the model code hands the packed row's boundaries to attention: ``as_kwargs`` where it passes
    cu_seq_lens_q/k (and other keyword arguments) from the decoder's forward to attention;
    ``lost_under_checkpointing`` where it drops them under gradient checkpointing. Where they may
    not arrive, the forward's record is published for its duration (``autoflash.forward``), and a
    traced forward keeps its padding instead. ``mask_for_packed_row``: hand the packed row an
    all-ones mask (where transformers would otherwise search its position ids for boundaries, a
    second host sync) or none (where it scans a mask it is given).
    """

    # the decoder's cache argument and output key, then any older name the release still accepts
    cache_names: Tuple[str, ...]
    # (cache, layout) -> the cache filled on the packed row, laid out as the padded batch's
    repad_cache: Callable
    # (cache, attention_mask) -> the cache the padded batch's forward built, with zeros at padded positions
    zero_padded_cache: Callable
    # (module, logits, shift_labels, extra) -> the causal-LM loss over already shifted labels, where
    # extra holds what the caller passed beyond the causal LM's named arguments (num_items_in_batch, ...)
    loss: Callable
    as_kwargs: bool = True
    lost_under_checkpointing: bool = False
    mask_for_packed_row: bool = True
    # False for a decoder autoflash adopted rather than was taught (``autoflash.adoption``): whether its code
    # passes every keyword on to attention is not known, so the boundaries are published as well, and a traced
    # forward (where nothing can be published) keeps its padding
    keywords_reach_attention: bool = True
    # True where the causal LM's forward reads the padded batch's mask before its decoder runs (a vision-language
    # model computes M-RoPE positions from it): it is handed the mask with the packed row's record, which its
    # decoder takes instead; else no mask (a mixture of experts' auxiliary loss would weight the row by it)
    lm_reads_mask: bool = False

    def cache_passed(self, kwargs) -> bool:
        return any(kwargs.get(name) is not None for name in self.cache_names)

    def published(self, decoder) -> bool:
        """Whether a packed forward of ``decoder`` must publish its boundaries."""
        return not self.as_kwargs or not self.keywords_reach_attention or (
            self.lost_under_checkpointing and getattr(decoder, "gradient_checkpointing", False) and decoder.training)


def wrap(original, model_class, family, attention_name, release: Release):
    """``<Family>Model.forward`` (``model_class``, of ``family``: ``autoflash.families``), with padding
    removed from the whole stack where ``why_keep_padding`` allows."""
    def with_layout(module, input_ids, attention_mask, position_ids, kwargs):
        """kwargs, with the padded batch's layout for attention where it is known without a sync."""
        if not release.as_kwargs or release.cache_passed(kwargs) or kwargs.get("cu_seq_lens_q") is not None:
            return kwargs
        source = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        batch, length = source.shape[:2]
        if attention_mask is None and position_ids is None:
            # every row one sequence: attention need not search the position ids transformers fills in
            return {**kwargs, FORWARD_KEYWORD: Forward(Layout("dense", batch, length, length))}
        if tracing.is_tracing() and attention_mask is not None and attention_mask.dim() == 2:
            # the padded batch's mask, built once for every layer
            layout = plan_traced(attention_mask, sequence_positions(position_ids), batch, length, length,
                                 source.device)
            return {**kwargs, FORWARD_KEYWORD: Forward(layout)}
        return kwargs

    @functools.wraps(original)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, *args, **kwargs):
        # packed_loss's record of the forward, its plan made: it takes the packed row back
        given = kwargs.pop(FORWARD_KEYWORD, None)
        if given is None and not runs_autoflash(self, attention_name):
            return original(self, input_ids, attention_mask, position_ids, *args, **kwargs)  # left entirely alone
        if given is None and tracing.is_tracing() and (attention_mask is None or release.cache_passed(kwargs)
                                                       or release.published(self)
                                                       or not tracing.graph_breaks_allowed()):
            # Traced (torch.compile, torch.export) where the graph must not break here: an unpadded
            # batch, a decode step, or a trace that must stay whole. Padding stays; attention masks it.
            if attention_mask is not None and not release.cache_passed(kwargs):
                tracing.note(tracing.TRACE_SAFE, "a padded forward traced by torch.export or fullgraph "
                                                 "torch.compile keeps its padding; attention masks it")
                # padded positions hold zeros here too, as on every untraced path (one masked_fill)
                return per_layer(original, self, input_ids, attention_mask, position_ids, args,
                                 with_layout(self, input_ids, attention_mask, position_ids, kwargs), release)
            return original(self, input_ids, attention_mask, position_ids, *args,
                            **with_layout(self, input_ids, attention_mask, position_ids, kwargs))
        source = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if given is None:
            if source is not None and attention_mask is not None:
                check_mask_shape(source, attention_mask, kwargs, release)
            if source is not None and source.shape[1] * source.shape[0] == 0:
                return empty_batch(original, self, input_ids, attention_mask, position_ids, args, kwargs, source)
            # no mask: nothing to remove (packed rows are handled per layer, with no gather)
            if attention_mask is None or source is None:
                return original(self, input_ids, attention_mask, position_ids, *args,
                                **with_layout(self, input_ids, attention_mask, position_ids, kwargs))
            reason = "positional arguments after position_ids" if args else \
                why_keep_padding(self, model_class, family, attention_mask, kwargs, attention_name, release) or \
                unknown_per_token(kwargs, attention_mask)
            if reason is not None:
                record(PER_LAYER, reason)
                return per_layer(original, self, input_ids, attention_mask, position_ids, args, kwargs, release)
        batch, length = source.shape[:2]
        layout = given.batch if given is not None else plan(attention_mask, position_ids, batch, length,
                                                            source.device)
        if layout.kind == "varlen" and layout.total == 0:
            record(PER_LAYER, "no real token in the batch (every position is padding)")
            return per_layer(original, self, input_ids, attention_mask, position_ids, args, kwargs, release)
        reason = None if given is not None else why_layout_keeps_padding(self, family, kwargs, layout)
        if reason is not None:
            record(PER_LAYER, reason)
            return per_layer(original, self, input_ids, attention_mask, position_ids, args, kwargs, release)
        record(WHOLE_MODEL, None)
        tuple_wanted = wants_tuple(self, kwargs)
        out = packed_forward(original, self, input_ids, position_ids, {**kwargs, "return_dict": True}, layout,
                             release, packed_output=given is not None)
        return out.to_tuple() if tuple_wanted else out

    forward.__wrapped__ = original
    forward.autoflash_whole_model = True  # (a class is wired once: patches/whole_model.py checks it)
    return forward


def empty_batch(original, module, input_ids, attention_mask, position_ids, args, kwargs, source):
    """A batch with no rows or no positions: transformers' own answer where it has one, else an error that
    says what was passed (transformers fails inside its attention or mask code there, in most releases)."""
    given = "input_ids" if input_ids is not None else "inputs_embeds"
    try:
        return original(module, input_ids, attention_mask, position_ids, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised with what the caller passed
        raise ValueError(f"{given} has shape {tuple(source.shape)}: a batch with no "
                         f"{'rows' if source.shape[0] == 0 else 'positions'}, which transformers' LLaMA forward "
                         f"cannot run ({type(exc).__name__}: {exc})") from exc


def per_layer(original, module, input_ids, attention_mask, position_ids, args, kwargs, release: Release):
    """transformers' forward on the padded batch (padding removed inside attention only), its padded
    positions zeroed as on the whole-model path: hidden states and the cache it built."""
    if (args or release.cache_passed(kwargs) or not isinstance(attention_mask, torch.Tensor)
            or attention_mask.dim() != 2):
        return original(module, input_ids, attention_mask, position_ids, *args, **kwargs)
    tuple_wanted = wants_tuple(module, kwargs)
    out = zero_padded_positions(original(module, input_ids, attention_mask, position_ids,
                                         **{**kwargs, "return_dict": True}), attention_mask)
    for name in [k for k in release.cache_names if out.get(k) is not None]:  # a cache it built, none passed in
        out[name] = release.zero_padded_cache(out[name], attention_mask)
    return out.to_tuple() if tuple_wanted else out


def _generating_now() -> bool:
    # A traced forward does not ask: in the eras that trace whole, generate() passes its cache in, and
    # a packed prefill's cache is returned in the padded layout anyway (repad_cache).
    return not tracing.is_tracing() and _generating.get() > 0


def wrap_generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        token = _generating.set(_generating.get() + 1)  # its first forward fills the cache it decodes from
        try:
            return original(self, *args, **kwargs)
        finally:
            _generating.reset(token)

    generate.__wrapped__ = original
    return generate


# -- the packed forward ---------------------------------------------------------------------------

def boundaries_of(layout: Layout, batch: int, length: int, device) -> dict:
    if layout.kind == "dense":  # no padding: every row is one sequence of the full length
        cu_seqlens = torch.arange(batch + 1, device=device, dtype=torch.int32) * length
        return dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=length, max_length_k=length)
    return dict(cu_seq_lens_q=layout.cu_seqlens, cu_seq_lens_k=layout.cu_seqlens, max_length_q=layout.max_seqlen,
                max_length_k=layout.max_seqlen)


def packed_forward(original, module, input_ids, position_ids, kwargs, layout, release: Release,
                   packed_output=False):
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    source = input_ids if input_ids is not None else inputs_embeds
    batch, length, device = source.shape[0], source.shape[1], source.device
    boundaries = boundaries_of(layout, batch, length, device)
    publish = release.published(module)  # (never in a traced call: see wrap)
    packed_positions = _packed_positions(position_ids, batch, length, device, layout)
    tokens = packed_positions.shape[-1]
    # An all-ones mask: without one, transformers would search the packed position ids for
    # sequence boundaries itself, at the cost of a second host sync; cu_seq_lens_q already say.
    no_padding = torch.ones((1, tokens), dtype=torch.bool, device=device) if release.mask_for_packed_row else None
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = pack(inputs_embeds, layout)
    for name in [k for k in PER_TOKEN_KEYWORDS if kwargs.get(k) is not None]:
        kwargs[name] = pack(kwargs[name], layout)
    row = plan_from_given_boundaries(boundaries["cu_seq_lens_q"], boundaries["max_length_q"], 1, tokens)
    forward = Forward(layout, packed=True, row=row)
    if release.as_kwargs:
        kwargs.update(boundaries)  # (transformers' own code reads them: its mask, a hand-over's flash)
        hidden_dtype = inputs_embeds.dtype if inputs_embeds is not None else module.get_input_embeddings().weight.dtype
        # (whether gradients are on, and so whether a deterministic backward is asked for: the forward's,
        # for every layer)
        call, backend = decide_row(row, module.config, device, hidden_dtype, module.training, torch.is_grad_enabled())
        forward = Forward(layout, packed=True, row=row, row_call=call, row_backend=backend)
        kwargs[FORWARD_KEYWORD] = forward
    with published(forward) if publish else contextlib.nullcontext():
        out = original(module, pack(input_ids, layout) if input_ids is not None else None, no_padding,
                       packed_positions, **kwargs)
    if not packed_output:  # (a causal LM's own forward takes the row back: its loss reads it, then repads)
        out["last_hidden_state"] = scatter(out["last_hidden_state"], layout)
        repad_router_logits(out, layout)
    if out.get("hidden_states") is not None:  # (layers not asked for, by a list of indices, are None)
        out["hidden_states"] = tuple(None if h is None else scatter(h, layout) for h in out["hidden_states"])
    for name in [k for k in release.cache_names if k in out.keys()]:
        out[name] = release.repad_cache(out[name], layout)
    return out
