"""The flash-attn package (FlashAttention-2): the fastest kernels where it is installed.

An optional extra (``pip install autoflash[flash-attn]``), never required. Every
difference between flash-attn releases that autoflash depends on is read here, from the
functions' signatures rather than from version strings:

- ``flash_attn_with_kvcache(cache_leftpad=...)`` exists from 2.6 on; without it a
  left-padded cache cannot be served and the call falls back.
- ``flash_attn_varlen_func`` / ``flash_attn_func`` return a tensor unless asked for
  probabilities (``return_attn_probs``), in every 2.x release.
- ``deterministic=`` (a backward that gives the same gradients on every run) exists from
  2.4.1 on; a call that asks for it (``AttentionCall.deterministic``) is refused without it.
- ``window_size=`` (a sliding window, as transformers' ``sliding_window``) from 2.3 on; a call with a binding
  window is refused without it.
- ``softcap=`` (Gemma 2's logit soft-capping) from 2.6 on, and only in a build compiled with it: a wheel built
  with ``FLASHATTENTION_DISABLE_SOFTCAP`` (smaller and faster to compile; the one on autoflash's GPU machine) has
  the argument, and answers wrongly (measured: docs/findings.md, 94). So the first soft-capped call tries the
  kernel once on a few numbers against a float32 reference, forward and backward (``_softcap_refused``); a build
  that does not apply it leaves such calls to transformers' eager attention.

torch.compile traces ``flash_attn_func`` and ``flash_attn_varlen_func`` through the custom
ops flash-attn registers for them (2.7 on); ``flash_attn_with_kvcache`` calls its extension
directly, which would break the graph of every compiled decode step, so traced calls reach
it through a custom op of autoflash's own (``autoflash::flash_attn_with_kvcache``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import List, Optional

import torch

from autoflash import tracing
from autoflash.backends.capability import FLASH, PackageBackend
from autoflash.backends.reference import varlen_reference
from autoflash.call import AttentionCall
from autoflash.layout import Layout, pad, unpad


def _register_kvcache_op(with_kvcache):
    """``flash_attn_with_kvcache`` as a custom op with a fake implementation, for traced calls; None where
    torch has no ``torch.library.custom_op`` (< 2.4)."""
    custom_op = getattr(getattr(torch, "library", None), "custom_op", None)
    if custom_op is None:
        return None

    @custom_op("autoflash::flash_attn_with_kvcache", mutates_args=(), device_types="cuda")
    def kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                cache_leftpad: Optional[torch.Tensor], softmax_scale: float, causal: bool,
                softcap: float) -> torch.Tensor:
        extra = {"cache_leftpad": cache_leftpad} if cache_leftpad is not None else {}
        if softcap:  # (0: none; releases before 2.6 have no such argument)
            extra["softcap"] = softcap
        return with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, softmax_scale=softmax_scale,
                            causal=causal, **extra)

    @kvcache.register_fake
    def _(q, k_cache, v_cache, cache_seqlens, cache_leftpad, softmax_scale, causal, softcap):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    return kvcache


# The probe's softcap binds (scores of random unit inputs are ~1); fp16's error against float32 is ~1e-3, a softcap
# ignored costs ~0.3
SOFTCAP_PROBE, SOFTCAP_PROBE_TOLERANCE = 0.5, 2e-2


class _FlashAttn(PackageBackend):
    name = "flash_attn"
    # a sliding window: flash-attn's window_size, on the calls without a cache (own_reasons)
    supports = dataclasses.replace(
        FLASH, dropout_kinds=("dense", "varlen", "masked"), cache_with_grad=False, cache_key_holes="none", window=True,
        softcap=True,
        why={**FLASH.why, "cache_with_grad": "flash_attn_with_kvcache has no backward",
             "cache_key_holes": "supported: left padding only; checked only where it costs no extra host sync: "
                                "prefill, not decode steps"})
    functions = None  # (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache) once imported
    traced_kvcache = None

    def __init__(self):
        self._softcap_probed = {}  # head dim -> "" where the build applies a softcap, else why not

    @functools.lru_cache(maxsize=1)
    def _module(self):
        try:
            import flash_attn
        except Exception as exc:  # noqa: BLE001 - a broken build raises anything from OSError to RuntimeError
            return None, f"flash-attn is not importable ({type(exc).__name__}: {exc}; pip install autoflash[flash-attn])"
        if getattr(flash_attn, "__file__", None) is None:
            # a namespace package: only flash-attn-4's flash_attn/cute is installed, not flash-attn 2 itself
            return None, "flash-attn (FlashAttention-2) is not installed (pip install autoflash[flash-attn])"
        version = getattr(flash_attn, "__version__", "0")
        if not version.startswith("2."):
            return None, f"flash-attn=={version} (supported: 2.x)"
        try:
            from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
        except Exception as exc:  # noqa: BLE001
            return None, f"flash-attn {version} lacks its 2.x entry points ({exc})"
        self.traced_kvcache = _register_kvcache_op(flash_attn_with_kvcache)
        self.functions = (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache)
        return self.functions, None

    def version(self):
        try:
            import flash_attn

            return getattr(flash_attn, "__version__", None)
        except Exception:  # noqa: BLE001
            return None

    @functools.cached_property
    def _has_cache_leftpad(self) -> bool:
        fns, _ = self._module()
        return fns is not None and "cache_leftpad" in inspect.signature(fns[2]).parameters

    @functools.cached_property
    def _has_deterministic(self) -> bool:
        fns, _ = self._module()
        return fns is not None and "deterministic" in inspect.signature(fns[1]).parameters

    @functools.cached_property
    def _has_window(self) -> bool:
        fns, _ = self._module()
        return fns is not None and "window_size" in inspect.signature(fns[1]).parameters

    @functools.cached_property
    def _has_softcap(self) -> bool:
        fns, _ = self._module()
        return fns is not None and "softcap" in inspect.signature(fns[1]).parameters

    def _softcap_refused(self, head_dim: int) -> str:
        if head_dim not in self._softcap_probed:
            # (asked from inference and autocast blocks too: the probe needs gradients and its own dtypes)
            try:
                with torch.enable_grad(), torch.autocast("cuda", enabled=False):
                    self._softcap_probed[head_dim] = self._probe_softcap(head_dim)
            except Exception as exc:  # noqa: BLE001 - whatever stops the check, the softcap is not served
                self._softcap_probed[head_dim] = f"the check of its softcap failed ({type(exc).__name__}: {exc})"
        return self._softcap_probed[head_dim]

    def _probe_softcap(self, head_dim: int, device: str = "cuda") -> str:
        """"" where this build applies a softcap at ``head_dim``, else why not: one small forward and backward on the
        current GPU against a float32 reference (a build is the same on every GPU of a machine). A build compiled
        without soft-capping may raise at the first such call, or answer wrongly (measured: findings 94)."""
        dense = self.entry_points()[0]
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 32, 2, head_dim, device=device, generator=generator, dtype=torch.float16)
                   .requires_grad_() for _ in range(3))
        try:
            out = dense(q, k, v, softcap=SOFTCAP_PROBE, causal=True)
        except RuntimeError as exc:
            return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        grad = torch.randn(out.shape, device=device, generator=generator, dtype=out.dtype)
        mine = (out, *torch.autograd.grad(out, (q, k, v), grad))
        q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
        bounds = torch.tensor([0, q.shape[1]], dtype=torch.int32)
        expected = varlen_reference(q32[0], k32[0], v32[0], bounds, bounds, head_dim ** -0.5, True,
                                    softcap=SOFTCAP_PROBE)[None]
        theirs = (expected, *torch.autograd.grad(expected, (q32, k32, v32), grad.float()))
        errors = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(mine, theirs)]
        if max(errors) > SOFTCAP_PROBE_TOLERANCE:
            what = ("output", "query gradient", "key gradient", "value gradient")[errors.index(max(errors))]
            return (f"its soft-capped {what} is {max(errors):.2g} from a float32 reference (a build compiled without "
                    "soft-capping answers wrongly)")
        return ""

    def own_reasons(self, call: AttentionCall) -> List[str]:
        """What the installed release lacks, read from its functions' signatures (and, for a softcap, from one
        call of its kernel)."""
        reasons = []
        if call.softcap is not None and not self._has_softcap:
            reasons.append(f"softcap={call.softcap} with flash-attn {self.version()} (needs >= 2.6 for softcap)")
        elif call.softcap is not None and call.traced and call.head_dim not in self._softcap_probed:
            reasons.append(f"softcap={call.softcap} in a traced call before any untraced one (whether this build "
                           "applies a softcap is measured by an untraced call)")
        elif call.softcap is not None:
            refused = self._softcap_refused(call.head_dim)
            if refused:
                reasons.append(f"softcap={call.softcap}: this flash-attn {self.version()} build refuses it "
                               f"({refused}); transformers' eager attention applies it")
        if call.deterministic and not self._has_deterministic:
            reasons.append(f"deterministic backward asked for ({call.deterministic}), which flash-attn "
                           f"{self.version()} lacks (needs >= 2.4.1)")
        if call.kind == "cache" and call.left_padded_cache and not self._has_cache_leftpad:
            reasons.append(f"left-padded cache with flash-attn {self.version()} (needs >= 2.6 for cache_leftpad)")
        if call.window is not None and not self._has_window:
            reasons.append(f"sliding_window={call.window} with flash-attn {self.version()} (needs >= 2.3 for "
                           "window_size)")
        elif call.window is not None and call.kind not in ("dense", "varlen"):
            reasons.append(f"sliding_window={call.window} with a kv cache (supported: without a cache; served "
                           "exactly by sdpa's mask)")
        elif call.window is not None and call.holes:
            # transformers counts the window in key slots; varlen kernels count it in real tokens
            reasons.append(f"sliding_window={call.window} over a sequence with padding inside it (supported: "
                           "padding before or after each sequence; served exactly by sdpa's mask)")
        return reasons

    def run(self, q, k, v, layout: Layout, call: AttentionCall, scale: float):
        dense, varlen, with_kvcache = self.entry_points()
        # (asked for only where wanted: releases before 2.4.1 have no such argument)
        extra = {"deterministic": True} if call.deterministic else {}
        # transformers' window: a query at i sees the keys at i - window + 1 .. i, window_size's left reach
        if call.window is not None:
            extra["window_size"] = (call.window - 1, 0)
        if call.softcap is not None:
            extra["softcap"] = call.softcap
        if layout.kind == "dense":
            return dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=call.dropout,
                         softmax_scale=scale, causal=call.causal, **extra)
        if layout.kind == "varlen":
            out = varlen(unpad(q, layout), unpad(k, layout), unpad(v, layout), layout.cu_seqlens, layout.cu_seqlens,
                         layout.max_seqlen, layout.max_seqlen, dropout_p=call.dropout, softmax_scale=scale,
                         causal=call.causal, **extra)
            return pad(out, layout)
        # transformers' caches are (batch, kv_heads, len, dim); the transposed view is the
        # (batch, len, kv_heads, dim) layout the kernel reads, with no copy.
        if tracing.is_tracing() and self.traced_kvcache is not None:  # (torch < 2.4: a graph break here)
            return self.traced_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout.cache_seqlens,
                                       layout.cache_leftpad, scale, call.causal, call.softcap or 0.0)
        if layout.cache_leftpad is not None:
            extra["cache_leftpad"] = layout.cache_leftpad
        extra.pop("deterministic", None)  # (no backward here: decoding)
        return with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            cache_seqlens=layout.cache_seqlens, softmax_scale=scale, causal=call.causal, **extra)


FLASH_ATTN = _FlashAttn()
