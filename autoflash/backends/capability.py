"""What a backend serves, as data, and the one function that says why a call is outside it.

Each backend declares a ``Supports`` record (devices, compute capability, dtypes, head dims, and
the features a call may ask for: dropout, a sliding window, logit soft-capping, a traced call, a deterministic
backward, a one-token decode step, gradients through a cache, a cached key mask with holes).
``Backend.reasons_not_supported`` checks a call against it, then asks the backend for what is
truly its own (a release of its package that lacks an argument), then whether it is installed:
what the call asks that the kernel lacks comes first, so a CPU or float32 call's fallback says
why in its own terms, and only a call the kernel would serve imports its package.

Reasons are short lowercase strings in one form, ``what=got (supported: ...)``; ``why`` gives a
backend's own words for a feature it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from autoflash.call import AttentionCall

HALF_DTYPES = (torch.float16, torch.bfloat16)
EVERY_KIND = ("dense", "varlen", "cache", "masked")
# how a reason names a call of each layout kind
KIND_PHRASES = {"dense": "on a batch without padding", "varlen": "on a padded or packed batch",
                "cache": "with a kv cache", "masked": "in a traced padded or packed batch"}


@dataclass(frozen=True)
class Supports:
    """What one backend serves. The defaults serve everything but soft-capped logits (SDPA's record is
    ``Supports()``)."""

    devices: Optional[Tuple[str, ...]] = None  # None: every device
    min_capability: Optional[Tuple[int, int]] = None  # CUDA compute capability, where it has a floor
    architectures: Optional[Tuple[int, ...]] = None  # compute capability majors served (why["capability"] names them)
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  # None: every dtype
    # head dims: a multiple of ``head_dim_multiple`` up to ``head_dim_most``, or, per compute capability
    # major, exactly those listed (a call without a capability is judged by the first major listed)
    head_dim_multiple: int = 1
    head_dim_most: Optional[int] = None
    head_dims_by_major: Optional[Dict[int, Tuple[int, ...]]] = None
    dropout_kinds: Tuple[str, ...] = EVERY_KIND  # the layout kinds on which it applies dropout
    window: bool = True  # a binding sliding window
    softcap: bool = False  # logit soft-capping (SDPA has none: such a call goes to transformers' eager attention)
    traced: bool = True  # a call being traced by torch.compile or torch.export
    traced_padding: bool = True  # a traced padded or packed batch (layout kind "masked": padding as a mask)
    deterministic: bool = True  # a deterministic backward, when asked for
    decode_step: bool = True  # a one-token step against a kv cache
    cache_with_grad: bool = True  # gradients through a kv-cache call
    cache_key_holes: str = "any"  # a cached key mask with holes: "any" | "decode" (one-token steps only) | "none"
    why: Dict[str, str] = field(default_factory=dict)  # feature -> the backend's own words for not serving it


def reasons(supports: Supports, call: AttentionCall) -> List[str]:
    """Everything ``call`` asks that ``supports`` lacks, in one order for every backend."""
    why = supports.why
    found = []
    if supports.devices is not None and call.device_type not in supports.devices:
        found.append(f"device={call.device_type} (supported: {', '.join(supports.devices)})")
    elif call.capability is not None:
        major, minor = call.capability
        if supports.min_capability is not None and call.capability < supports.min_capability:
            floor = supports.min_capability
            found.append(f"compute capability {major}.{minor} (needs >= {floor[0]}.{floor[1]})")
        elif supports.architectures is not None and major not in supports.architectures:
            found.append(f"compute capability {major}.{minor} ({why['capability']})")
    if supports.dtypes is not None and call.dtype not in supports.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in supports.dtypes)
        found.append(f"dtype={str(call.dtype).replace('torch.', '')} (supported: {names}"
                     + (f"; {why['dtype']}" if "dtype" in why else "") + ")")
    found += _head_dim_reasons(supports, call)
    if call.num_heads % call.num_kv_heads:
        found.append(f"heads={call.num_heads}/{call.num_kv_heads} (supported: query heads a multiple of kv heads)")
    if call.traced and not supports.traced:
        found.append(f"traced call ({why['traced']})")
    elif call.kind == "masked" and not supports.traced_padding:  # (a traced call refused whole says so once)
        found.append("padded or packed batch in a traced call (" + why.get(
            "traced_padding", "torch.compile/torch.export: unpadding needs a host sync; served with a mask") + ")")
    if call.dropout and call.kind not in supports.dropout_kinds:
        where = "" if not supports.dropout_kinds else f" {KIND_PHRASES[call.kind]}"
        found.append(f"dropout={call.dropout}{where} ({why.get('dropout', 'supported: 0')})")
    if call.deterministic and not supports.deterministic:
        found.append(f"deterministic backward asked for ({call.deterministic}): {why['deterministic']}")
    if call.window is not None and not supports.window:
        found.append(f"sliding_window={call.window} (" + why.get(
            "window", "supported: none yet; served exactly by sdpa's mask") + ")")
    if call.softcap is not None and not supports.softcap:
        found.append(f"softcap={call.softcap} (" + why.get(
            "softcap", "supported: none; transformers' eager attention applies it") + ")")
    if call.kind == "cache":
        found += _cache_reasons(supports, call)
    return found


def _head_dim_reasons(supports: Supports, call: AttentionCall) -> List[str]:
    if supports.head_dims_by_major is not None:
        majors = list(supports.head_dims_by_major)
        major = call.capability[0] if call.capability is not None else majors[0]
        dims = supports.head_dims_by_major.get(major, supports.head_dims_by_major[majors[0]])
        if call.head_dim not in dims:
            return [f"head_dim={call.head_dim} (supported on compute capability {major}.x: "
                    f"{', '.join(map(str, dims))})"]
        return []
    too_big = supports.head_dim_most is not None and call.head_dim > supports.head_dim_most
    if too_big or call.head_dim % supports.head_dim_multiple:
        bounds = ([f"multiple of {supports.head_dim_multiple}"] if supports.head_dim_multiple > 1 else []) + (
            [f"<= {supports.head_dim_most}"] if supports.head_dim_most is not None else [])
        return [f"head_dim={call.head_dim} (supported: {', '.join(bounds)})"]
    return []


def _cache_reasons(supports: Supports, call: AttentionCall) -> List[str]:
    why, found = supports.why, []
    if call.q_len == 1 and not supports.decode_step:
        found.append(f"one-token decode step ({why['decode_step']})")
    if call.needs_grad and not supports.cache_with_grad:
        found.append(f"kv-cache call with gradients ({why.get('cache_with_grad', 'supported: inference')})")
    if not call.cache_keys_contiguous:
        if supports.cache_key_holes == "none":
            found.append(f"cached key mask with holes ({why.get('cache_key_holes', 'supported: left padding only')})")
        elif supports.cache_key_holes == "decode" and call.q_len > 1:
            found.append("cached key mask with holes and q_len > 1 (supported: left padding only)")
    return found


FLASH = Supports(  # what every flash kernel here (flash-attn 2's, torch's own) requires of the device and data
    devices=("cuda",), min_capability=(8, 0), dtypes=HALF_DTYPES, head_dim_multiple=8, head_dim_most=256,
    window=False, traced_padding=False, why={"dtype": "float32 models run flash under torch.autocast"})


class Backend:
    """One kernel family. Subclasses set ``name`` and ``supports``, and override what is their own."""

    name = ""
    supports = Supports()

    def unavailable_reasons(self) -> List[str]:
        """Is it installed and usable at all? Asked once per process (and by ``autoflash doctor``)."""
        return []

    def own_reasons(self, call: AttentionCall) -> List[str]:
        """What only this backend's installed release refuses of a call its record serves."""
        return []

    def reasons_not_supported(self, call: AttentionCall) -> List[str]:
        """Why this backend cannot serve ``call`` (empty: it can). The record first, then availability."""
        return reasons(self.supports, call) or self.unavailable_reasons() or self.own_reasons(call)


class PackageBackend(Backend):
    """A backend whose kernels come from a package imported on first need (``_module``: (functions, None) or
    (None, why not), cached; it sets ``functions``)."""

    functions = None

    def _module(self):
        raise NotImplementedError

    def unavailable_reasons(self) -> List[str]:
        _, reason = self._module()
        return [reason] if reason else []

    def entry_points(self):
        """Its functions: imported by the availability check that let dispatch choose it, or now."""
        if self.functions is None:
            functions, why = self._module()
            if functions is None:
                raise RuntimeError(f"autoflash: {self.name} cannot run: {why}")
        return self.functions
