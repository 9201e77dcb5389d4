"""What autoflash does differently while torch.compile or torch.export traces a model.

A traced call must not sync with the device (a sync is a graph break for torch.compile and
an error for torch.export and ``fullgraph=True``), must not read Python state that changes
between calls (a compiled program would freeze it) and must keep tensor shapes independent
of the data. So a traced call never removes padding (the packed row's length is the number
of real tokens: data); it attends on the padded tensors with the padding and sequence
boundaries expressed as a mask built from tensor operations, as transformers' own sdpa
does under tracing. Decode steps and prefills into a cache are sync-free either way.

One exception keeps the speed of a plain ``torch.compile(model)``: where the trace may
break (not ``fullgraph=True``, not export), a padded forward still removes padding for the
whole model, paying one graph break per forward for it, as before.

Decisions made while tracing (which backend, which path) are taken once, at trace time,
through ``torch.compiler.assume_constant_result``: the compiled program holds their result,
not the Python that made them.
"""

from __future__ import annotations

from typing import Dict

import torch

TRACE_SAFE = "trace-safe"

# what traced programs were built with, for status() and doctor: path -> why (written at trace time)
traced_paths: Dict[str, str] = {}


def is_tracing() -> bool:
    """True inside torch.compile's and torch.export's tracing (both modes of export)."""
    return torch.compiler.is_compiling()


@torch.compiler.assume_constant_result
def graph_breaks_allowed() -> bool:
    """Whether the trace in progress may break (plain torch.compile) or must stay whole.

    Read from dynamo's translator at trace time; anything not known to allow breaks
    (export, ``fullgraph=True``, a torch release without that attribute) is taken as whole.
    """
    if torch.compiler.is_exporting():
        return False
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return not (tx.one_graph or getattr(tx, "error_on_graph_break", False))
    except Exception:  # noqa: BLE001 - a private API: when unsure, keep the trace whole
        return False


@torch.compiler.assume_constant_result
def note(path: str, why: str) -> bool:
    """Record, at trace time, that a traced program takes ``path``; returns True for use in expressions."""
    traced_paths[path] = why
    return True
