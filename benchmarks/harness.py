"""What every workload shares: the sizes, the model, the competitors, the clock and the table's columns.

Inside a workload every competitor runs in the same process, one after another, on the same model
and the same data:

    eager                 transformers' eager attention
    sdpa                  transformers' own sdpa (autoflash switched off while the model is set up)
    flash_attention_2     transformers' flash-attn integration (needs the flash-attn package)
    autoflash             autoflash, every backend available (FlashAttention-4, then flash-attn, where installed)
    autoflash-fa2         autoflash with FlashAttention-4 hidden (a row only where it is installed)
    autoflash-torch       autoflash with both flash-attn packages hidden: PyTorch's built-in kernels only

W1 adds its own rows (``w1_training.TRAINING_COMPETITORS``); ``competing_as`` sets up every one of them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time

import torch

COMPETITORS = ["eager", "sdpa", "flash_attention_2", "autoflash", "autoflash-fa2", "autoflash-torch"]
# the best a transformers user can do today: the same tokens packed padding-free by the caller, run
# with flash_attention_2
PADDING_FREE_FA2 = "fa2 padding-free"
# transformers' own FlashAttention-4 integration, padded and packed by hand (rows only where it is available):
# issue 12 asks why it gains nothing end to end; `w1 --profile` breaks its step down beside autoflash's
PADDING_FREE_FA4 = "fa4 padding-free"
PADDING_FREE = {PADDING_FREE_FA2: "flash_attention_2", PADDING_FREE_FA4: "flash_attention_4"}


# -- set-up --------------------------------------------------------------------------------------

def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2, vocab=256, batch=3, min_len=4, max_len=24,
                    steps=2, warmup=1, decode_batch=3, prompt_min=3, prompt_max=12, new_tokens=4,
                    kernel_tokens=256, kernel_lengths=[64, 128], long_lengths=[64, 128], device="cpu",
                    dtype=torch.float32)
    return dict(hidden=4096, heads=32, kv_heads=8, mlp=14336, layers=4, vocab=32000, batch=8, min_len=128,
                max_len=4096, steps=5, warmup=2, decode_batch=16, prompt_min=64, prompt_max=1024, new_tokens=128,
                kernel_tokens=16384, kernel_lengths=[1024, 2048, 4096, 8192, 16384],
                long_lengths=[4096, 8192, 16384, 32768, 65536, 131072], device="cuda", dtype=torch.bfloat16)


# --family: the model built at the same sizes (Qwen2's config adds q/k/v biases by default)
FAMILY_MODELS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
                 # adopted decoders outside the families (autoflash.adoption): whole model on 5.x
                 "phi3": ("Phi3Config", "Phi3ForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
                 "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
                 "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
                 "gemma3-window1024": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
                 # soft-capped attention logits: adopted only where a kernel applies the softcap
                 "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                 # a vision-language model on text: its language model at the shared sizes (M-RoPE), a one-block
                 # vision tower that text-only batches never run
                 "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}
# the vision-language models among them: the shared sizes are their text config's
VISION_LANGUAGE = {"qwen2_5_vl"}
# what a family's model needs beyond the shared sizes: the shapes (Mixtral: 8 experts, top 2, on 2 layers;
# Qwen3-MoE: 32 experts of a quarter of the MLP, top 4, on 2 layers; Gemma 3: its config's window, 4096, which no W1 sequence
# passes: a binding window keeps a batch per layer until a flash kernel here applies one)
FAMILY_EXTRA = {"mistral": lambda s: {"sliding_window": None},  # LLaMA's attention: no window
                "qwen3": lambda s: {"head_dim": s["hidden"] // s["heads"]},
                "mixtral": lambda s: {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
                                      "num_hidden_layers": min(s["layers"], 2)},
                "qwen3_moe": lambda s: {"head_dim": s["hidden"] // s["heads"], "num_experts": 32,
                                        "num_hidden_layers": min(s["layers"], 2),
                                        "num_experts_per_tok": 4, "moe_intermediate_size": s["mlp"] // 4,
                                        "decoder_sparse_step": 1, "mlp_only_layers": []},
                "gemma3": lambda s: {"head_dim": s["hidden"] // s["heads"],
                                     "query_pre_attn_scalar": s["hidden"] // s["heads"]},
                # Gemma 3 checkpoints' window: it binds on most W1 sequences (flash-attn's window_size applies it)
                # head dim 64: the GPU machine's softcap test build of flash-attn has no other
                "gemma2": lambda s: {"head_dim": 64, "query_pre_attn_scalar": 64},
                "gemma3-window1024": lambda s: {"head_dim": s["hidden"] // s["heads"],
                                                "query_pre_attn_scalar": s["hidden"] // s["heads"],
                                                "sliding_window": 1024}}


def build_model(s, family: str = "llama"):
    import transformers

    config_name, model_name = FAMILY_MODELS[family]
    extra = FAMILY_EXTRA.get(family, lambda s: {})(s)
    sizes = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                 num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], rope_theta=500000.0,
                 max_position_embeddings=262144, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 **{"num_hidden_layers": s["layers"], **extra})
    if family in VISION_LANGUAGE:
        half = s["hidden"] // s["heads"] // 2  # M-RoPE's temporal, height and width shares of the rotary pairs
        sizes["rope_scaling"] = {"type": "mrope", "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}
        config = getattr(transformers, config_name)(
            text_config=sizes, vision_config=dict(depth=1, hidden_size=64, num_heads=2, intermediate_size=64,
                                                  out_hidden_size=s["hidden"]))
    else:
        config = getattr(transformers, config_name)(**sizes)
    torch.manual_seed(0)
    with torch.device(s["device"]):
        model = getattr(transformers, model_name)(config)
    return model.to(s["dtype"])


def lengths_for(s, seed=0):
    """W1's sequence lengths, U(min_len, max_len); W3 times its kernels on them too."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(s["min_len"], s["max_len"] + 1, (s["batch"],), generator=generator).tolist()


# -- competitors -----------------------------------------------------------------------------------

def available(competitor: str, model=None) -> str | None:
    """None if the competitor can run here (on ``model``, where given), else why not."""
    if model is not None and PADDING_FREE.get(competitor, competitor) == "sdpa" \
            and not getattr(type(model), "_supports_sdpa", True):
        return f"transformers refuses sdpa for {type(model).__name__}"
    if competitor in ("flash_attention_4", PADDING_FREE_FA4):
        try:
            from transformers.utils.import_utils import is_flash_attn_4_available

            if not is_flash_attn_4_available():
                return "transformers says FlashAttention-4 is not available"
        except Exception as exc:  # noqa: BLE001
            return f"this transformers has no flash_attention_4 ({type(exc).__name__})"
    if competitor in ("flash_attention_2", PADDING_FREE_FA2):
        try:
            import flash_attn  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"flash-attn not importable ({type(exc).__name__})"
    if competitor == "autoflash-fa2":
        from autoflash import backends

        if backends.FLASH_ATTN_4.unavailable_reasons():
            return "FlashAttention-4 not available: this row equals autoflash's"
    return None


@contextlib.contextmanager
def competing_as(model, competitor: str):
    """Set the model's attention for one competitor; restore autoflash's full backend list after."""
    import autoflash
    from autoflash import dispatch

    from autoflash import settings as settings_module

    exclusion = contextlib.nullcontext()
    per_layer = competitor.endswith("per-layer")
    if per_layer:
        os.environ[settings_module.UNPAD_MODEL_VARIABLE] = "0"
        settings_module.settings.cache_clear()
    if competitor in ("sdpa", "flash_attention_2", "flash_attention_4", *PADDING_FREE):
        competitor = PADDING_FREE.get(competitor, competitor)
        autoflash.disable()  # transformers' own implementation, not autoflash's replacement of it
        try:
            model.set_attn_implementation(competitor)
        finally:
            autoflash.enable()
    elif competitor == "eager":
        model.set_attn_implementation("eager")
    else:
        model.set_attn_implementation("autoattn")
        if competitor.startswith("autoflash-torch"):
            exclusion = dispatch.excluded("flash_attn_4", "flash_attn")
        elif competitor == "autoflash-fa2":
            exclusion = dispatch.excluded("flash_attn_4")
    dispatch.clear_cache()
    try:
        with exclusion:
            yield
    finally:
        if per_layer:
            os.environ.pop(settings_module.UNPAD_MODEL_VARIABLE, None)
            settings_module.settings.cache_clear()
        dispatch.clear_cache()


def backend_used():
    from autoflash import dispatch

    # (no backend: a soft-capped call no kernel here applies, handed to transformers' eager attention)
    return ",".join(sorted({f"{k}:{d.backend or 'handed-to-eager'}" for k, d in dispatch.last_decisions.items()})) \
        or "-"


# -- the clock and the memory ----------------------------------------------------------------------

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, wait=True):
    """Seconds for ``fn`` from an empty GPU queue until its work is done, or (``wait=False``) until it
    returns: the host's share, near the whole when the step is host-bound."""
    sync(device)
    start = time.perf_counter()
    fn()
    if wait:
        sync(device)
    seconds = time.perf_counter() - start
    sync(device)
    return seconds


def reset_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


_PEAK = {}


def matmul_peak_tflops(device) -> float:
    """Measured bf16 matmul rate on this GPU (8192^3), the MFU denominator."""
    if device != "cuda":
        return float("nan")
    if "v" not in _PEAK:
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        times = [timed(lambda: a @ b, "cuda") for _ in range(10)]
        _PEAK["v"] = 2 * 8192**3 / statistics.median(times) / 1e12
    return _PEAK["v"]


# -- reporting -------------------------------------------------------------------------------------

def add_ratios(rows, key):
    """Each row's `key` over flash_attention_2's, sdpa's and the padding-free flash_attention_2 run's
    (x_flash_attention_2 / x_sdpa / "x pf" in the table)."""
    by = {r["competitor"]: r.get(key) for r in rows if key in r}
    for r in rows:
        if key in r:
            for base in ("flash_attention_2", "sdpa", PADDING_FREE_FA2):
                if by.get(base):
                    r[f"x_{base}"] = r[key] / by[base]


def competitor_lines(rows, header, cells):
    """A table of competitors: `cells(row)` formats a measured row; skipped rows say why."""
    padding_free = any(f"x_{PADDING_FREE_FA2}" in r for r in rows)
    lines = [f"{'competitor':<26}{header}{'x fa2':>7}{'x sdpa':>7}" + (f"{'x pf':>7}" if padding_free else "")
             + "  backend"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['competitor']:<26}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['competitor']:<26}{cells(r)}{r.get('x_flash_attention_2', float('nan')):>7.2f}"
                     f"{r.get('x_sdpa', float('nan')):>7.2f}"
                     + (f"{r.get('x_' + PADDING_FREE_FA2, float('nan')):>7.2f}" if padding_free else "")
                     + f"  {r['backend']}")
    return lines


def title(workload, result) -> str:
    family = (result.get("environment") or {}).get("family", "llama")
    return f"== {workload} ==" + ("" if family == "llama" else f" ({family}-shaped model, same sizes)")


def environment(s) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"gpu": torch.cuda.get_device_name(0) if s["device"] == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": version("transformers"), "flash-attn": version("flash-attn") or version("flash_attn"),
            "flash-attn-4": version("flash-attn-4"),
            "date": time.strftime("%Y-%m-%d")}
