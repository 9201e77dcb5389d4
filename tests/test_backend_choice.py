"""Dispatch picks the first backend with no reason against a call, and says why it refused the others."""

import contextlib

import pytest
import torch

from autoflash import backends, dispatch
from autoflash.call import AttentionCall


def _call(**overrides):
    fields = dict(kind="varlen", device_type="cuda", capability=(9, 0), dtype=torch.bfloat16, head_dim=128,
                  num_heads=32, num_kv_heads=8, q_len=2048, kv_len=2048, dropout=0.0, causal=True, needs_grad=True)
    return AttentionCall(**{**fields, **overrides})


def _reasons(decision, name):
    return dict(decision.refused)[name]


def _without_flash_attn(monkeypatch):
    monkeypatch.setattr(backends.FLASH_ATTN, "unavailable_reasons", lambda: ["flash-attn is not importable"])


def test_cpu_call_goes_to_sdpa_and_says_why(monkeypatch):
    _without_flash_attn(monkeypatch)
    decision = dispatch.choose(_call(device_type="cpu", capability=None, dtype=torch.float32))
    assert decision.backend == "sdpa"
    assert "device=cpu (supported: cuda)" in _reasons(decision, "torch")
    assert any(r.startswith("dtype=float32") for r in _reasons(decision, "torch"))


def test_float32_on_a_gpu_goes_to_sdpa(monkeypatch):
    _without_flash_attn(monkeypatch)
    decision = dispatch.choose(_call(dtype=torch.float32))
    assert decision.backend == "sdpa"
    assert _reasons(decision, "torch") == (
        "dtype=float32 (supported: float16, bfloat16; float32 models run flash under torch.autocast)",)


def test_head_dim_256_is_refused_only_above_the_limit(monkeypatch):
    _without_flash_attn(monkeypatch)
    assert dispatch.choose(_call(head_dim=256)).backend == "torch"
    decision = dispatch.choose(_call(head_dim=264))
    assert decision.backend == "sdpa"
    assert "head_dim=264 (supported: multiple of 8, <= 256)" in _reasons(decision, "torch")


def test_gpu_below_ampere_falls_back_with_the_capability_in_the_reason(monkeypatch):
    _without_flash_attn(monkeypatch)
    decision = dispatch.choose(_call(capability=(7, 5)))
    assert decision.backend == "sdpa"
    assert "compute capability 7.5 (needs >= 8.0)" in _reasons(decision, "torch")


def test_ampere_gpu_without_flash_attn_uses_torch_builtin_kernels(monkeypatch):
    _without_flash_attn(monkeypatch)
    decision = dispatch.choose(_call(capability=(8, 0)))
    assert decision.backend == "torch"
    assert _reasons(decision, "flash_attn") == ("flash-attn is not importable",)


def test_decode_step_takes_the_cache_path_and_training_through_a_cache_is_refused(monkeypatch):
    _without_flash_attn(monkeypatch)
    assert dispatch.choose(_call(kind="cache", q_len=1, needs_grad=False)).backend == "torch"
    decision = dispatch.choose(_call(kind="cache", q_len=1, needs_grad=True))
    assert decision.backend == "sdpa"
    assert "kv-cache call with gradients (supported: inference)" in _reasons(decision, "torch")


def test_dropout_on_a_padded_batch_is_refused_by_torch_varlen(monkeypatch):
    _without_flash_attn(monkeypatch)
    decision = dispatch.choose(_call(dropout=0.1))
    assert decision.backend == "sdpa"
    assert any("varlen_attn has no dropout" in r for r in _reasons(decision, "torch"))
    assert dispatch.choose(_call(dropout=0.1, kind="dense")).backend == "torch"


def test_forcing_an_unavailable_backend_is_a_clear_error(monkeypatch):
    _without_flash_attn(monkeypatch)
    with dispatch.forced("flash_attn"):
        with pytest.raises(dispatch.BackendUnavailable, match="flash-attn is not importable"):
            dispatch.choose(_call())


def test_forcing_a_backend_that_cannot_serve_the_call_names_the_call():
    with dispatch.forced("torch"):
        with pytest.raises(dispatch.BackendUnavailable, match=r"device=cpu.*AUTOFLASH_BACKEND=auto"):
            dispatch.choose(_call(device_type="cpu", capability=None))


def test_forcing_sdpa_skips_the_flash_kernels():
    with dispatch.forced("sdpa"):
        decision = dispatch.choose(_call())
    assert decision == dispatch.Decision("sdpa", ())


def test_backend_env_switch_is_read_and_bad_values_fall_back_to_auto(monkeypatch, caplog):
    from autoflash import settings as settings_module

    for raw, expected in (("TORCH", "torch"), (" sdpa ", "sdpa"), ("fast-please", "auto"), ("", "auto")):
        monkeypatch.setenv("AUTOFLASH_BACKEND", raw)
        settings_module.settings.cache_clear()
        try:
            assert settings_module.settings().backend == expected
        finally:
            settings_module.settings.cache_clear()
    assert "AUTOFLASH_BACKEND='fast-please' is not one of auto|flash_attn_4|flash_attn|torch|sdpa" in caplog.text


def test_each_kind_of_fallback_warns_once(monkeypatch, caplog):
    _without_flash_attn(monkeypatch)
    for q_len in (10, 20, 30):
        dispatch.choose(_call(dtype=torch.float32, q_len=q_len, kv_len=q_len))
    dispatch.choose(_call(kind="cache", dtype=torch.float32, q_len=1))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "padded/packed attention runs on sdpa" in warnings[0] and "dtype=float32" in warnings[0]
    assert "kv-cache attention runs on sdpa" in warnings[1]


def _flash_attn_serves_everything(monkeypatch):
    monkeypatch.setattr(backends.FLASH_ATTN, "reasons_not_supported", lambda call: [])


def test_an_excluded_backend_is_skipped_and_the_refusal_says_so(monkeypatch):
    _flash_attn_serves_everything(monkeypatch)
    call = _call()
    assert dispatch.choose(call).backend == "flash_attn"
    with dispatch.excluded("flash_attn"):
        decision = dispatch.choose(call)
        described = dispatch.describe_choice(call)
    assert decision.backend == "torch"
    assert _reasons(decision, "flash_attn") == ("excluded (dispatch.excluded())",)
    refused = {r["backend"]: r["reasons"] for r in described["refused"]}
    assert described["backend"] == "torch" and refused["flash_attn"] == ["excluded (dispatch.excluded())"]
    assert dispatch.choose(call).backend == "flash_attn"  # the exclusion ends with the block


def test_sdpa_cannot_be_excluded():
    with pytest.raises(ValueError, match="cannot exclude 'sdpa' \\(excludable: flash_attn_4, flash_attn, torch\\)"):
        with dispatch.excluded("sdpa"):
            pass


def test_exclude_env_switch_is_read_and_unknown_names_are_named(monkeypatch, caplog):
    from autoflash import settings as settings_module

    _flash_attn_serves_everything(monkeypatch)
    monkeypatch.setenv("AUTOFLASH_EXCLUDE", "flash_attn, bogus")
    settings_module.settings.cache_clear()
    try:
        assert settings_module.settings().exclude == ("flash_attn",)
        decision = dispatch.choose(_call())
    finally:
        monkeypatch.delenv("AUTOFLASH_EXCLUDE")
        settings_module.settings.cache_clear()
    assert decision.backend == "torch" and _reasons(decision, "flash_attn") == ("excluded (AUTOFLASH_EXCLUDE)",)
    assert ("AUTOFLASH_EXCLUDE='flash_attn, bogus': 'bogus' not one of flash_attn_4|flash_attn|torch; ignored"
            in caplog.text)


@pytest.mark.parametrize("switch_off", ["sdpa_kernel(MATH)", "enable_flash_sdp(False)"])
def test_a_user_who_switches_sdpas_flash_kernel_off_gets_sdpa_under_their_switches(monkeypatch, caplog, switch_off):
    """transformers' own sdpa obeys `with sdpa_kernel(SDPBackend.MATH)` (a double backward, a reference run) and
    `torch.backends.cuda.enable_flash_sdp(False)`; so does autoflash: its flash kernels step aside, quietly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _flash_attn_serves_everything(monkeypatch)
    assert dispatch.choose(_call()).backend == "flash_attn_4" or dispatch.choose(_call()).backend == "flash_attn"
    before = dispatch.routing()
    if switch_off == "sdpa_kernel(MATH)":
        context = sdpa_kernel([SDPBackend.MATH])
    else:
        context = contextlib.ExitStack()
        flash_was = torch.backends.cuda.flash_sdp_enabled()
        torch.backends.cuda.enable_flash_sdp(False)
        context.callback(torch.backends.cuda.enable_flash_sdp, flash_was)
    with context:
        assert dispatch.routing() != before  # decisions kept per forward are keyed on the switch
        decision = dispatch.choose(_call())
    assert decision.backend == "sdpa"
    for name in backends.FLASH_KERNELS:
        assert _reasons(decision, name) == (f"excluded ({dispatch.SDPA_SWITCHES})",)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert dispatch.routing() == before and dispatch.choose(_call()).backend != "sdpa"


def test_a_model_run_under_sdpa_kernel_math_takes_a_double_backward_as_eager():
    """A gradient penalty needs the gradient's own gradient, which only SDPA's math kernel gives."""
    from conftest import gradient_penalty_under_math, model_pair, padding_mask, relative_error

    fast, eager = model_pair(seed=3)
    mask = padding_mask([6, 2, 4], "left")  # padded: the whole-model path and SDPA's per-sequence grid
    ids = torch.randint(3, 97, mask.shape, generator=torch.Generator().manual_seed(3))
    penalties = [gradient_penalty_under_math(model, ids, mask) for model in (fast, eager)]
    assert dispatch.last_decisions["varlen"].backend == "sdpa"
    assert relative_error(penalties[0][0], penalties[1][0]) < 1e-5
    assert relative_error(penalties[0][1], penalties[1][1]) < 1e-4


# -- what a backend serves is data -----------------------------------------------------------------

FEATURES = [  # (the record's field, its value that refuses, a call that asks for it, how the reason begins)
    ("devices", ("cuda",), dict(device_type="cpu", capability=None), "device=cpu"),
    ("min_capability", (9, 0), dict(capability=(8, 6)), "compute capability 8.6 (needs >= 9.0)"),
    ("dtypes", (torch.float16,), dict(dtype=torch.bfloat16), "dtype=bfloat16 (supported: float16)"),
    ("head_dim_most", 96, dict(head_dim=128), "head_dim=128 (supported: <= 96)"),
    ("dropout_kinds", ("dense",), dict(dropout=0.1), "dropout=0.1 on a padded or packed batch"),
    ("window", False, dict(window=64), "sliding_window=64"),
    ("traced_padding", False, dict(kind="masked", traced=True), "padded or packed batch in a traced call"),
    ("decode_step", False, dict(kind="cache", q_len=1, needs_grad=False), "one-token decode step"),
    ("cache_with_grad", False, dict(kind="cache", q_len=4), "kv-cache call with gradients"),
    ("cache_key_holes", "none", dict(kind="cache", q_len=1, needs_grad=False, cache_keys_contiguous=False),
     "cached key mask with holes"),
    ("deterministic", False, dict(deterministic="torch.use_deterministic_algorithms"), "deterministic backward"),
    ("traced", False, dict(traced=True), "traced call"),
]


@pytest.mark.parametrize("field, refusing, asks, reason", FEATURES, ids=[f[0] for f in FEATURES])
def test_a_record_that_lacks_a_feature_refuses_the_calls_that_ask_for_it_and_says_which(field, refusing, asks, reason):
    from autoflash.backends.capability import Supports, reasons

    why = {"decode_step": "no such kernel", "deterministic": "not measured", "traced": "not a torch.library op"}
    lacking = Supports(**{field: refusing}, why=why)
    assert [r for r in reasons(lacking, _call(**asks)) if r.startswith(reason)] != [], reasons(lacking, _call(**asks))
    served = {"dtypes": dict(dtype=torch.float16), "head_dim_most": dict(head_dim=64)}.get(field, {})
    assert reasons(lacking, _call(**served)) == []  # a call that does not ask for it is served
    assert reasons(Supports(), _call(**asks)) == []  # and the default record serves everything


def test_every_backend_declares_its_record_and_asks_availability_apart():
    from autoflash.backends.capability import Backend, Supports

    for backend in backends.BY_NAME.values():
        assert isinstance(backend, Backend) and isinstance(backend.supports, Supports), backend.name
    assert [b.name for b in backends.AUTO_ORDER] == ["flash_attn_4", "flash_attn", "torch", "sdpa"]
    assert backends.SDPA.reasons_not_supported(_call(device_type="cpu", capability=None, dtype=torch.float64,
                                                     head_dim=7, window=3, kind="masked", traced=True)) == []


def test_a_call_the_record_refuses_never_asks_whether_the_package_is_installed(monkeypatch):
    def must_not_ask():
        raise AssertionError("asked for availability on a call the record refuses")

    monkeypatch.setattr(backends.FLASH_ATTN, "unavailable_reasons", must_not_ask)
    assert backends.FLASH_ATTN.reasons_not_supported(_call(device_type="cpu", capability=None)) == [
        "device=cpu (supported: cuda)"]


def _flash_attn_installed(monkeypatch, softcap_refused: str):
    """flash-attn 2 as if installed, with a softcap argument, its build applying one ("") or refusing it."""
    monkeypatch.setattr(backends.FLASH_ATTN, "unavailable_reasons", lambda: [])
    monkeypatch.setattr(backends.FLASH_ATTN, "_has_softcap", True)
    monkeypatch.setattr(backends.FLASH_ATTN, "_softcap_refused", lambda head_dim: softcap_refused)
    monkeypatch.setattr(backends.FLASH_ATTN_4, "unavailable_reasons", lambda: ["flash-attn-4 is not installed"])


def test_a_soft_capped_call_goes_to_flash_attn_built_with_softcap(monkeypatch):
    _flash_attn_installed(monkeypatch, softcap_refused="")
    decision = dispatch.choose(_call(softcap=50.0))
    assert decision.backend == "flash_attn"
    assert any("softcap=50.0 (FlashAttention-4's is not yet verified" in r for r in _reasons(decision, "flash_attn_4"))


def test_a_soft_capped_call_no_kernel_applies_names_no_backend_and_says_why_of_each(monkeypatch):
    """A build without soft-capping (the GPU machine's wheel), torch's kernels and SDPA apply no softcap: dispatch
    names no backend (attention then hands the call to transformers' eager attention), and never raises."""
    _flash_attn_installed(monkeypatch, softcap_refused="This flash attention build does not support tanh softcapping.")
    decision = dispatch.choose(_call(softcap=50.0))
    assert decision.backend == ""
    assert any("build refuses it (This flash attention build does not support tanh softcapping.)" in r
               for r in _reasons(decision, "flash_attn"))
    assert "softcap=50.0 (supported: none; transformers' eager attention applies it)" in _reasons(decision, "torch")
    assert "softcap=50.0 (supported: none; transformers' eager attention applies it)" in _reasons(decision, "sdpa")
    assert dispatch.choose(_call()).backend == "flash_attn"  # the same call without a softcap is served


def test_forcing_a_backend_that_applies_no_softcap_on_a_soft_capped_call_is_a_clear_error():
    with dispatch.forced("sdpa"), pytest.raises(dispatch.BackendUnavailable, match="softcap=30.0"):
        dispatch.choose(_call(device_type="cpu", capability=None, dtype=torch.float32, softcap=30.0))


def _fake_flash_attn_func(applies_softcap: bool, raises: bool = False):
    """flash_attn_func as a build compiled with soft-capping computes it, or as one without: ignoring the argument,
    or raising at it."""
    from autoflash.backends.reference import varlen_reference

    def flash_attn_func(q, k, v, softcap=0.0, causal=False, **_):
        if raises and softcap:
            raise RuntimeError("This flash attention build does not support tanh softcapping.")
        bounds = torch.tensor([0, q.shape[1]], dtype=torch.int32)
        out = varlen_reference(q[0].float(), k[0].float(), v[0].float(), bounds, bounds, q.shape[-1] ** -0.5, causal,
                               softcap=softcap if applies_softcap and softcap else None)
        return out[None].to(q.dtype)

    return flash_attn_func


@pytest.mark.parametrize("applies, raises, refused", [
    (True, False, ""),
    (False, False, "its soft-capped "),
    (False, True, "This flash attention build does not support tanh softcapping."),
], ids=["built-with-softcap", "ignores-it", "raises"])
def test_whether_a_flash_attn_build_applies_a_softcap_is_measured_against_the_reference(monkeypatch, applies, raises,
                                                                                         refused):
    """A wheel built without soft-capping takes the argument: it may raise, or (the GPU machine's) ignore it. One
    forward and backward against the float32 reference tells, whatever the build does."""
    dense = _fake_flash_attn_func(applies, raises)
    monkeypatch.setattr(backends.FLASH_ATTN, "entry_points", lambda: (dense, None, None))
    said = backends.FLASH_ATTN._probe_softcap(64, device="cpu")
    assert said.startswith(refused) if refused else said == "", said


def test_a_softcap_check_that_fails_refuses_the_softcap_and_never_raises(monkeypatch):
    def broken(head_dim):
        raise OSError("the driver went away")

    monkeypatch.setattr(backends.FLASH_ATTN, "_probe_softcap", broken)
    monkeypatch.setattr(backends.FLASH_ATTN, "_softcap_probed", {})
    assert backends.FLASH_ATTN._softcap_refused(64) == "the check of its softcap failed (OSError: the driver went away)"
