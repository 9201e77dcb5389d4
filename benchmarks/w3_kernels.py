"""W3: attention kernels alone, in TFLOP/s forward and forward+backward.

    w3         attention kernels alone: causal, hd 128, 32/8 heads, 16k tokens at 1k..16k per sequence, and
               W1's lengths packed (varlen); bare kernels and autoflash's backends (their run(), layout included)

(``--smoke`` shrinks everything to run on a CPU.) Each rate is of one call timed alone and of QUEUED
calls between two syncs (``kernel_rates``).
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from harness import lengths_for, matmul_peak_tflops, timed


def kernel_functions(device):
    """name -> fn(q, k, v) on (batch, len, heads, dim) tensors, causal, GQA."""
    import torch.nn.functional as F

    fns = {}
    try:
        from flash_attn import flash_attn_func

        fns["flash_attn FA2"] = lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    except Exception:  # noqa: BLE001
        pass

    def sdpa_with(backends):
        from torch.nn.attention import sdpa_kernel

        def fn(q, k, v):
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, enable_gqa=True)
            return out.transpose(1, 2)

        return fn

    if device == "cuda":
        from torch.nn.attention import SDPBackend

        fns["torch built-in (sdpa flash)"] = sdpa_with([SDPBackend.FLASH_ATTENTION])
    fns["sdpa (default choice)"] = sdpa_with(None)
    return fns


def autoflash_kernel_functions():
    """name -> prepare(q, k, v, lengths) -> fn() through autoflash's own backends: their run() with a varlen
    layout of ``lengths`` packed in one row (what the whole-model path hands them). The layout and the
    backend's decision are made once, in prepare, as the model makes them once per forward: the timed
    calls hold only what a layer's attention call does."""
    from autoflash import dispatch
    from autoflash.call import AttentionCall, capability_of
    from autoflash.layout import Layout

    def preparer(backend):
        def prepare(q, k, v, lengths):
            total = sum(lengths)
            cu = torch.tensor([0] + lengths, device=q.device).cumsum(0).to(torch.int32)
            layout = Layout(kind="varlen", batch=1, q_len=total, kv_len=total, cu_seqlens=cu, max_seqlen=max(lengths),
                            total=total)
            call = AttentionCall(kind="varlen", device_type=q.device.type, capability=capability_of(q.device),
                                 dtype=q.dtype, head_dim=q.shape[-1], num_heads=q.shape[2], num_kv_heads=k.shape[2],
                                 q_len=total, kv_len=total, dropout=0.0, causal=True, needs_grad=q.requires_grad)
            why = backend.reasons_not_supported(call)
            if why:
                raise RuntimeError("; ".join(why))
            heads_first = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return lambda: backend.run(*heads_first, layout, call, q.shape[-1] ** -0.5)

        return prepare

    return {f"autoflash {name} (varlen)": preparer(dispatch.backend(name)) for name in ("flash_attn_4", "flash_attn",
                                                                                       "torch")}


QUEUED = 10  # W3: calls between two syncs in the "queued" timing


def kernel_rates(forward, forward_backward, flops, device) -> dict:
    """TFLOP/s forward and forward+backward (backward counted as 2.5x forward), of one call timed alone
    (synced before and after: its host time counts in full) and of QUEUED calls between two syncs (as in
    a training step, where the host runs ahead of the GPU)."""
    alone = statistics.median([timed(forward, device) for _ in range(10)])
    alone_both = statistics.median([timed(forward_backward, device) for _ in range(10)])
    queued = statistics.median([timed(lambda: [forward() for _ in range(QUEUED)], device) for _ in range(3)])
    queued_both = statistics.median([timed(lambda: [forward_backward() for _ in range(QUEUED)], device)
                                     for _ in range(3)])
    return dict(fwd_tflops=flops / alone / 1e12, fwd_bwd_tflops=3.5 * flops / alone_both / 1e12,
                fwd_tflops_queued=QUEUED * flops / queued / 1e12,
                fwd_bwd_tflops_queued=QUEUED * 3.5 * flops / queued_both / 1e12)


def run_kernels(s):
    device, dtype = s["device"], s["dtype"]
    heads, kv_heads, dim = s["heads"], s["kv_heads"], s["hidden"] // s["heads"]
    peak = matmul_peak_tflops(device)
    rows = []
    for name, fn in kernel_functions(device).items():
        for length in s["kernel_lengths"]:
            batch = max(1, s["kernel_tokens"] // length)
            q = torch.randn(batch, length, heads, dim, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(batch, length, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(batch, length, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(batch, length, heads, dim, device=device, dtype=dtype)
            flops = 4 * batch * heads * dim * length * length / 2  # causal forward
            try:
                for _ in range(3):
                    fn(q, k, v).backward(grad)
                rows.append(dict(kernel=name, length=length, batch=batch, **kernel_rates(
                    lambda: fn(q, k, v), lambda: fn(q, k, v).backward(grad), flops, device)))
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(kernel=name, length=length, skipped=f"{type(exc).__name__}: {str(exc)[:80]}"))
    # through autoflash's backends, packed in one row: equal lengths as above, then W1's lengths
    shapes = [(n, [n] * max(1, s["kernel_tokens"] // n)) for n in s["kernel_lengths"]]
    shapes.append(("W1 lengths", lengths_for(s)))
    for name, prepare in autoflash_kernel_functions().items():
        for label, lengths in shapes:
            total = sum(lengths)
            q = torch.randn(1, total, heads, dim, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(1, total, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(1, total, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(1, total, heads, dim, device=device, dtype=dtype)
            flops = sum(4 * heads * dim * n * n / 2 for n in lengths)
            try:
                fn = prepare(q, k, v, lengths)
                for _ in range(3):
                    fn().backward(grad)
                rows.append(dict(kernel=name, length=label, batch=len(lengths), **kernel_rates(
                    fn, lambda: fn().backward(grad), flops, device)))
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(kernel=name, length=label, skipped=f"{type(exc).__name__}: {str(exc)[:100]}"))
    return dict(matmul_peak_tflops=peak, rows=rows)


def table_lines(result) -> list[str]:
    lines = [f"matmul peak {result['matmul_peak_tflops']:.0f} TFLOP/s; TFLOP/s forward / forward+backward"]
    for suffix, what in (("", "one call timed alone"), ("_queued", f"{QUEUED} calls between two syncs")):
        if not any(f"fwd_tflops{suffix}" in r for r in result["rows"]):
            continue  # (results saved before the queued timing existed)
        lines.append(f"-- {what}")
        header = None
        for kernel in dict.fromkeys(r["kernel"] for r in result["rows"]):
            mine = [r for r in result["rows"] if r["kernel"] == kernel]
            if header != [r["length"] for r in mine]:  # bare kernels by length, autoflash's backends by shape
                header = [r["length"] for r in mine]
                lines.append(f"{'kernel':<34}" + "".join(f"{h:>14}" for h in header))
            cells = ["skipped" if "skipped" in r else
                     f"{r[f'fwd_tflops{suffix}']:.0f}/{r[f'fwd_bwd_tflops{suffix}']:.0f}" for r in mine]
            lines.append(f"{kernel:<34}" + "".join(f"{c:>14}" for c in cells))
    for reason in dict.fromkeys(f"{r['kernel']}: {r['skipped']}" for r in result["rows"] if "skipped" in r):
        lines.append(f"  skipped {reason}")
    return lines
