"""A user who asks for reproducible gradients gets them from whichever kernel autoflash picks.

transformers' flash-attn path hands flash-attn ``deterministic=True`` when
``FLASH_ATTENTION_DETERMINISTIC=1``; torch's own flash backward is deterministic under
``torch.use_deterministic_algorithms(True)``; the Trainer's ``full_determinism`` sets both.
autoflash must not quietly trade either away for a faster, non-deterministic backward.
Here (CPU) flash-attn's entry points are stand-ins that record what they were asked; the
GPU suite runs the kernels.
"""

import inspect

import pytest
import torch

from autoflash import backends, dispatch
from autoflash.call import FLASH_ATTN_SWITCH, TORCH_SWITCH, deterministic_backward_asked
from autoflash.layout import plan_without_cache
from conftest import model_pair, modern_era, padding_mask, whole_model_padding_removal
from test_backend_choice import _call, _reasons

FA2 = backends.FLASH_ATTN


@pytest.fixture
def torch_switch():
    """Set torch's deterministic switch for the test; restored after."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_it_is_asked_for_by_torchs_switch_or_by_flash_attentions_variable(torch_switch, monkeypatch):
    monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    torch_switch(False)
    assert deterministic_backward_asked() == ""
    torch_switch(True)
    assert deterministic_backward_asked() == TORCH_SWITCH
    torch_switch(True, warn_only=True)  # torch's own flash backward only warns then
    assert deterministic_backward_asked() == ""
    monkeypatch.setenv("FLASH_ATTENTION_DETERMINISTIC", "1")
    assert deterministic_backward_asked() == FLASH_ATTN_SWITCH
    torch_switch(True)  # torch's switch asks every kernel: it is the one that counts
    assert deterministic_backward_asked() == TORCH_SWITCH
    torch_switch(False)
    monkeypatch.setenv("FLASH_ATTENTION_DETERMINISTIC", "0")
    assert deterministic_backward_asked() == ""


@pytest.mark.parametrize("whole_model", [True, False])
def test_a_training_forward_asks_its_kernels_and_an_inference_forward_does_not(monkeypatch, torch_switch,
                                                                              whole_model):
    """Both ways autoflash runs a padded batch (whole-model padding removal, and per layer) carry the request
    to the backend's choice. A training module's forward without gradients asks too: reentrant checkpointing
    runs it so first and recomputes it with gradients, and both must run the same kernel. An evaluation
    forward has no backward to make deterministic."""
    asked = []
    choose = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda call: asked.append(call) or choose(call))
    torch_switch(True)
    ids = torch.randint(3, 97, (3, 6))
    mask = padding_mask([6, 2, 4], "right")
    with whole_model_padding_removal(whole_model):
        model, _ = model_pair()
        model.train()
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        assert asked and all(call.deterministic == TORCH_SWITCH for call in asked)
        asked.clear()
        if _attention_knows_its_module():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            assert asked and all(call.deterministic == TORCH_SWITCH for call in asked)
            asked.clear()
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert asked and not any(call.deterministic for call in asked)


def _attention_knows_its_module() -> bool:
    """transformers 4.43-4.47 call flash attention as a module-level function, without the module whose
    training flag would tell; every other release hands it over."""
    import transformers
    from packaging import version

    return not version.parse("4.43") <= version.parse(transformers.__version__) < version.parse("4.48")


def test_flash_attention_4_refuses_it_and_flash_attn_2_serves_it(monkeypatch):
    monkeypatch.setattr(backends.FLASH_ATTN_4, "version", lambda: "4.0.0b36")
    monkeypatch.setattr(backends.FLASH_ATTN_4, "_module", lambda: ((object(), object()), None))
    monkeypatch.setattr(FA2, "reasons_not_supported", lambda call: [])
    decision = dispatch.choose(_call(deterministic=TORCH_SWITCH))
    assert decision.backend == "flash_attn"
    assert _reasons(decision, "flash_attn_4") == (
        "deterministic backward asked for (torch.use_deterministic_algorithms): FlashAttention-4's is not yet "
        "verified by autoflash",)
    assert dispatch.choose(_call()).backend == "flash_attn_4"


def test_flash_attentions_variable_alone_warns_where_a_kernel_that_ignores_it_serves(monkeypatch, caplog):
    """transformers hands FLASH_ATTENTION_DETERMINISTIC to flash-attn only; torch's kernels heed torch's switch.
    Where they serve a training call asked so, the user hears what to set, once."""
    monkeypatch.setattr(FA2, "unavailable_reasons", lambda: ["flash-attn is not importable"])
    for length in (64, 128):
        assert dispatch.choose(_call(q_len=length, kv_len=length, deterministic=FLASH_ATTN_SWITCH)).backend == "torch"
    warnings = [r.getMessage() for r in caplog.records if "deterministic" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(
        "FLASH_ATTENTION_DETERMINISTIC=1 asks flash-attn for a deterministic backward, but torch serves")
    assert "set that too, or install flash-attn >= 2.4.1" in warnings[0]
    caplog.clear()
    dispatch.choose(_call(q_len=256, kv_len=256, deterministic=TORCH_SWITCH))  # torch's kernels heed it
    dispatch.choose(_call(device_type="cpu", capability=None, dtype=torch.float32,
                          deterministic=FLASH_ATTN_SWITCH))  # (CPU kernels are deterministic)
    assert not [r for r in caplog.records if "deterministic" in r.getMessage()]


OMITTED = "(not passed)"


def _stand_in(recorded, with_deterministic=True):
    """flash-attn's dense and varlen entry points, recording the arguments that matter here; the output is q."""
    def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, deterministic=OMITTED):
        recorded.append(("dense", dict(dropout_p=dropout_p, causal=causal, deterministic=deterministic)))
        return q

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
               causal=False, deterministic=OMITTED):
        recorded.append(("varlen", dict(dropout_p=dropout_p, causal=causal, deterministic=deterministic)))
        return q

    def old_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                   softmax_scale=None, causal=False):  # flash-attn < 2.4.1
        return q

    return dense, varlen if with_deterministic else old_varlen, None


@pytest.fixture
def flash_attn_2(monkeypatch):
    """flash-attn 2 importable, with stand-ins for its kernels; its signature-derived facts recomputed."""
    def install(functions, version="2.8.3"):
        monkeypatch.setattr(FA2, "_module", lambda: (functions, None))
        monkeypatch.setattr(FA2, "functions", functions)
        monkeypatch.setattr(FA2, "version", lambda: version)
        FA2.__dict__.pop("_has_deterministic", None)

    yield install
    FA2.__dict__.pop("_has_deterministic", None)


def test_flash_attn_2_is_handed_deterministic_only_where_it_was_asked_for(flash_attn_2):
    """Asked for: ``deterministic=True``; not asked for: not passed at all (releases before 2.4.1 lack it)."""
    recorded = []
    flash_attn_2(_stand_in(recorded))
    q = k = v = torch.randn(3, 4, 5, 8)  # (batch, heads, len, dim)
    varlen_layout = plan_without_cache(padding_mask([5, 2, 3], "left").bool(), None, 3, 5, torch.device("cpu"))
    dense_layout = plan_without_cache(None, None, 3, 5, torch.device("cpu"))
    for asked in (FLASH_ATTN_SWITCH, TORCH_SWITCH, ""):
        for layout in (varlen_layout, dense_layout):
            FA2.run(q, k, v, layout, _call(kind=layout.kind, deterministic=asked), scale=0.125)
    assert recorded == [(kind, dict(dropout_p=0.0, causal=True, deterministic=True if asked else OMITTED))
                        for asked in (FLASH_ATTN_SWITCH, TORCH_SWITCH, "") for kind in ("varlen", "dense")]


def test_a_flash_attn_2_without_the_switch_refuses_such_calls_and_says_which_release_has_it(flash_attn_2):
    flash_attn_2(_stand_in([], with_deterministic=False), version="2.3.6")
    assert "deterministic" not in inspect.signature(FA2.functions[1]).parameters
    assert ("deterministic backward asked for (torch.use_deterministic_algorithms), which flash-attn 2.3.6 lacks "
            "(needs >= 2.4.1)") in FA2.reasons_not_supported(_call(deterministic=TORCH_SWITCH))
    assert not [r for r in FA2.reasons_not_supported(_call()) if "deterministic" in r]


def test_a_compiled_training_forward_carries_the_request_into_its_trace(monkeypatch):
    """Read once at trace time (a compiled program keeps that answer), without breaking the graph."""
    import autoflash
    from autoflash import tracing

    if not modern_era():
        pytest.skip("traced calls are covered on transformers >= 4.56 (AttentionInterface with mask functions); "
                    "see the README's era table")
    torch._dynamo.reset()

    monkeypatch.setenv("FLASH_ATTENTION_DETERMINISTIC", "1")
    tracing.traced_paths.clear()
    model, _ = model_pair(seed=10)
    model.train()
    ids, mask = torch.randint(3, 97, (3, 6)), padding_mask([6, 2, 4], "right")
    out = torch.compile(model.forward, fullgraph=True, backend="eager")(input_ids=ids, attention_mask=mask)
    out.logits.sum().backward()
    traced = [v for k, v in autoflash.status()["traced"].items() if k.startswith("traced ")]
    assert traced and all(" grad deterministic" in v for v in traced), traced
