"""FlashAttention-4 (the ``flash-attn-4`` package, module ``flash_attn.cute``): the fastest exact
kernel on Hopper and Blackwell, where it is installed (``pip install "autoflash[fa4]"``).

What it serves, and why no more:

- training and prefill: padded/packed batches through ``flash_attn_varlen_func`` (maximum
  lengths passed as Python ints: the plan's one host sync already has them), batches without
  padding through ``flash_attn_func``, a prefill into a cache through the varlen kernel on each
  row's valid keys. GQA is native: K/V heads are never repeated.
- not one-token decode steps: FlashAttention-4 has no kv-cache kernel, and a step through its
  varlen kernel (``seqused_k``) took 50 us against flash-attn 2's ``flash_attn_with_kvcache``
  29 us (../docs/findings.md), so decoding stays with the kernels that serve it today.
- not traced calls: its kernels are not registered with ``torch.library``, so torch.compile
  would break the graph at each one (and torch.export would fail); compiled programs keep the
  kernels that trace.
- not dropout (it has none), not a sliding window, not a deterministic backward (not yet
  measured here: such calls go to flash-attn 2, which is asked for its deterministic backward,
  or to torch's kernels, which follow ``torch.use_deterministic_algorithms``).

It compiles its kernels with the CuTe DSL once per configuration (dtype, head dim, causal,
varlen or not, forward and backward apart): seconds, not the ~55 ms per new *shape* that cuDNN
pays. The first use of each configuration in a process is timed and recorded (``compiled``,
shown by ``autoflash doctor``, logged at INFO). Its on-disk kernel cache is turned on for the
import unless the user has set ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED`` themselves, so a later
process loads instead of compiling.

Two packages share the ``flash_attn`` name: flash-attn 2's wheel ships an old ``flash_attn/cute``
folder that, installed after flash-attn-4, overwrites FlashAttention-4's files. That import
failure is reported with its fix and flash-attn 2 keeps serving.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from importlib import metadata
from typing import Dict, List

import torch

from autoflash.backends.capability import HALF_DTYPES, PackageBackend, Supports
from autoflash.call import AttentionCall
from autoflash.layout import Layout, pad, unpad, unpad_cache_keys

logger = logging.getLogger("autoflash")  # (backends see only the call record and the layout: not settings)

DISTRIBUTION = "flash-attn-4"
INSTALL = 'pip install "autoflash[fa4]"'
# flash-attn 2's wheel overwrites flash_attn/cute when installed after flash-attn-4 (findings)
REINSTALL = "pip install --force-reinstall --no-deps flash-attn-4"
CACHE_SWITCH = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
# head dims served, per compute capability major: Hopper (9.x) and Blackwell (10.x datacenter, 11.x), where
# FlashAttention-4 has forward and backward kernels. Hopper's were measured on an H200 against a float32
# reference (flash-attn-4 4.0.0b36): 64-256 within flash-attn 2's error, except head_dim 80, whose
# gradients were wrong (relative error 1.1; docs/findings.md). Blackwell's are the subset of its own
# checks (8-128, 256) that autoflash's LLaMA-family models use; not measured here.
HEAD_DIMS = {9: (64, 96, 128, 192, 256), 10: (64, 96, 128), 11: (64, 96, 128)}
ARCHITECTURES = tuple(HEAD_DIMS)
COMPILE_SECONDS_WORTH_SAYING = 0.5  # a first call faster than this loaded its kernel (disk cache) or was warm


class _Stopwatch(torch.autograd.Function):
    """Identity whose backward reads a clock. One on the kernel's output starts it and one on its query
    input stops it: between the two runs the kernel's backward, which compiles on its first use. Used only
    on the first call of a configuration."""

    @staticmethod
    def forward(ctx, x, clock: "_Clock", stops: bool):
        ctx.clock, ctx.stops = clock, stops
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.stop() if ctx.stops else ctx.clock.start()
        return grad, None, None


class _Clock:
    def __init__(self, on_stop):
        self.on_stop, self.started = on_stop, None

    def start(self):
        self.started = time.perf_counter()

    def stop(self):
        if self.started is not None:
            self.on_stop(time.perf_counter() - self.started)
            self.started = None


class _FlashAttn4(PackageBackend):
    name = "flash_attn_4"
    supports = Supports(
        devices=("cuda",), architectures=ARCHITECTURES, dtypes=HALF_DTYPES, head_dims_by_major=HEAD_DIMS,
        dropout_kinds=(), window=False, traced=False, deterministic=False, decode_step=False, cache_with_grad=False,
        cache_key_holes="none",
        why={"capability": "supported: 9.x Hopper, 10.x/11.x Blackwell",
             "traced": "torch.compile/torch.export: its kernels are not torch.library ops; served by a kernel that "
                       "traces",
             # it has a deterministic backward, but autoflash has not yet measured it on a GPU
             "deterministic": "FlashAttention-4's is not yet verified by autoflash",
             "decode_step": "no kv-cache kernel: 50 us a step against flash-attn 2's 29 us",
             # it takes a softcap, but autoflash has not yet compared it with a reference on a GPU
             "softcap": "FlashAttention-4's is not yet verified by autoflash; flash-attn 2 or transformers' eager "
                        "attention applies it"})
    functions = None  # (flash_attn_func, flash_attn_varlen_func) once imported

    def __init__(self):
        self.compiled: Dict[str, float] = {}  # "forward bf16 hd128 causal varlen" -> seconds of its first call
        self._seen = set()

    # -- availability ----------------------------------------------------------------------------

    @functools.lru_cache(maxsize=1)
    def version(self):
        """The installed distribution's version, or None. Looked up once: a lookup walks every installed
        distribution (about 0.7 ms on the CPU machine), and every new call shape asks."""
        try:
            return metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a broken distribution record
            return None

    @functools.lru_cache(maxsize=1)
    def _module(self):
        """((flash_attn_func, flash_attn_varlen_func), None) or (None, why not). Imported once."""
        version = self.version()
        if version is None:
            return None, f"flash-attn-4 is not installed ({INSTALL}; for Hopper and Blackwell GPUs)"
        user_set = CACHE_SWITCH in os.environ
        if not user_set:  # its kernel cache is read at import: on for the import, unless the user chose
            os.environ[CACHE_SWITCH] = "1"
        try:
            from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
        except Exception as exc:  # noqa: BLE001 - a stale or clashing install raises anything
            return None, (f"flash-attn-4 {version} is installed but flash_attn.cute does not import "
                          f"({type(exc).__name__}: {exc}); if flash-attn 2 was installed after it, its wheel "
                          f"overwrote flash_attn/cute: {REINSTALL}")
        finally:
            if not user_set:
                os.environ.pop(CACHE_SWITCH, None)
        self.functions = (flash_attn_func, flash_attn_varlen_func)
        return self.functions, None

    def unavailable_reasons(self) -> List[str]:
        if self.version() is None:  # (read from the installed distributions: nothing imported)
            return [f"flash-attn-4 is not installed ({INSTALL})"]
        _, reason = self._module()
        return [reason] if reason else []

    def details(self) -> dict:
        """For doctor: where compiled kernels persist, and what this process compiled (seconds of the first call)."""
        return {"disk_cache": self.disk_cache(), "compiled": dict(self.compiled)}

    def disk_cache(self) -> str:
        """Where its compiled kernels persist, for doctor."""
        try:
            from flash_attn.cute import cache_utils
        except Exception:  # noqa: BLE001
            return "unknown (flash_attn.cute does not import)"
        if not cache_utils.CUTE_DSL_CACHE_ENABLED:
            return f"off ({CACHE_SWITCH}={os.environ.get(CACHE_SWITCH, '')!r}, your setting)"
        return f"on: {cache_utils.get_cache_path()}"

    # -- running ---------------------------------------------------------------------------------

    def run(self, q, k, v, layout: Layout, call: AttentionCall, scale: float):
        dense, varlen = self.entry_points()
        if layout.kind == "dense":
            args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return self._timed(call, "dense", args, lambda q_, k_, v_: dense(
                q_, k_, v_, softmax_scale=scale, causal=call.causal)[0])
        if layout.kind == "varlen":
            args = (unpad(q, layout), unpad(k, layout), unpad(v, layout))
            cu, length = layout.cu_seqlens, layout.max_seqlen
            out = self._timed(call, "varlen", args, lambda q_, k_, v_: varlen(
                q_, k_, v_, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=length, max_seqlen_k=length,
                softmax_scale=scale, causal=call.causal)[0])
            return pad(out, layout)
        # a prefill into a cache: each row's valid keys as varlen sequences; the causal mask is
        # aligned bottom-right (the last query sees the last key)
        args = (unpad(q, layout), unpad_cache_keys(k, layout), unpad_cache_keys(v, layout))
        out = self._timed(call, "prefill", args, lambda q_, k_, v_: varlen(
            q_, k_, v_, cu_seqlens_q=layout.cu_seqlens, cu_seqlens_k=layout.cu_seqlens_k,
            max_seqlen_q=layout.max_seqlen, max_seqlen_k=layout.max_seqlen_k, softmax_scale=scale,
            causal=call.causal)[0])
        return pad(out, layout)

    def _timed(self, call: AttentionCall, form: str, args, kernel):
        """Run ``kernel(*args)``; the first call of a configuration in this process is timed, forward and
        (where it will run) backward, since that is when FlashAttention-4 compiles or loads its kernels."""
        config = (call.dtype, call.head_dim, call.causal, form == "dense")  # (what it compiles a kernel for)
        first_forward = config not in self._seen
        first_backward = call.needs_grad and ("backward", config) not in self._seen and torch.is_grad_enabled()
        if not (first_forward or first_backward):
            return kernel(*args)
        dtype, head_dim, causal, dense = config
        config_name = (f"{str(dtype).replace('torch.', '')} head_dim={head_dim} {'causal' if causal else 'full'} "
                       f"{'dense' if dense else 'varlen'}")
        if first_backward:
            self._seen.add(("backward", config))
            clock = _Clock(lambda seconds: self._record(f"backward {config_name}", seconds))
            args = (_Stopwatch.apply(args[0], clock, True),) + tuple(args[1:])
        self._seen.add(config)
        start = time.perf_counter()
        out = kernel(*args)
        if first_forward:
            self._record(f"forward {config_name}", time.perf_counter() - start)
        if first_backward:
            out = _Stopwatch.apply(out, clock, False)
        return out

    def _record(self, what: str, seconds: float) -> None:
        self.compiled[what] = round(seconds, 3)
        if seconds >= COMPILE_SECONDS_WORTH_SAYING:
            logger.info("FlashAttention-4 compiled its %s kernel in %.1f s (once per configuration and process; "
                        "kept on disk where its cache is on: %s)", what, seconds, self.disk_cache())


FLASH_ATTN_4 = _FlashAttn4()
