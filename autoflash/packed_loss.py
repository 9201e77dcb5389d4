"""Logits and loss on the real tokens only, for the causal-LM forwards (``<Family>ForCausalLM``) given labels.

After ``autoflash.unpad_model`` has run the decoder stack on the packed row, the LM head
and the loss need not see padding either: the largest tensor of a training step is the
logits, ``[batch, padded length, vocab]`` (then once more in float32 for the loss).

Where the release passes keyword arguments from the causal LM to its decoder (transformers
>= 4.48), the model's own forward runs on the packed row: its LM head (whatever it does to the
logits: soft-capping, scaling), its loss (whatever it adds: a router term), its output class.
It is handed the packed targets one place late, so that its own shift by one scores each real
token against the next token of the same sequence, and no attention mask (every packed token is
real: a mask-weighted term over the padded batch equals the plain term over the row); a vision-language
model, which computes its M-RoPE positions from the mask before its decoder runs, is handed the padded
batch's (its decoder takes the packed row's record instead). Before
4.48 the causal LM calls its decoder with named arguments only; there the LM head runs on the
real tokens and the loss is the one those releases compute inline (targets ``labels[t + 1]``,
``-100`` ignored, ``num_items_in_batch`` dividing a summed loss). Either way the loss equals
eager's.

The padded ``logits`` are built only if the caller reads them (``out.logits``,
``out["logits"]``, ``out[1]``, ``to_tuple()``, ``items()``): a training loop that only calls
``out.loss.backward()`` never allocates them. Padded positions then hold zeros.

A loss term predicted *from* a padding position (a label that is not -100 right after padding:
the first real token of a left-padded row, ../shared/FINDINGS.md item 4) has no real token
to come from: such a batch gets transformers' own LM head and loss over the padded layout, whose
padded positions hold zeros (as on every path); the decoder still runs on the packed row.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging

import torch

from autoflash import tracing, unpad_model
from autoflash.forward import KEYWORD as FORWARD_KEYWORD
from autoflash.forward import Forward
from autoflash.layout import pack, scatter
from autoflash.settings import say_once

IGNORE_INDEX = -100  # transformers' label for a position without a target
REAL_HEAD, PADDED_HEAD = "real tokens", "padded layout"  # where the LM head and loss ran (status())
# output class -> (its subclass with logits built on first read, its field names): see _lazy_output_class
_LAZY = {}
# the causal LM's own arguments: everything else is passed on to the model, as its forward does
_LM_ONLY = ("labels", "logits_to_keep", "num_logits_to_keep", "shift_labels")


def wrap(original, lm_class, family, attention_name, release: unpad_model.Release):
    """``lm_class``: the family's ForCausalLM (``autoflash.families``); ``release``: as given to
    ``unpad_model.wrap``; where a traced decoder keeps its padding, so do logits and loss."""
    signature = inspect.signature(original)
    _lazy_output_class(_declared_output(signature))
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    # what the caller passes beyond these goes to the loss too (num_items_in_batch, ...), as the forward does
    named = frozenset(p.name for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if not unpad_model.runs_autoflash(self, attention_name):
            return original(self, *args, **kwargs)
        if tracing.is_tracing() and (not tracing.graph_breaks_allowed() or (kwargs.get("labels") is None and not args)
                                     or release.published(getattr(self, "model", None))):
            # traced where padding stays: logits and loss as transformers computes them
            return original(self, *args, **kwargs)
        if not unpad_model.is_model_class(self, lm_class):  # its own code may depend on the padded layout
            return _padded_logits(self, f"{type(self).__qualname__} is a subclass of {lm_class.__name__} "
                                        "autoflash does not know", original, args, kwargs)
        if kwargs.get("labels") is None and not args:  # decode steps and forwards without labels: no binding
            return original(self, *args, **kwargs)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)  # let transformers say what is wrong
        call = dict(bound.arguments)
        call.pop(next(iter(signature.parameters)))  # self
        call.update(call.pop(var_keyword, None) or {})
        if call.get("labels") is None:
            return original(self, *args, **kwargs)
        extra = {k: v for k, v in call.items() if k not in named and k not in _LM_ONLY}
        return _forward_with_labels(original, self, lm_class, family, attention_name, release, args, kwargs, call,
                                    extra)

    forward.__wrapped__ = original
    return forward


def _forward_with_labels(original, module, lm_class, family, attention_name, release, args, kwargs, call, extra):
    mask, labels = call.get("attention_mask"), call["labels"]
    source = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
    if source is not None and mask is not None:
        unpad_model.check_mask_shape(source, mask, call, release)
    reason = unpad_model.why_keep_padding(module, lm_class, family, mask, call, attention_name, release)
    if reason is None:  # (what goes on to the decoder beyond the causal LM's own arguments)
        reason = unpad_model.unknown_per_token(extra, mask)
    keep = call.get("logits_to_keep", call.get("num_logits_to_keep"))
    if reason is None and not (keep is None or (isinstance(keep, int) and keep == 0)):
        reason = "logits_to_keep is set"  # an int or a tensor of positions
    if reason is None and (not isinstance(labels, torch.Tensor) or labels.shape != mask.shape):
        reason = "labels do not have the attention mask's shape"
    if reason is None and _compiled_on_its_own(getattr(module, "model", None)):
        reason = "the decoder (model.model) is compiled on its own"
    if reason is not None:
        return _padded_logits(module, reason, original, args, kwargs)

    device = mask.device
    shift_labels = call.get("shift_labels")
    if shift_labels is None:  # transformers' convention: position t predicts labels[t + 1]
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    shift_labels = shift_labels.to(device)
    real = mask.to(device=device, dtype=torch.bool)
    predicted_from_padding = ((shift_labels != IGNORE_INDEX) & ~real).any()
    batch, length = mask.shape
    layout = unpad_model.plan(mask, call.get("position_ids"), batch, length, device,
                              extra_check=predicted_from_padding)
    model_kwargs = {k: v for k, v in call.items() if k not in _LM_ONLY}
    if layout.extra_check:
        return _padded_logits(module, "a label predicted from a padding position is not -100 (set it to -100 "
                                      "to keep the saving)", original, args, kwargs)
    if layout.kind == "varlen" and layout.total == 0:
        return _padded_logits(module, "no real token in the batch (every position is padding)", original, args,
                              kwargs)
    why = unpad_model.why_layout_keeps_padding(module, family, call, layout)
    if why is not None:  # (the decoder, called padded, records the same reason for its layers)
        return _padded_logits(module, why, original, args, kwargs)
    tuple_wanted = unpad_model.wants_tuple(module, call)
    targets = pack(shift_labels, layout)  # (1, real tokens): what each real token is scored against
    if release.as_kwargs:
        output = _models_own_forward(original, module, call, layout, targets, release)
    else:
        model_kwargs["return_dict"] = True
        out = module.model(**model_kwargs, **{FORWARD_KEYWORD: Forward(layout, packed=True)})  # the row back
        hidden = out["last_hidden_state"]  # (1, real tokens, hidden)
        logits = module.lm_head(hidden)
        loss = release.loss(module, logits, targets, extra)
        fields = {**{k: out.get(k) for k in out.keys() if k != "last_hidden_state"}, "loss": loss, "logits": logits}
        output = _with_padded_logits_on_read(_declared_output(None), fields, layout)
    unpad_model.record_head(REAL_HEAD, None)
    return output.to_tuple() if tuple_wanted else output


def _models_own_forward(original, module, call, layout, targets, release):
    """The causal LM's own forward, its decoder on the packed row: its head, its loss, its output."""
    # its loss scores position t against labels[t + 1]: given the targets one place late, each real token
    # is scored against its own target (the row's last target is -100: no label follows a sequence's end
    # unless one is predicted from padding, which keeps the padded layout)
    late = torch.nn.functional.pad(targets, (1, 0), value=IGNORE_INDEX)[:, :-1]
    given = {**call, "labels": late, "return_dict": True, FORWARD_KEYWORD: Forward(layout, packed=True)}
    if not release.lm_reads_mask:
        given["attention_mask"] = None
    if call.get("shift_labels") is not None:  # the caller's own targets, taken as they are
        given["shift_labels"] = targets
    out = original(module, **given)
    unpad_model.repad_router_logits(out, layout)  # (its auxiliary loss, computed on the real tokens, is in out)
    fields = {k: out.get(k) for k in out.keys()}
    return _with_padded_logits_on_read(type(out), fields, layout)


def _compiled_on_its_own(decoder) -> bool:
    # torch.compile(model.model) or model.model.compile(): a plan passed in would be an input its trace
    # specialises on (a recompilation per batch); the decoder plans for itself instead
    return decoder is not None and (getattr(decoder, "_compiled_call_impl", None) is not None
                                    or type(decoder).__name__ == "OptimizedModule")


def _padded_logits(module, reason, original, args, kwargs):
    """transformers' own forward: logits and loss over the padded layout. Its decoder still decides for
    itself whether the layers run on the packed row: the hidden states it returns are the same either way
    (padded positions hold zeros on every path)."""
    say_once(("padded head", reason), logging.DEBUG, "logits and loss on the padded layout: %s", reason)
    out = original(module, *args, **kwargs)
    unpad_model.record_head(PADDED_HEAD, reason)
    return out


# -- the output, with padded logits built on first use ---------------------------------------------

def _declared_output(signature):
    """The output class a causal LM's forward declares (transformers annotates it), else LLaMA's."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    declared = signature.return_annotation if signature is not None else None
    if isinstance(declared, type) and dataclasses.is_dataclass(declared):
        return declared
    return CausalLMOutputWithPast


# Reached in a trace only where it may break (fullgraph compiles and exports keep transformers' own
# output: see wrap); dynamo traces it whole there (findings 60).
def _with_padded_logits_on_read(output_class, fields, layout):
    """``output_class`` holding ``fields``, whose packed ``logits`` are laid out padded when first read."""
    packed_logits = fields["logits"]
    lazy = _LAZY.get(output_class)
    if lazy is None:
        if tracing.is_tracing():  # a class is made outside traces only: lay the logits out now
            return output_class(**{**fields, "logits": scatter(packed_logits, layout)})
        lazy = _lazy_output_class(output_class)
    lazy_class, names = lazy
    placeholder = torch.empty(0)  # holds the logits' place in the output's key order until built
    out = lazy_class(**{name: placeholder if name == "logits" else fields.get(name) for name in names})
    out.__dict__["_autoflash_build_logits"] = lambda: scatter(packed_logits, layout)
    return out


def _lazy_output_class(base):
    """(the subclass of ``base`` with logits built on first read, ``base``'s field names), made once per class
    and kept: made when a model is patched for the class its forward declares, since a trace cannot make a
    class or read a dataclass's fields."""
    if base not in _LAZY:
        _LAZY[base] = (_lazy_class(base), tuple(f.name for f in dataclasses.fields(base)))
    return _LAZY[base]


def _build(output) -> None:
    build = output.__dict__.pop("_autoflash_build_logits", None)
    if build is not None:
        output.logits = build()


@functools.lru_cache(maxsize=None)
def _lazy_class(base):
    # logits as a property, not a __getattribute__ override: dynamo traces building this class's
    # instances only without one (findings 54)
    class WithPackedLogits(base):
        @property
        def logits(self):
            _build(self)
            return self.__dict__.get("_autoflash_logits")

        @logits.setter
        def logits(self, value):
            self.__dict__["_autoflash_logits"] = value

        def __getitem__(self, key):
            _build(self)
            return super().__getitem__(key)

        def to_tuple(self):
            _build(self)
            return super().to_tuple()

        def items(self):
            _build(self)
            return super().items()

        def values(self):
            _build(self)
            return super().values()

    WithPackedLogits.__name__ = base.__name__
    WithPackedLogits.__qualname__ = base.__qualname__
    WithPackedLogits.__module__ = base.__module__
    return WithPackedLogits
