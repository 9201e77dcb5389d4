"""Where the real tokens of one forward pass are: unpad / pad / cu_seqlens, computed once per forward.

transformers calls the attention function once per layer with the same mask and
position ids. Everything derived from them (indices of real tokens, sequence
boundaries, their lengths) is computed by the first layer and reused by the others:
``plan_for`` keeps the last plan per thread, keyed on the identity and version of
those tensors, so the cost is one small computation and at most one host-device
synchronisation per forward, whatever the depth of the model.

Three kinds of layout:

``dense``   every query is a real token of one sequence per row and no cache precedes
            it: the kernels run on the padded tensors as they are, no unpad work.
``varlen``  padding (any pattern) and/or packed sequences (position ids that restart)
            and no cache: queries, keys and values are unpadded to the real tokens,
            ``cu_seqlens`` mark the sequences, outputs are padded back.
``cache``   keys come from a KV cache longer than the query: each row's valid keys are
            one contiguous range ``[leftpad, fill)`` (left padding; a static cache's
            unused tail past ``fill``), served by the kernels' cache-aware entry points.
            A prefill of several tokens also gets the unpadded form (indices and
            cu_seqlens for queries and for keys) for kernels without such an entry point.
``masked``  padding and/or packed sequences in a traced call (torch.compile, torch.export):
            unpadding makes shapes depend on the data and needs a host sync, so the
            sequences are only described on the device (``segment_ids``) and served by
            kernels that take a dense mask, on the padded tensors.
"""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class Layout:
    kind: str  # "dense" | "varlen" | "cache" | "masked"
    batch: int
    q_len: int
    kv_len: int
    # varlen: real tokens, in row-major order, and their sequences
    indices: Optional[torch.Tensor] = None  # (total,) int64 positions in the flattened (batch*q_len) grid; None = all
    cu_seqlens: Optional[torch.Tensor] = None  # (n_seq + 1,) int32, queries (and keys outside a cache)
    max_seqlen: int = 0
    total: int = 0
    segment_ids: Optional[torch.Tensor] = None  # (batch, q_len) int64, -1 on padding: for masked dense fallbacks
    left_padded: bool = False  # some row starts with padding
    # some sequence has padding between two of its real tokens: a sliding window, which transformers counts in
    # key slots, then differs from one counted in real tokens (as varlen kernels count it)
    holes: bool = False
    # cache: each row's valid keys are [cache_leftpad, cache_seqlens); queries end at cache_seqlens
    cache_seqlens: Optional[torch.Tensor] = None  # (batch,) int32 fill levels
    cache_leftpad: Optional[torch.Tensor] = None  # (batch,) int32, None = not known to be one range
    key_mask: Optional[torch.Tensor] = None  # (batch, kv_len) bool, None = every key valid
    keys_contiguous: bool = True  # False: not known to be one range per row; only masked kernels serve it
    key_indices: Optional[torch.Tensor] = None  # (total_k,) positions in the (batch*kv_used) key grid
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_k: int = 0
    kv_used: Optional[int] = None  # key slots that can hold keys (fill level) where known on the host
    # how many host-device synchronisations building this layout cost (0 or 1)
    syncs: int = 0
    # the value of a caller's extra boolean check, read in the same synchronisation
    extra_check: Optional[bool] = None
    # tensors a backend derives from the layout (a dense mask, say): built by the forward's
    # first layer, reused by the others
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    def derive(self, key: tuple, build, sizes: tuple = ()):
        """``build()``, once per layout, ``key`` and ``sizes`` (the forward's first layer builds, the others
        reuse).

        In traced code ``sizes`` are left out of the key: a traced size may be a symbol, and looking a symbol up
        in a dict compares it with the sizes already there, which pins it to one value (a recompilation for
        every new length). One layout serves one forward, whose calls share their sizes, so nothing is confused
        by it."""
        if not torch.compiler.is_compiling():
            key = key + tuple(sizes)
        if key not in self.derived:
            self.derived[key] = build()
        return self.derived[key]


def _nonzero_1d(flags: torch.Tensor, count: int) -> torch.Tensor:
    # torch.nonzero must sync to learn its output size; the size is already known here.
    if hasattr(torch, "nonzero_static") and flags.device.type in ("cuda", "cpu"):
        return torch.nonzero_static(flags, size=count).flatten()
    return torch.nonzero(flags).flatten()


def sequence_starts(real: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """(batch, length) bool: where a sequence begins among the real tokens.

    A sequence begins at the first real token of a row and at every real token whose
    position id does not increase over the previous *real* token of the same row (a
    packed row restarts its positions; padding in between does not break a sequence).
    """
    batch, length = real.shape
    if position_ids is None:
        first_real = real & (real.long().cumsum(-1) == 1)
        return first_real
    pos = position_ids.expand(batch, length)
    arange = torch.arange(length, device=real.device).expand(batch, length)
    last_real = torch.where(real, arange, torch.full_like(arange, -1)).cummax(dim=-1).values
    prev_real = torch.cat([last_real.new_full((batch, 1), -1), last_real[:, :-1]], dim=-1)
    prev_pos = pos.gather(-1, prev_real.clamp(min=0))
    return real & ((prev_real < 0) | (pos <= prev_pos))


def _segments(real: torch.Tensor, starts: torch.Tensor):
    """(each cell's sequence number in row-major order, flat; (batch, length) segment ids, -1 on padding)."""
    seq_of_token = starts.reshape(-1).long().cumsum(0) - 1
    segment_ids = torch.where(real.reshape(-1), seq_of_token, torch.full_like(seq_of_token, -1)).view(real.shape)
    return seq_of_token, segment_ids


def pad_key_mask(mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(batch, width) key-padding mask -> (batch, kv_len) bool, slots past the width no keys."""
    mask = mask.to(torch.bool)
    if mask.shape[1] == kv_len:
        return mask
    return torch.cat([mask, mask.new_zeros(mask.shape[0], kv_len - mask.shape[1])], dim=1)


def plan_without_cache(mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                       batch: int, q_len: int, device: torch.device,
                       extra_check: Optional[torch.Tensor] = None) -> Layout:
    """``extra_check``: a 0-d bool device tensor whose value the caller needs on the host too;
    it is read in this plan's synchronisation, not a second one (``Layout.extra_check``)."""
    if mask is None and position_ids is None:
        return Layout("dense", batch, q_len, q_len)
    if mask is not None and mask.dtype != torch.bool:  # transformers < 4.48 passes the user's 0/1 mask
        mask = mask.bool()
    real = mask if mask is not None else torch.ones(batch, q_len, dtype=torch.bool, device=device)
    starts = sequence_starts(real, position_ids)
    flat_real, flat_starts = real.reshape(-1), starts.reshape(-1)
    n_cells = flat_real.numel()
    seq_of_token, segment_ids = _segments(real, starts)
    slot = torch.where(flat_real, seq_of_token, torch.full_like(seq_of_token, n_cells))
    lengths = torch.zeros(n_cells + 1, dtype=torch.long, device=device).scatter_add_(
        0, slot, torch.ones_like(slot))[:n_cells]
    left_t = ((~real[:, 0]) & real.any(dim=1)).any()
    # a real token after padding that does not begin a sequence
    after_padding = real & ~torch.nn.functional.pad(real[:, :-1], (1, 0), value=True)
    holes_t = (after_padding & ~starts).any()
    scalars = [flat_real.sum(), flat_starts.sum(), lengths.max(), left_t.long(), holes_t.long()]
    if extra_check is not None:
        scalars.append(extra_check.long())
    # the one host-device synchronisation of this forward: these scalars at once
    total, n_seq, max_seqlen, left, holes, *extra = torch.stack(scalars).tolist()
    extra = bool(extra[0]) if extra else None
    if total == n_cells and n_seq == batch:
        return Layout("dense", batch, q_len, q_len, syncs=1, extra_check=extra)
    cu_seqlens = torch.nn.functional.pad(lengths[:n_seq].cumsum(0), (1, 0)).to(torch.int32)
    # packed rows without padding need no gather: every token is real, in place
    indices = None if total == n_cells else _nonzero_1d(flat_real, total)
    return Layout("varlen", batch, q_len, q_len, indices=indices, cu_seqlens=cu_seqlens,
                  max_seqlen=max_seqlen, total=total, segment_ids=segment_ids, left_padded=bool(left),
                  holes=bool(holes), syncs=1, extra_check=extra)


def plan_from_given_boundaries(cu_seqlens: torch.Tensor, max_seqlen: int, batch: int, q_len: int) -> Layout:
    """Packed rows whose boundaries the caller computed (TRL's padding-free collator): no sync."""
    if batch != 1:
        raise ValueError(f"cu_seq_lens_q was given with a batch of {batch} rows; packed inputs must be one row "
                         "(batch size 1) of concatenated sequences")
    cu_seqlens = cu_seqlens.to(torch.int32)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_index = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device),
                                        lengths.long(), output_size=q_len)
    return Layout("varlen", batch, q_len, q_len, indices=None, cu_seqlens=cu_seqlens,
                  max_seqlen=int(max_seqlen), total=q_len, segment_ids=seq_index.view(1, q_len))


def _cache_keys(keys: Optional[torch.Tensor], batch: int, q_len: int, kv_len: int, device: torch.device):
    """(fill levels (batch,) int32, key mask (batch, kv_len) bool or None) from what the mask function returned."""
    if keys is None:
        return torch.full((batch,), kv_len, dtype=torch.int32, device=device), None
    arange = torch.arange(kv_len, device=device)
    if keys.dim() == 1:
        fills = keys.to(device=device, dtype=torch.int32)
        return fills, arange[None, :] < fills[:, None]
    width = keys.shape[1]
    key_mask = pad_key_mask(keys.to(device), kv_len)
    if q_len == 1 and width == kv_len:
        # A decode step's mask may span a static cache's width, past its fill level (the mask
        # function pads it so that every step has one shape). The one query sees every valid
        # key, so each row's fill level is taken as its last valid key + 1.
        fills = torch.where(key_mask, arange + 1, 0).amax(dim=-1).to(torch.int32)
    else:
        fills = torch.full((batch,), width, dtype=torch.int32, device=device)
    return fills, key_mask


def plan_with_cache(keys: Optional[torch.Tensor], batch: int, q_len: int, kv_len: int,
                    device: torch.device, traced: bool = False) -> Layout:
    """Queries are the q_len positions just before each row's fill level; keys are the cache.

    ``keys`` is what autoflash's mask function returned: None (every key valid), a
    (batch,) int tensor of fill levels (a static cache without padding), or a
    (batch, width) bool key-padding mask whose width is the fill level (or, for a decode
    step, the cache's width). Slots at and past the fill level (a static cache's unused
    tail) are never keys. ``traced``: no host sync; a prefill with a mask is then described
    by its key mask alone, for kernels that take one.
    """
    fills, key_mask = _cache_keys(keys, batch, q_len, kv_len, device)
    if key_mask is None:
        # every key valid: each row is q_len queries against kv_len keys, known without a sync
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device) * q_len
        cu_k = torch.arange(batch + 1, dtype=torch.int32, device=device) * kv_len
        return Layout("cache", batch, q_len, kv_len, cache_seqlens=fills, cu_seqlens=cu_q, max_seqlen=q_len,
                      total=batch * q_len, cu_seqlens_k=cu_k, max_seqlen_k=kv_len, kv_used=kv_len)
    if q_len == 1:
        # A decode step. A static cache without padding (fill levels given) is one range per row;
        # a padding mask is not checked for being plain left padding (what flash_attn_with_kvcache's
        # cache_leftpad can express): that would cost a host sync on every step, which stalls the
        # CPU's kernel launches. Masked kernels take any mask.
        return Layout("cache", batch, q_len, kv_len, cache_seqlens=fills, key_mask=key_mask,
                      keys_contiguous=keys.dim() == 1)
    if traced:
        return Layout("cache", batch, q_len, kv_len, cache_seqlens=fills, key_mask=key_mask, keys_contiguous=False)
    arange = torch.arange(kv_len, device=device)
    valid = key_mask.sum(-1)
    leftpad = torch.where(key_mask, arange, kv_len).amin(dim=-1).to(torch.int32)
    # valid keys must be exactly [leftpad, fill) in every row: left padding only
    contiguous = ((valid == fills - leftpad) & (leftpad < fills)).all() & (fills.amax() == fills.amin())
    # q_len > 1 (prefill into a static cache, chunked prefill): also the unpadded form, for
    # kernels that have no cache-aware entry point
    q_pos = fills[:, None].long() - q_len + torch.arange(q_len, device=device)[None, :]
    q_real = key_mask.gather(1, q_pos.clamp(min=0)) & (q_pos >= 0)
    n_q = q_real.sum(-1)
    ok, fill, total_q, total_k, max_q, max_k = torch.stack(
        [contiguous.long(), fills.amax().long(), n_q.sum(), valid.sum(), n_q.amax(), valid.amax()]).tolist()
    if not ok:
        return Layout("cache", batch, q_len, kv_len, cache_seqlens=fills, key_mask=key_mask,
                      keys_contiguous=False, syncs=1)
    return Layout("cache", batch, q_len, kv_len, cache_seqlens=fills, cache_leftpad=leftpad, key_mask=key_mask,
                  indices=_nonzero_1d(q_real.reshape(-1), total_q),
                  cu_seqlens=torch.nn.functional.pad(n_q.cumsum(0), (1, 0)).to(torch.int32), max_seqlen=max_q,
                  total=total_q, key_indices=_nonzero_1d(key_mask[:, :fill].reshape(-1), total_k),
                  cu_seqlens_k=torch.nn.functional.pad(valid.cumsum(0), (1, 0)).to(torch.int32),
                  max_seqlen_k=max_k, kv_used=fill, syncs=1)


def plan_traced(mask, position_ids, batch, q_len, kv_len, device, given_cu_seqlens=None,
                given_max_seqlen=None) -> Layout:
    """The layout of a call being traced by torch.compile or torch.export: no host sync, and
    every shape independent of the data (see autoflash/tracing.py)."""
    if kv_len > q_len:
        return plan_with_cache(mask, batch, q_len, kv_len, device, traced=True)
    if given_cu_seqlens is not None and isinstance(given_max_seqlen, int):
        return plan_from_given_boundaries(given_cu_seqlens, given_max_seqlen, batch, q_len)
    if mask is None and position_ids is None:
        return Layout("dense", batch, q_len, q_len)
    real = mask.to(torch.bool) if mask is not None else torch.ones(batch, q_len, dtype=torch.bool, device=device)
    _, segment_ids = _segments(real, sequence_starts(real, position_ids))
    return Layout("masked", batch, q_len, q_len, segment_ids=segment_ids)


# -- one plan per forward ---------------------------------------------------------------------------

# (key, weak references, layout) of the last plan made in this thread (or task); untraced calls only
_last_plan = contextvars.ContextVar("autoflash_last_plan", default=(None, (), None))


def _identity(t):
    if t is None:
        return None
    # inference tensors keep no version counter; they cannot be changed in place outside inference mode
    version = -1 if t.is_inference() else t._version
    return id(t), version, tuple(t.shape)


def plan_for(mask, position_ids, batch, q_len, kv_len, device, given_cu_seqlens=None, given_max_seqlen=None):
    """The layout for this forward, computed by its first attention layer and reused by the rest."""
    key = (_identity(mask), _identity(position_ids), _identity(given_cu_seqlens), batch, q_len, kv_len)
    # the weak references prove the ids still name the same live tensors (ids are reused after free)
    last_key, last_refs, last_layout = _last_plan.get()
    if key == last_key and all(r() is not None for r in last_refs):
        return last_layout
    refs = tuple(weakref.ref(t) for t in (mask, position_ids, given_cu_seqlens) if t is not None)
    if kv_len > q_len:
        layout = plan_with_cache(mask, batch, q_len, kv_len, device)
    elif given_cu_seqlens is not None:
        layout = plan_from_given_boundaries(given_cu_seqlens, given_max_seqlen, batch, q_len)
    else:
        layout = plan_without_cache(mask, position_ids, batch, q_len, device)
    _last_plan.set((key, refs, layout))
    return layout


# -- unpad / pad -----------------------------------------------------------------------------------

def pack(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(batch, length, ...) -> (1, real tokens, ...): the real tokens in row-major order."""
    flat = x.reshape(-1, *x.shape[2:])
    return (flat if layout.indices is None else flat.index_select(0, layout.indices)).unsqueeze(0)


def scatter(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(1, real tokens, ...) -> (batch, length, ...), zeros on padding: the inverse of ``pack``."""
    flat = x[0]
    if layout.indices is not None:
        flat = flat.new_zeros(layout.batch * layout.q_len, *flat.shape[1:]).index_copy(0, layout.indices, flat)
    return flat.view(layout.batch, layout.q_len, *flat.shape[1:])


def unpad(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(batch, heads, len, dim) -> (total, heads, dim) holding the real tokens only."""
    return pack(x.transpose(1, 2), layout)[0]


def pad(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(total, heads, dim) -> (batch, len, heads, dim), zeros on padding (transformers' layout after attention)."""
    return scatter(x.unsqueeze(0), layout)


def unpad_cache_keys(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(batch, kv_heads, kv_len, dim) cache -> (total_k, kv_heads, dim): each row's valid keys, for varlen kernels."""
    b, h, _, d = x.shape
    keys = x[:, :, :layout.kv_used].transpose(1, 2).reshape(b * layout.kv_used, h, d)
    return keys if layout.key_indices is None else keys.index_select(0, layout.key_indices)


# -- the dense mask of a layout ----------------------------------------------------------------------

def allowed_keys(layout: Layout, call, device) -> torch.Tensor:
    """(batch, 1, q_len, kv_len) bool: which key each query may attend to, for kernels that take a dense mask
    (and for eager attention where weights are asked for). ``call``: the ``AttentionCall`` (its causal flag,
    lengths and window).

    Rows with no allowed key (padded queries) are opened to every key so that softmax stays
    finite; their outputs are zeroed afterwards by ``zero_padded_queries``. A sliding window
    counts key slots back from the query's, as transformers' masks do. Built once per
    forward (kept on the layout).
    """
    return layout.derive(("allowed", call.causal, call.window, str(device)), lambda: _allowed_keys(layout, call, device),
                         sizes=(call.q_len, call.kv_len))


def _allowed_keys(layout: Layout, call, device) -> torch.Tensor:
    q_len, kv_len = call.q_len, call.kv_len
    q_pos = torch.arange(q_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    if layout.kind == "cache":
        end = layout.cache_seqlens.long()  # every cache layout knows its fill levels
        last_key = end[:, None] - q_len + q_pos[None, :]  # bottom-right aligned causal
        allowed = k_pos[None, None, :] <= last_key[:, :, None] if call.causal else \
            (k_pos[None, None, :] < end[:, None, None]).expand(-1, q_len, -1)
        if call.window is not None:
            allowed = allowed & (k_pos[None, None, :] > last_key[:, :, None] - call.window)
        if layout.key_mask is not None:
            allowed = allowed & layout.key_mask[:, None, :]
    else:
        if layout.kind in ("varlen", "masked"):
            seg = layout.segment_ids
            allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        else:
            allowed = torch.ones(layout.batch, q_len, kv_len, dtype=torch.bool, device=device)
        if call.causal:
            allowed = allowed & (k_pos[None, None, :] <= q_pos[None, :, None])
        if call.window is not None:
            allowed = allowed & (k_pos[None, None, :] > q_pos[None, :, None] - call.window)
    empty = ~allowed.any(-1, keepdim=True)
    return (allowed | empty).unsqueeze(1)
