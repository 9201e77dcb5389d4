"""One record per forward pass: what autoflash knows of it, made once by the outermost of its wrappers that
knows the batch, and read by each of the forward's attention calls.

``Forward.batch`` is where the padded batch's real tokens are. Where the whole model runs on one row of
those tokens (``packed``), the decoder's wrapper adds the row's layout and, before the first layer, the
backend that serves the row's attention (``row_call``, ``row_backend``): each layer then only runs that
backend, plain tensor code that torch.compile traces into the model's graph.

How it reaches attention: by one keyword (``KEYWORD``) where the release's model code passes keyword
arguments on to attention, and by one context variable for the duration of the forward (``published``)
where it does not (transformers 4.37-4.47, and 4.48-4.5x under gradient checkpointing). Traced code
reads no context variable (dynamo cannot trace one); there the keyword alone carries it.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Optional

from autoflash import tracing
from autoflash.call import AttentionCall
from autoflash.layout import Layout

KEYWORD = "autoflash_forward"


@dataclass(frozen=True)
class Forward:
    batch: Layout  # the padded batch's real tokens ("dense": no padding; "masked": a traced padded batch)
    packed: bool = False  # the whole model runs on one row of them (packed_loss's plan, before the decoder)
    row: Optional[Layout] = None  # that row (one row, every token real), once the decoder has packed it
    row_call: Optional[AttentionCall] = None  # the row's attention call, decided before the first layer
    row_backend: str = ""  # the backend that serves it; "" where each call decides for itself

    def layout_for(self, batch, q_len, kv_len) -> Optional[Layout]:
        """The layout of one of this forward's attention calls with these sizes, where this record holds it
        (a call of another shape, a decode step say, plans its own)."""
        if q_len != kv_len:
            return None
        if self.row is not None:
            return self.row if batch == 1 and q_len == self.row.q_len else None
        if not self.packed and batch == self.batch.batch and q_len == self.batch.q_len:
            return self.batch
        return None


_published = contextvars.ContextVar("autoflash_forward", default=None)


@contextlib.contextmanager
def published(forward: Forward):
    """``forward`` is the forward in progress in this thread (or task) for the duration of the block."""
    token = _published.set(forward)
    try:
        yield
    finally:
        _published.reset(token)


def current() -> Optional[Forward]:
    """The published forward in progress, outside traced code (None inside: a trace holds no thread state)."""
    if tracing.is_tracing():
        return None
    return _published.get()


def padded_width(seq_len) -> Optional[int]:
    """The padded batch's length where ``seq_len`` is the length of the packed row being run, else None.

    transformers 4.37's rotary embedding takes the key length as the longest position it
    must cover: given the packed row's length (often past max_position_embeddings) it rebuilds
    its cos/sin cache, from an arange in the model's dtype (bf16 counts integers exactly only
    to 256) and, with dynamic NTK scaling, with a different base. The padded length is what
    eager gives it.
    """
    forward = current()
    if forward is None or forward.row is None or seq_len != forward.row.q_len:
        return None
    return forward.batch.q_len
