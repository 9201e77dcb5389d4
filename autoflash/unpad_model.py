"""Padding removal for the whole decoder stack, not only for attention.

Unpadding inside attention alone still leaves every projection, MLP and norm computing
on padding: on LLaMA-3-8B-shaped layers with lengths U(128, 4096), 42 % of a padded
batch's tokens are padding. For a forward that builds no cache (training, scoring),
autoflash therefore packs the batch's real tokens into one row before the first layer
(their original position ids preserved, ``cu_seqlens`` marking the rows and any packed
sequences), runs the layers on that row, and scatters the final hidden states back to
the padded shape; padded positions come back as zeros.

The only thing this changes is what padded positions hold, which nothing may depend on:
a loss term predicted *from* a padding position (the first real token of a left-padded
row, when its label is not -100) differs between every pair of implementations already
(../shared/FINDINGS.md item 4); autoflash says so once when it sees such a batch.
"""

from __future__ import annotations

import functools

import torch

from autoflash.layout import plan_without_cache
from autoflash.settings import logger

_said = set()


def _once(key, level, message):
    if key not in _said:
        _said.add(key)
        logger.log(level, message)


def _wants_per_layer_outputs(module, kwargs) -> bool:
    config = module.config
    return any(kwargs.get(name, getattr(config, name, False))
               for name in ("output_hidden_states", "output_attentions"))


def eligible(module, attention_mask, kwargs, attention_name) -> bool:
    """Whole-stack unpadding applies to padded forwards that build no cache and return no per-layer outputs."""
    if module.config._attn_implementation != attention_name:
        return False
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return False
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return False
    if "cu_seq_lens_q" in kwargs or _wants_per_layer_outputs(module, kwargs):
        return False
    use_cache = kwargs.get("use_cache")
    if use_cache is False:
        return True
    # A training step asks for a cache only because config.use_cache defaults to True;
    # transformers itself drops it under gradient checkpointing.
    return module.training and torch.is_grad_enabled()


def wrap(original, attention_name, mask_for_packed_row=True):
    """LlamaModel.forward, with padding removed from the whole stack where ``eligible``.

    ``mask_for_packed_row``: hand the packed row an all-ones mask (transformers >= 4.53 would
    otherwise search its position ids for boundaries, a second host sync) or none (earlier
    releases scan a mask they are given instead).
    """
    @functools.wraps(original)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, *args, **kwargs):
        if args or not eligible(self, attention_mask, kwargs, attention_name):
            return original(self, input_ids, attention_mask, position_ids, *args, **kwargs)
        return _packed_forward(original, self, input_ids, attention_mask, position_ids, kwargs,
                               mask_for_packed_row)

    forward.__wrapped__ = original
    return forward


def _packed_forward(original, module, input_ids, attention_mask, position_ids, kwargs, mask_for_packed_row):
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    source = input_ids if input_ids is not None else inputs_embeds
    batch, length = source.shape[:2]
    device = source.device
    mask = attention_mask.to(device=device, dtype=torch.bool)
    positions = position_ids if position_ids is not None else torch.arange(length, device=device)[None]
    positions = positions.expand(batch, length)
    plan = plan_without_cache(mask, positions, batch, length, device)  # the forward's one host sync
    if plan.kind == "dense":  # no padding: every row is one sequence of the full length
        cu_seqlens = torch.arange(batch + 1, device=device, dtype=torch.int32) * length
        max_seqlen, take = length, None
    else:
        cu_seqlens, max_seqlen, take = plan.cu_seqlens, plan.max_seqlen, plan.indices
        if module.training and torch.is_grad_enabled() and plan.left_padded:
            _once("left", 20, "autoflash: left-padded training batch; padded positions hold zeros after padding "
                              "removal, so a label predicted from a padding position (each row's first real token) "
                              "gives a different loss than eager would. Set those labels to -100.")

    def pack(x):
        flat = x.reshape(batch * length, *x.shape[2:])
        return (flat if take is None else flat.index_select(0, take)).unsqueeze(0)

    if kwargs.get("use_cache") is not False:
        _once("cache", 20, "autoflash: a padded training forward builds no KV cache (padding removal packs the batch)")
    kwargs.update(use_cache=False, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen,
                  max_length_k=max_seqlen)
    packed_positions = pack(positions)
    # An all-ones mask: without one, transformers would search the packed position ids for
    # sequence boundaries itself, at the cost of a second host sync; cu_seq_lens_q already say.
    no_padding = torch.ones(packed_positions.shape, dtype=torch.bool, device=device) if mask_for_packed_row else None
    out = original(module, pack(input_ids) if input_ids is not None else None, no_padding, packed_positions,
                   inputs_embeds=pack(inputs_embeds) if inputs_embeds is not None else None, **kwargs)
    hidden = out[0][0]  # (total, hidden)
    if take is None:
        padded = hidden.view(batch, length, -1)
    else:
        padded = hidden.new_zeros(batch * length, hidden.shape[-1]).index_copy(0, take, hidden)
        padded = padded.view(batch, length, -1)
    if isinstance(out, tuple):
        return (padded,) + tuple(out[1:])
    out["last_hidden_state"] = padded
    return out

