"""Which backend serves a call, and why the others did not.

The decision is data (``Decision``): logs, ``autoflash doctor`` and tests all read the
same record. Backends are tried in order (``AUTOFLASH_BACKEND`` or ``forced()`` narrows
the list to one) and the first with no reason against the call wins.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from autoflash import backends, tracing
from autoflash.call import FLASH_ATTN_SWITCH, AttentionCall, device_capability
from autoflash.settings import EXCLUDE_CHOICES, forget_said, logger, say_once, settings


@dataclass(frozen=True)
class Decision:
    backend: str
    refused: Tuple[Tuple[str, Tuple[str, ...]], ...]  # (backend name, its reasons), in the order tried

    def why(self) -> str:
        return "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in self.refused)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve a call; the message names what is missing."""


# this thread's (or task's) overrides: read only outside traced graphs (choose runs at trace time)
_forced_name = contextvars.ContextVar("autoflash_forced_backend", default=None)
_excluded_here = contextvars.ContextVar("autoflash_excluded_backends", default=())
_generation = [0]  # bumped whenever what decides a call changes (forced, clear_cache)


@contextlib.contextmanager
def forced(name: str):
    """Route every call in this thread to one backend (tests, benchmarks); "auto" restores the normal choice."""
    if name != "auto" and name not in backends.BY_NAME:
        raise ValueError(f"unknown backend {name!r} (known: {', '.join(backends.BY_NAME)})")
    with _overriding(_forced_name, None if name == "auto" else name):
        yield


@contextlib.contextmanager
def _overriding(variable: contextvars.ContextVar, value):
    """Set one of this thread's dispatch overrides for the block; decisions kept elsewhere see the change."""
    token = variable.set(value)
    _generation[0] += 1
    try:
        yield
    finally:
        variable.reset(token)
        _generation[0] += 1


@contextlib.contextmanager
def excluded(*names: str):
    """Leave backends out of the choice in this thread (benchmarks, tests, a user comparing kernels); each
    refusal then reads "excluded". ``AUTOFLASH_EXCLUDE`` does the same for a whole process."""
    unknown = [n for n in names if n not in EXCLUDE_CHOICES]  # (SDPA serves every call: never excluded)
    if unknown:
        raise ValueError(f"cannot exclude {', '.join(map(repr, unknown))} (excludable: {', '.join(EXCLUDE_CHOICES)})")
    with _overriding(_excluded_here, tuple(dict.fromkeys(_excluded_here.get() + names))):
        yield


# Who stepped the flash kernels aside where the user switched SDPA's flash kernel off
SDPA_SWITCHES = ("SDPA's flash kernel switched off: torch.nn.attention.sdpa_kernel or "
                 "torch.backends.cuda.enable_flash_sdp")


def _excluded() -> Tuple[Tuple[str, str], ...]:
    """(backend, who excluded it) pairs in force in this thread."""
    chosen = tuple((n, "AUTOFLASH_EXCLUDE") for n in settings().exclude) + tuple(
        (n, "dispatch.excluded()") for n in _excluded_here.get() if n not in settings().exclude)
    if _flash_sdp_enabled():
        return chosen
    # The user chose SDPA's kernels (`with sdpa_kernel(SDPBackend.MATH)` for a double backward or a
    # reference run, say): transformers' own sdpa would obey, so SDPA serves under their switches.
    return chosen + tuple((n, SDPA_SWITCHES) for n in backends.FLASH_KERNELS if n not in dict(chosen))


def _flash_sdp_enabled() -> bool:
    # (a process-wide flag in torch; autoflash's torch backend sets it only around its own kernel calls)
    return torch.backends.cuda.flash_sdp_enabled()


def routing() -> tuple:
    """What, besides the call itself, decides its backend: callers keeping a decision key it on this."""
    return _generation[0], _forced_name.get(), settings().backend, settings().exclude, _flash_sdp_enabled()


def _candidates():
    name = _forced_name.get() or settings().backend
    if name == "auto":
        return backends.AUTO_ORDER, False
    return (backends.BY_NAME[name],), True


def _reasons(backend, call: AttentionCall, excluded) -> Tuple[str, ...]:
    source = dict(excluded).get(backend.name)
    if source is not None:
        return (f"excluded ({source})",)
    return tuple(backend.reasons_not_supported(call))


# the latest decision per layout kind, for the demo and doctor ("what did my model just use?")
last_decisions: Dict[str, Decision] = {}


def choose(call: AttentionCall) -> Decision:
    order, is_forced = _candidates()
    decision = _choose(call, tuple(b.name for b in order), is_forced, _excluded())
    last_decisions[call.kind] = decision
    return decision


def backend(name: str):
    """The backend object ``pick`` named: the one way the rest of autoflash reaches a kernel."""
    return backends.BY_NAME[name]


def pick(call: AttentionCall, device) -> str:
    """The name of the backend that serves ``call``: ``choose``, or for a call being traced by
    torch.compile or torch.export, ``choose`` run once at trace time. "" for a soft-capped call that no
    kernel here applies the softcap to (SDPA has none): transformers' eager attention computes it.

    A compiled program keeps only the traced decision's result (the record's fields go through
    as constants; a traced call's record has no capability, which is read there).
    """
    if not tracing.is_tracing():
        return choose(call).backend
    index = device.index if device.type == "cuda" else None
    # the record's fields as constants (assume_constant_result converts its arguments to Python values)
    return _choose_at_trace_time(tuple(_constant_length(getattr(call, name)) if name in _LENGTHS
                                       else getattr(call, name) for name in _FIELDS), index)


_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionCall))
_LENGTHS = ("q_len", "kv_len")


def _constant_length(length):
    # No backend's choice depends on a length beyond "one query or more", and under dynamic shapes a length
    # is a symbol, which assume_constant_result cannot take (dynamo answers isinstance(symbol, int) with True,
    # so a symbol cannot be told from a number here): every length becomes 1 or 2, a guard on "== 1" at most.
    return 1 if length == 1 else 2


@torch.compiler.assume_constant_result
def _choose_at_trace_time(values: tuple, device_index) -> str:
    fields = dict(zip(_FIELDS, values))
    capability = device_capability(device_index) if fields["device_type"] == "cuda" else None
    call = AttentionCall(**{**fields, "capability": capability, "traced": True})
    name = choose(call).backend
    tracing.note(f"traced {call.kind}", f"{call.describe()} -> {name}")
    return name


def _walk(call: AttentionCall, names: Tuple[str, ...], excluded) -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """The priority walk, the one place it is written: each backend in order with its reasons against the
    call (none: it can serve). The first with none serves; eager calls, traced calls and doctor read this."""
    return tuple((name, _reasons(backends.BY_NAME[name], call, excluded)) for name in names)


def _served_by(walked) -> Tuple[str, tuple]:
    """(the first backend with no reason against the call or "", the refusals before it)."""
    for index, (name, reasons) in enumerate(walked):
        if not reasons:
            return name, walked[:index]
    return "", walked


@functools.lru_cache(maxsize=4096)
def _choose(call: AttentionCall, names: Tuple[str, ...], is_forced: bool, excluded=()) -> Decision:
    decision = Decision(*_served_by(_walk(call, names, excluded)))
    if decision.backend:
        _log_fallback(call, decision)
        _warn_if_determinism_is_not_kept(call, decision)
        return decision
    if call.softcap is not None and not is_forced:
        return decision  # (no backend: the caller hands the call to transformers' eager attention, which applies it)
    if is_forced:
        raise BackendUnavailable(f"autoflash backend {names[0]!r} was forced (AUTOFLASH_BACKEND) but cannot serve "
                                 f"this call ({call.describe()}): {decision.why()}. Install what is missing, or "
                                 "set AUTOFLASH_BACKEND=auto to fall back.")
    raise BackendUnavailable(f"no autoflash backend can serve {call.describe()}: {decision.why()}")


def _log_fallback(call: AttentionCall, decision: Decision) -> None:
    logger.debug("%s -> %s%s", call.describe(), decision.backend,
                 f" ({decision.why()})" if decision.refused else "")
    if not decision.refused or decision.backend == "reference":
        return
    # one warning per kind of fallback: same path, same chosen backend, same reasons for the first refusal
    say_once(("fallback", call.kind, decision.backend, decision.refused[0]),
             logging.WARNING if _user_can_act(call, decision) else logging.INFO,
             "%s attention runs on %s: %s (set AUTOFLASH_LOG=debug to see every choice)",
             {"dense": "unpadded", "varlen": "padded/packed", "cache": "kv-cache",
              "masked": "traced padded/packed"}[call.kind], decision.backend, decision.why())


def _warn_if_determinism_is_not_kept(call: AttentionCall, decision: Decision) -> None:
    """flash-attn's switch alone reaches flash-attn only (as in transformers); a GPU call that another kernel
    serves keeps a non-deterministic backward unless torch's switch is on too. Once per backend."""
    if call.deterministic != FLASH_ATTN_SWITCH or call.device_type != "cuda" or decision.backend == "flash_attn":
        return
    say_once(("deterministic", decision.backend), logging.WARNING,
             "%s asks flash-attn for a deterministic backward, but %s serves this training call (%s), and its "
             "backward is deterministic only under torch.use_deterministic_algorithms(True): set that too, or "
             "install flash-attn >= 2.4.1", FLASH_ATTN_SWITCH, decision.backend, decision.why() or call.describe())


def _user_can_act(call: AttentionCall, decision: Decision) -> bool:
    """A warning only where the user can do something: a GPU call that no flash kernel serves (its dtype,
    the GPU, a missing package; the reasons say which). A CPU call runs SDPA by design, a traced padded
    call and a cache whose key mask has holes by necessity, a sliding window that flash-attn does not apply
    here (a cache, padding inside a sequence, or flash-attn not installed: SDPA's mask is exact), SDPA under the user's own switches because they chose it, and a flash kernel serving
    is no fallback worth a word: those are logged at INFO."""
    if call.device_type != "cuda" or decision.backend in backends.FLASH_KERNELS or call.window is not None:
        return False
    if any(reasons == (f"excluded ({SDPA_SWITCHES})",) for _, reasons in decision.refused):
        return False
    return call.kind != "masked" and not (call.kind == "cache" and not call.cache_keys_contiguous)


def describe_choice(call: AttentionCall) -> Dict[str, object]:
    """For doctor: the decision for a hypothetical call, without raising or warning."""
    order, _ = _candidates()
    walked = _walk(call, tuple(b.name for b in order), _excluded())
    chosen, _ = _served_by(walked)
    return {"call": call.describe(), "backend": chosen or None,
            "refused": [{"backend": name, "reasons": list(reasons)} for name, reasons in walked if reasons]}


def clear_cache() -> None:
    _generation[0] += 1
    _choose.cache_clear()
    forget_said("fallback", "deterministic")
    last_decisions.clear()
