"""The two functions transformers calls: the mask function (once per forward) and the
attention function (once per layer). From here on a call is plain data: the ``Forward`` record
of the forward it belongs to, a ``Layout`` (where the real tokens are), an ``AttentionCall``
(what the kernel must support), a ``Decision`` (which backend, and why not the others).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from autoflash import dispatch, handover, tracing
from autoflash.call import AttentionCall, capability_of, deterministic_backward_asked
from autoflash.forward import KEYWORD as FORWARD_KEYWORD
from autoflash.forward import Forward
from autoflash.forward import current as current_forward
from autoflash.layout import Layout, allowed_keys, pad_key_mask, plan_for, plan_traced
from autoflash.settings import say_once

ATTENTION_NAME = handover.ATTENTION_NAME

def mask_function(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, cache_position=None, **kwargs):
    """Registered with transformers' AttentionMaskInterface, called once per forward.

    Returns what the attention function needs and nothing more, never a 4-D mask:
    ``None`` (every key valid), the 2-D key-padding mask (its width is the number of key
    slots in use; for a decode step on a static cache, the cache's full width), or, for a
    static cache without padding, a (batch,) int tensor of fill levels (the number of slots
    in use is a device value there; reading it would cost a host sync on every decode step).
    ``mask_function`` (transformers' description of causality and packing) is not needed:
    causality is the kernels' flag, and packing is read from position ids. A pattern beyond those
    (chunked attention, a bidirectional or custom mask: ``handover.why_mask_not_mine``) gets
    transformers' own sdpa mask, and with it transformers' own attention, recorded.

    Tensor operations only, no host sync: transformers calls it inside compiled decode steps,
    and in ``generate`` to build the mask its compiled step is then given.
    """
    # transformers composes packed sequences into a mask only where it is given no padding mask and no cache
    packing_possible = attention_mask is None and (q_length if q_length is not None else cache_position.shape[0]) \
        == kv_length
    why = handover.why_mask_not_mine(mask_function, kwargs.get("config"), (kv_length or 0) + (kv_offset or 0),
                                     packing_possible)
    if why is not None:
        return handover.transformers_mask(why, kwargs.pop("config", None), batch_size=batch_size, q_length=q_length,
                                          kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                                          mask_function=mask_function, attention_mask=attention_mask,
                                          cache_position=cache_position, **kwargs)
    if q_length is None:  # transformers 4.5x passes the cache positions of the queries instead
        q_length = cache_position.shape[0]
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return attention_mask
        width = attention_mask.shape[1]
        if width > kv_length:
            return attention_mask[:, -kv_length:]
        if q_length == 1 and width < kv_length:
            # A decode step on a static cache: the mask at the cache's width, so that every step of a
            # generation has the same shapes (compiled steps are recorded as CUDA graphs per shape);
            # slots past the fill level are no keys.
            return pad_key_mask(attention_mask, kv_length)
        return attention_mask[...]  # a fresh object per forward (layout.plan_for keys on it)
    if kv_length == q_length:
        return None
    # transformers < 5.2x passes cache_position; later releases the query offset
    fill = cache_position[-1] + 1 if cache_position is not None else q_offset + q_length
    if isinstance(fill, int) and fill == kv_length:
        return None
    device = cache_position.device if cache_position is not None else kwargs.get("device")
    return torch.as_tensor(fill, dtype=torch.int32, device=device).reshape(1).expand(batch_size).contiguous()


def decide_row(row: Layout, config, device, hidden_dtype, training: bool, needs_grad: bool, window=None):
    """(the packed row's attention call, the backend that serves it), decided once per forward before its first
    layer, in eager Python (``unpad_model``): each layer then only runs that backend (``attention_forward``),
    with no graph break per layer in a compiled model. ``needs_grad`` and ``training``: the forward's, which
    hold for each of its layers. A layer whose call differs (a dtype or head count of its own) takes the
    general path. (None, "") where the config states no sizes for every layer: each call then decides.
    ``window``: a binding sliding window, to ask which kernel would apply it (``row_kernel``)."""
    dtype = hidden_dtype
    if device.type == "cuda" and dtype == torch.float32:
        dtype = _cuda_autocast_dtype() or dtype  # what q_proj returns, as _to_kernel_dtype would cast
    try:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        dropout = float(getattr(config, "attention_dropout", 0.0) if training else 0.0)
    except Exception:  # noqa: BLE001 - sizes that vary by layer (Gemma 4's config refuses a global read)
        return None, ""  # each layer's call decides for itself
    call = AttentionCall(
        kind="varlen", device_type=device.type, capability=capability_of(device), dtype=dtype, head_dim=head_dim,
        num_heads=heads, num_kv_heads=kv_heads, q_len=row.q_len, kv_len=row.q_len, dropout=dropout, causal=True,
        needs_grad=needs_grad, window=window, deterministic=_deterministic(needs_grad, training),
        softcap=softcap_of(config))
    return call, dispatch.pick(call, device)


def softcap_of(source) -> Optional[float]:
    """The logit softcap of a config (``attn_logit_softcapping``) or of a call's keywords (``softcap``, as
    transformers hands it to attention), None where there is none."""
    value = source.get("softcap") if isinstance(source, dict) else getattr(source, "attn_logit_softcapping", None)
    return None if value in (None, 0, 0.0) else float(value)


def row_kernel(config, device, hidden_dtype, training: bool, window: Optional[int], tokens: int) -> str:
    """The backend that would serve a packed row of ``tokens`` with the config's softcap and a binding sliding
    ``window`` (None: none binds); "" where no kernel applies the softcap, or the config states no sizes for
    every layer. A whole-model forward takes the row only where a kernel applies both: SDPA would apply the
    window by a mask of the row's size, and transformers' eager attention the softcap by one too."""
    row = Layout("varlen", 1, tokens, tokens)
    return decide_row(row, config, device, hidden_dtype, training, torch.is_grad_enabled(), window)[1]


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """Registered with transformers' AttentionInterface. q (B, H, Lq, D), k/v (B, Hkv, Lk, D) -> ((B, Lq, H, D), None).

    The forward it belongs to (``autoflash.forward``) comes as the keyword ``autoflash_forward``, or where
    the release passes no keywords on, as the forward published for its duration."""
    forward = kwargs.get(FORWARD_KEYWORD) or current_forward()
    if forward is not None and forward.row_backend \
            and handover.why_not_mine(kwargs, attention_mask, module) is None \
            and _same_call(forward, query, key, dropout, is_causal, module, kwargs):
        scale = scaling if scaling is not None else forward.row_call.head_dim ** -0.5
        out = dispatch.backend(forward.row_backend).run(query, key, value, forward.row, forward.row_call, scale)
        return (out if out.dtype == query.dtype else out.to(query.dtype)), None
    return _attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, forward,
                              **kwargs)


def _same_call(forward: Forward, query, key, dropout, is_causal, module, kwargs) -> bool:
    call = forward.row_call
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (not kwargs.get("output_attentions") and query.dtype == call.dtype and query.shape[0] == 1
            and tuple(query.shape[1:]) == (call.num_heads, call.q_len, call.head_dim)
            and key.shape[1] == call.num_kv_heads and float(dropout) == call.dropout and bool(causal) == call.causal
            and _binding_window(kwargs, forward.row, key) is None and softcap_of(kwargs) == call.softcap)
    # (needs_grad and the deterministic backward's request are not compared: the forward's grad mode and
    # training flag, which decided them, hold for each of its layers)


def _binding_window(kwargs, layout, key):
    """The call's sliding window (transformers passes it as ``sliding_window``) where some sequence is longer
    than it, else None: a window no sequence reaches past changes nothing."""
    window = kwargs.get("sliding_window")
    if window is None:
        return None
    # transformers counts the window in key slots: padding between a row's real tokens would count, so
    # only a row of real tokens alone (the packed row) is judged by its longest sequence
    packed = layout.kind == "varlen" and layout.total == layout.batch * layout.q_len
    longest = layout.max_seqlen if packed else key.shape[2]
    return int(window) if longest > window else None


def _deterministic(needs_grad: bool, training: bool) -> str:
    """Who asked for a deterministic backward, for a call that has or will have one: a training module's
    forward without gradients too (reentrant checkpointing's first pass), so that it runs the kernel its
    recomputation will."""
    return deterministic_backward_asked() if needs_grad or training else ""


def _needs_grad(query, key, value) -> bool:
    return torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)


def _attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, forward, **kwargs):
    """Any call but the packed row's.

    A call traced by torch.compile or torch.export is tensor operations and custom ops only:
    its layout is built without a host sync (``layout.plan_traced``: padding and packed
    sequences become a mask rather than an unpadded row) and its backend is chosen by dispatch
    at trace time (``dispatch.pick``), so the compiled program holds neither Python decisions
    nor thread state, and a decode step can be one CUDA graph.
    """
    why = handover.why_not_mine(kwargs, attention_mask, module)
    if why is not None:
        return _hand_over(module, query, key, value, attention_mask, dropout, scaling, is_causal, forward, kwargs, why)
    in_dtype = query.dtype
    query, key, value = _to_kernel_dtype(query, key, value)
    layout = None if query.numel() == 0 else _layout_of(query, key, attention_mask, forward, kwargs)
    if layout is None or (layout.kind == "varlen" and layout.total == 0):
        # an empty batch, or every position padding: nothing for a kernel to do (flash kernels refuse
        # empty inputs); padded positions hold zeros
        batch, num_heads, q_len, head_dim = query.shape
        return query.new_zeros(batch, q_len, num_heads, head_dim, dtype=in_dtype), None
    call, name = _decided(layout, module, query, key, value, dropout, is_causal,
                          _binding_window(kwargs, layout, key), softcap_of(kwargs))
    if not name:  # a softcap that no kernel here applies
        query, key, value = (x.to(in_dtype) for x in (query, key, value))
        return _hand_over(module, query, key, value, attention_mask, dropout, scaling, is_causal, forward, kwargs,
                          "attention logit softcapping, which no kernel here applies"
                          + ("" if tracing.is_tracing() else " (" + dispatch.choose(call).why() + ")"))
    scale = scaling if scaling is not None else call.head_dim ** -0.5
    out = dispatch.backend(name).run(query, key, value, layout, call, scale)
    return (out if out.dtype == in_dtype else out.to(in_dtype)), None


def _layout_of(query, key, attention_mask, forward, kwargs):
    """The call's layout: the forward's record's where it holds it, else computed by the forward's first layer
    (``plan_for``, kept for the others)."""
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    known = forward.layout_for(batch, q_len, kv_len) if forward is not None else None
    if known is not None:
        return known
    plan = plan_traced if tracing.is_tracing() else plan_for
    return plan(attention_mask, kwargs.get("position_ids"), batch, q_len, kv_len, query.device,
                kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q"))


def _causal(module, is_causal) -> bool:
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))


def _decided(layout, module, query, key, value, dropout, is_causal, window=None, softcap=None):
    """This call's record and the backend that serves it.

    Every layer of a forward makes the same call: the first one's decision is kept on the
    forward's layout and the others reuse it, which spares a host-bound decode step the
    record, capability lookup and dispatch per layer. (A traced call's decision is taken
    once at trace time, where host cost does not matter.)
    """
    causal = _causal(module, is_causal)
    needs_grad = _needs_grad(query, key, value)
    deterministic = _deterministic(needs_grad, getattr(module, "training", False))
    if tracing.is_tracing():
        call = _call_record(layout, query, key, dropout, causal, needs_grad, window, deterministic, softcap)
        return call, dispatch.pick(call, query.device)
    memo = ("decision", query.shape, key.shape, query.dtype, query.device, float(dropout), causal, needs_grad,
            window, dispatch.routing(), deterministic, softcap)
    decided = layout.derived.get(memo)
    if decided is None:
        call = _call_record(layout, query, key, dropout, causal, needs_grad, window, deterministic, softcap)
        decided = layout.derived[memo] = (call, dispatch.pick(call, query.device))
    return decided


def _call_record(layout, query, key, dropout, causal: bool, needs_grad: bool, window=None,
                 deterministic: str = "", softcap: Optional[float] = None) -> AttentionCall:
    batch, num_heads, q_len, head_dim = query.shape
    return AttentionCall(
        kind=layout.kind, device_type=query.device.type, capability=capability_of(query.device),
        dtype=query.dtype, head_dim=head_dim, num_heads=num_heads, num_kv_heads=key.shape[1],
        q_len=q_len, kv_len=key.shape[2], dropout=float(dropout), causal=causal, needs_grad=needs_grad,
        left_padded_cache=layout.cache_leftpad is not None, cache_keys_contiguous=layout.keys_contiguous,
        window=window, holes=layout.holes, deterministic=deterministic, softcap=softcap,
    )


def _to_kernel_dtype(query, key, value):
    """float32 activations on a GPU run flash in the autocast dtype, as transformers' own flash path does.

    Without autocast they stay float32 and dispatch falls back to SDPA: casting a float32
    model's activations down silently would change its numerics.
    """
    if query.dtype != torch.float32 or query.device.type != "cuda":
        return query, key, value
    target = _cuda_autocast_dtype()
    if target is None:
        return query, key, value
    return query.to(target), key.to(target), value.to(target)


def _cuda_autocast_dtype():
    """The CUDA autocast dtype where autocast is on, else None."""
    try:
        enabled, target = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    except TypeError:  # torch < 2.4 has only the CUDA-specific spellings
        enabled, target = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return target if enabled else None


def _once(key: str, message: str, level: int = logging.WARNING) -> None:
    if not tracing.is_tracing():  # (said by the untraced calls; a log call inside a trace would break it)
        say_once(("attention", key), level, message)


def _hand_over(module, query, key, value, attention_mask, dropout, scaling, is_causal, forward, kwargs, why):
    """A call autoflash's kernels do not serve: transformers' own attention computes it (``autoflash.handover``),
    given the keys each query may see as autoflash's mask function described them."""
    if kwargs.get("output_attentions") or handover.config_asks_for_weights(module):
        # the user can do something about this one (load the model with eager): a warning, once
        _once("weights", "output_attentions=True runs eager attention for those calls (flash kernels "
                         "return no attention weights)")
    allowed = None
    if attention_mask is None or attention_mask.dim() <= 2:
        if handover.is_paged(kwargs):
            raise handover.NotHandedOver(
                f"autoflash: {why} reached autoflash's attention without the mask transformers builds for it, so "
                "neither autoflash nor transformers' sdpa can compute it exactly. Continuous batching runs "
                "transformers' own attention where autoflash is installed; if you set the model to "
                f"{ATTENTION_NAME!r} yourself, load it with attn_implementation='sdpa' instead.")
        layout = _layout_of(query, key, attention_mask, forward, kwargs)
        call = _call_record(layout, query, key, dropout, _causal(module, is_causal), False,
                            _binding_window(kwargs, layout, key))
        allowed = allowed_keys(layout, call, query.device)
    return handover.run(module, query, key, value, attention_mask, allowed, dropout, scaling, is_causal, kwargs, why)
