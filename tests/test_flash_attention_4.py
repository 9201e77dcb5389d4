"""The FlashAttention-4 backend: first where it fits, refused with a reason that says what to do where not.

Its kernels need a Hopper or Blackwell GPU, so here (CPU) the package is simulated: its
distribution record and its module are replaced, never its kernels run. The GPU suite runs them.
"""

import sys
import time
import textwrap
from importlib import metadata

import pytest
import torch

from autoflash import backends, dispatch
from autoflash.backends import flash_attn_4
from test_backend_choice import _call, _reasons  # an sm90 bf16 training call, head dim 128, GQA 32/8

FA4 = backends.FLASH_ATTN_4


@pytest.fixture
def installed(monkeypatch):
    """flash-attn-4 installed and importable (its two entry points replaced by stand-ins)."""
    monkeypatch.setattr(FA4, "version", lambda: "4.0.0b36")
    monkeypatch.setattr(FA4, "_module", lambda: ((object(), object()), None))
    monkeypatch.setattr(backends.FLASH_ATTN, "reasons_not_supported", lambda call: [])


@pytest.fixture
def fresh_import(monkeypatch):
    """A clean slate for a real import of ``flash_attn``: the cached result and the modules are restored after."""
    type(FA4)._module.cache_clear()
    type(backends.FLASH_ATTN)._module.cache_clear()
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "flash_attn"}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [n for n in sys.modules if n.split(".")[0] == "flash_attn"]:
        del sys.modules[name]
    sys.modules.update(saved)
    type(FA4)._module.cache_clear()
    type(backends.FLASH_ATTN)._module.cache_clear()


def _fake_package(root, flash_attn_2: bool, cute_body: str):
    package = root / "flash_attn"
    (package / "cute").mkdir(parents=True)
    if flash_attn_2:
        (package / "__init__.py").write_text('__version__ = "2.8.3"\n')
    (package / "cute" / "__init__.py").write_text(textwrap.dedent(cute_body))
    return str(root)


def test_it_is_tried_first_and_serves_hopper_training_and_prefill(installed):
    assert [b.name for b in backends.AUTO_ORDER] == ["flash_attn_4", "flash_attn", "torch", "sdpa"]
    assert dispatch.choose(_call()).backend == "flash_attn_4"
    assert dispatch.choose(_call(kind="dense")).backend == "flash_attn_4"
    assert dispatch.choose(_call(kind="cache", q_len=700, kv_len=1024, needs_grad=False)).backend == "flash_attn_4"
    assert dispatch.choose(_call(capability=(10, 0), head_dim=64)).backend == "flash_attn_4"


def test_decode_steps_stay_on_the_kernels_that_serve_them(installed):
    decision = dispatch.choose(_call(kind="cache", q_len=1, kv_len=1024, needs_grad=False))
    assert decision.backend == "flash_attn"
    assert _reasons(decision, "flash_attn_4") == (
        "one-token decode step (no kv-cache kernel: 50 us a step against flash-attn 2's 29 us)",)


def test_traced_calls_go_to_a_kernel_that_traces(installed):
    decision = dispatch.choose(_call(traced=True))
    assert decision.backend == "flash_attn"
    assert "traced call" in _reasons(decision, "flash_attn_4")[0]


@pytest.mark.parametrize("overrides,reason", [
    (dict(capability=(8, 0)), "compute capability 8.0 (supported: 9.x Hopper, 10.x/11.x Blackwell)"),
    (dict(capability=(12, 0)), "compute capability 12.0 (supported: 9.x Hopper, 10.x/11.x Blackwell)"),
    (dict(head_dim=80), "head_dim=80 (supported on compute capability 9.x: 64, 96, 128, 192, 256)"),
    (dict(capability=(10, 0), head_dim=256), "head_dim=256 (supported on compute capability 10.x: 64, 96, 128)"),
    (dict(dtype=torch.float32), "dtype=float32 (supported: float16, bfloat16)"),
    (dict(dropout=0.1), "dropout=0.1 (supported: 0)"),
    (dict(window=16), "sliding_window=16 (supported: none yet; served exactly by sdpa's mask)"),
    (dict(kind="cache", q_len=8, kv_len=64, needs_grad=True), "kv-cache call with gradients (supported: inference)"),
])
def test_what_it_cannot_serve_is_refused_with_the_reason(installed, overrides, reason):
    decision = dispatch.choose(_call(**overrides))
    assert decision.backend != "flash_attn_4"
    assert reason in _reasons(decision, "flash_attn_4")


def test_an_older_gpu_is_refused_without_importing_the_package(monkeypatch):
    monkeypatch.setattr(FA4, "version", lambda: "4.0.0b36")

    def must_not_import():
        raise AssertionError("imported for a call it cannot serve")

    monkeypatch.setattr(FA4, "_module", must_not_import)
    assert FA4.reasons_not_supported(_call(capability=(8, 6))) == [
        "compute capability 8.6 (supported: 9.x Hopper, 10.x/11.x Blackwell)"]
    assert FA4.reasons_not_supported(_call(device_type="cpu", capability=None, dtype=torch.float32)) == [
        "device=cpu (supported: cuda)", "dtype=float32 (supported: float16, bfloat16)"]


def test_missing_package_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setattr(FA4, "version", lambda: None)
    monkeypatch.setattr(backends.FLASH_ATTN, "reasons_not_supported", lambda call: [])
    decision = dispatch.choose(_call())
    assert decision.backend == "flash_attn"
    assert _reasons(decision, "flash_attn_4") == ('flash-attn-4 is not installed (pip install "autoflash[fa4]")',)


def test_a_stale_flash_attn_cute_is_refused_with_the_fix_and_flash_attn_2_keeps_serving(
        monkeypatch, tmp_path, fresh_import):
    # flash-attn 2's wheel installed after flash-attn-4: its old flash_attn/cute fails to import (FINDINGS 14)
    monkeypatch.syspath_prepend(_fake_package(tmp_path, flash_attn_2=True, cute_body="""\
        raise AttributeError("module 'cutlass.cute.core' has no attribute 'ThrMma'")
        """))
    monkeypatch.setattr(FA4, "version", lambda: "4.0.0b36")
    monkeypatch.setattr(backends.FLASH_ATTN, "reasons_not_supported", lambda call: [])
    decision = dispatch.choose(_call())
    assert decision.backend == "flash_attn"
    (reason,) = _reasons(decision, "flash_attn_4")
    assert "flash-attn-4 4.0.0b36 is installed but flash_attn.cute does not import" in reason
    assert "ThrMma" in reason and "pip install --force-reinstall --no-deps flash-attn-4" in reason


@pytest.mark.parametrize("user_value", [None, "0", "1"])
def test_its_disk_cache_is_on_for_the_import_unless_the_user_chose(monkeypatch, tmp_path, fresh_import, user_value):
    monkeypatch.syspath_prepend(_fake_package(tmp_path, flash_attn_2=False, cute_body="""\
        import os
        SEEN = os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED")
        def flash_attn_func(*args, **kwargs): pass
        def flash_attn_varlen_func(*args, **kwargs): pass
        """))
    if user_value is None:
        monkeypatch.delenv(flash_attn_4.CACHE_SWITCH, raising=False)
    else:
        monkeypatch.setenv(flash_attn_4.CACHE_SWITCH, user_value)
    monkeypatch.setattr(FA4, "version", lambda: "4.0.0b36")
    assert FA4.unavailable_reasons() == []
    assert sys.modules["flash_attn.cute"].SEEN == (user_value or "1")
    assert __import__("os").environ.get(flash_attn_4.CACHE_SWITCH) == user_value  # nothing left behind


def test_flash_attn_4_alone_does_not_pass_for_flash_attn_2(monkeypatch, tmp_path, fresh_import):
    # flash-attn-4 without flash-attn 2 leaves `flash_attn` a namespace package
    monkeypatch.syspath_prepend(_fake_package(tmp_path, flash_attn_2=False, cute_body=""))
    assert backends.FLASH_ATTN.unavailable_reasons() == [
        "flash-attn (FlashAttention-2) is not installed (pip install autoflash[flash-attn])"]


def test_the_fa4_extra_installs_flash_attn_4():
    requirements = metadata.metadata("autoflash").get_all("Requires-Dist")
    assert any(r.replace(" ", "").startswith("flash-attn-4>=4.0.0b36") and 'extra=="fa4"' in r.replace(" ", "")
               for r in requirements), requirements


class _SlowBackward(torch.autograd.Function):
    """A stand-in kernel whose backward takes a known time, as a first backward that compiles does."""

    @staticmethod
    def forward(ctx, q):
        return q * 2

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.05)
        return grad * 2


def test_the_first_call_of_each_configuration_is_timed_forward_and_backward_and_later_calls_are_not():
    fa4 = flash_attn_4._FlashAttn4()
    q, k, v = (torch.randn(6, 4, 64, requires_grad=True) for _ in range(3))

    def kernel(q_, k_, v_):
        time.sleep(0.02)
        return _SlowBackward.apply(q_)

    first = fa4._timed(_call(head_dim=64), "varlen", (q, k, v), kernel)
    assert set(fa4.compiled) == {"forward bfloat16 head_dim=64 causal varlen"}  # the backward has not run yet
    first.sum().backward()
    assert fa4.compiled["backward bfloat16 head_dim=64 causal varlen"] >= 0.05
    assert fa4.compiled["forward bfloat16 head_dim=64 causal varlen"] >= 0.02
    assert torch.equal(q.grad, torch.full_like(q, 2.0))  # the stopwatches change no gradient

    again = fa4._timed(_call(head_dim=64), "varlen", (q, k, v), kernel)
    assert type(again.grad_fn).__name__ == "_SlowBackwardBackward"  # no stopwatch once timed
    fa4._timed(_call(head_dim=128, needs_grad=False), "dense", (q, k, v), kernel)
    assert "forward bfloat16 head_dim=128 causal dense" in fa4.compiled
    assert "backward bfloat16 head_dim=128 causal dense" not in fa4.compiled  # inference: no backward to time
