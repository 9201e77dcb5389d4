"""The flash-attn package (FlashAttention-2): the fastest kernels where it is installed.

An optional extra (``pip install autoflash[flash-attn]``), never required. Every
difference between flash-attn releases that autoflash depends on is read here, from the
functions' signatures rather than from version strings:

- ``flash_attn_with_kvcache(cache_leftpad=...)`` exists from 2.6 on; without it a
  left-padded cache cannot be served and the call falls back.
- ``flash_attn_varlen_func`` / ``flash_attn_func`` return a tensor unless asked for
  probabilities (``return_attn_probs``), in every 2.x release.
"""

from __future__ import annotations

import functools
import inspect
from typing import List

from autoflash.backends._common import flash_hardware_reasons
from autoflash.call import AttentionCall
from autoflash.layout import Layout, pad, unpad


class _FlashAttn:
    name = "flash_attn"

    @functools.lru_cache(maxsize=1)
    def _module(self):
        try:
            import flash_attn
        except Exception as exc:  # noqa: BLE001 - a broken build raises anything from OSError to RuntimeError
            return None, f"flash-attn is not importable ({type(exc).__name__}: {exc}; pip install autoflash[flash-attn])"
        version = getattr(flash_attn, "__version__", "0")
        if not version.startswith("2."):
            return None, f"flash-attn=={version} (supported: 2.x)"
        try:
            from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
        except Exception as exc:  # noqa: BLE001
            return None, f"flash-attn {version} lacks its 2.x entry points ({exc})"
        return (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache), None

    def version(self):
        try:
            import flash_attn

            return getattr(flash_attn, "__version__", None)
        except Exception:  # noqa: BLE001
            return None

    def unavailable_reasons(self) -> List[str]:
        _, reason = self._module()
        return [reason] if reason else []

    @functools.cached_property
    def _has_cache_leftpad(self) -> bool:
        fns, _ = self._module()
        return fns is not None and "cache_leftpad" in inspect.signature(fns[2]).parameters

    def reasons_not_supported(self, call: AttentionCall) -> List[str]:
        reasons = self.unavailable_reasons()
        if reasons:
            return reasons
        reasons = flash_hardware_reasons(call)
        if call.kind == "cache":
            if call.needs_grad:
                reasons.append("kv-cache call with gradients (flash_attn_with_kvcache has no backward)")
            if call.dropout:
                reasons.append(f"dropout={call.dropout} with a kv cache (supported: 0)")
            if not call.cache_keys_contiguous:
                reasons.append("kv cache with a padding mask not known to be left padding only "
                               "(checked only where it costs no extra host sync: prefill, not decode steps)")
            if call.left_padded_cache and not self._has_cache_leftpad:
                reasons.append(f"left-padded cache with flash-attn {self.version()} (needs >= 2.6 for cache_leftpad)")
        return reasons

    def run(self, q, k, v, layout: Layout, call: AttentionCall, scale: float):
        dense, varlen, with_kvcache = self._module()[0]
        if layout.kind == "dense":
            return dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=call.dropout,
                         softmax_scale=scale, causal=call.causal)
        if layout.kind == "varlen":
            out = varlen(unpad(q, layout), unpad(k, layout), unpad(v, layout), layout.cu_seqlens, layout.cu_seqlens,
                         layout.max_seqlen, layout.max_seqlen, dropout_p=call.dropout, softmax_scale=scale,
                         causal=call.causal)
            return pad(out, layout)
        # transformers' caches are (batch, kv_heads, len, dim); the transposed view is the
        # (batch, len, kv_heads, dim) layout the kernel reads, with no copy.
        extra = {"cache_leftpad": layout.cache_leftpad} if layout.cache_leftpad is not None else {}
        return with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            cache_seqlens=layout.cache_seqlens, softmax_scale=scale, causal=call.causal, **extra)


FLASH_ATTN = _FlashAttn()
