"""Which backend serves a call, and why the others did not.

The decision is data (``Decision``): logs, ``autoflash doctor`` and tests all read the
same record. Backends are tried in order (``AUTOFLASH_BACKEND`` or ``forced()`` narrows
the list to one) and the first with no reason against the call wins.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Dict, Tuple

from autoflash import backends
from autoflash.call import AttentionCall
from autoflash.settings import logger, settings


@dataclass(frozen=True)
class Decision:
    backend: str
    refused: Tuple[Tuple[str, Tuple[str, ...]], ...]  # (backend name, its reasons), in the order tried

    def why(self) -> str:
        return "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in self.refused)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve a call; the message names what is missing."""


_override = threading.local()


@contextlib.contextmanager
def forced(name: str):
    """Route every call in this thread to one backend (tests, benchmarks); "auto" restores the normal choice."""
    if name != "auto" and name not in backends.BY_NAME:
        raise ValueError(f"unknown backend {name!r} (known: {', '.join(backends.BY_NAME)})")
    previous = getattr(_override, "name", None)
    _override.name = None if name == "auto" else name
    try:
        yield
    finally:
        _override.name = previous


def _candidates():
    name = getattr(_override, "name", None) or settings().backend
    if name == "auto":
        return backends.AUTO_ORDER, False
    return (backends.BY_NAME[name],), True


# the latest decision per layout kind, for the demo and doctor ("what did my model just use?")
last_decisions: Dict[str, Decision] = {}


def choose(call: AttentionCall) -> Decision:
    order, is_forced = _candidates()
    decision = _choose(call, tuple(b.name for b in order), is_forced)
    last_decisions[call.kind] = decision
    return decision


@functools.lru_cache(maxsize=4096)
def _choose(call: AttentionCall, names: Tuple[str, ...], is_forced: bool) -> Decision:
    refused = []
    for name in names:
        reasons = tuple(backends.BY_NAME[name].reasons_not_supported(call))
        if not reasons:
            decision = Decision(name, tuple(refused))
            _log_fallback(call, decision)
            return decision
        refused.append((name, reasons))
    decision = Decision("", tuple(refused))
    if is_forced:
        raise BackendUnavailable(f"autoflash backend {names[0]!r} was forced (AUTOFLASH_BACKEND) but cannot serve "
                                 f"this call ({call.describe()}): {decision.why()}. Install what is missing, or "
                                 "set AUTOFLASH_BACKEND=auto to fall back.")
    raise BackendUnavailable(f"no autoflash backend can serve {call.describe()}: {decision.why()}")


_warned: Dict[tuple, bool] = {}


def _log_fallback(call: AttentionCall, decision: Decision) -> None:
    logger.debug("%s -> %s%s", call.describe(), decision.backend,
                 f" ({decision.why()})" if decision.refused else "")
    if not decision.refused or decision.backend == "reference":
        return
    # one warning per kind of fallback: same path, same chosen backend, same reasons for the first refusal
    key = (call.kind, decision.backend, decision.refused[0])
    if key in _warned:
        return
    _warned[key] = True
    logger.warning("autoflash: %s attention runs on %s: %s (set AUTOFLASH_LOG=debug to see every choice)",
                   {"dense": "unpadded", "varlen": "padded/packed", "cache": "kv-cache"}[call.kind],
                   decision.backend, decision.why())


def describe_choice(call: AttentionCall) -> Dict[str, object]:
    """For doctor: the decision for a hypothetical call, without raising or warning."""
    order, _ = _candidates()
    refused, chosen = [], None
    for backend in order:
        reasons = backend.reasons_not_supported(call)
        if not reasons and chosen is None:
            chosen = backend.name
        elif reasons:
            refused.append({"backend": backend.name, "reasons": list(reasons)})
    return {"call": call.describe(), "backend": chosen, "refused": refused}


def clear_cache() -> None:
    _choose.cache_clear()
    _warned.clear()
    last_decisions.clear()
