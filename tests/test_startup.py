"""The .pth line runs in every Python process: cheap, silent, never raising, off when disabled."""

import sys
from pathlib import Path

import pytest

import autoflash

from _subprocess import autoflash_lines, run_python

HEAVY = ("torch", "transformers", "wrapt", "autoflash.hooks", "autoflash.patches", "autoflash.attention",
         "autoflash.layout", "autoflash.backends", "autoflash.dispatch")
LLAMA = "transformers.models.llama.modeling_llama"
LIST_HEAVY = f"""
    import sys
    heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {HEAVY!r}))
    print(heavy)
"""
PATCHED = f"""
    import {LLAMA}
    import autoflash
    print(autoflash.status()["patched"])
"""


def test_pth_does_not_import_torch_or_transformers():
    result = run_python(LIST_HEAVY)
    assert result.stdout.strip() == "[]"
    assert result.stderr == ""


def test_pth_is_armed_and_patches_on_first_import():
    result = run_python(PATCHED)
    assert result.stdout.strip() == f"['{LLAMA}']"


@pytest.mark.parametrize("value", ["1", "true", "YES", "On"])
def test_disable_switch_registers_nothing_and_patches_nothing(value):
    code = ("import sys\n"
            "print([m for m in sys.modules if m.startswith('autoflash')], [type(f).__name__ for f in sys.meta_path])\n"
            f"import {LLAMA}\n"
            "import autoflash\n"
            "print(autoflash.status()['patched'])\n")
    result = run_python(code, env={"AUTOFLASH_DISABLE": value})
    first, second = result.stdout.strip().splitlines()
    assert first.startswith("[] ") and "_ArmOnTransformersImport" not in first
    assert second == "[]"


def _fake_package(tmp_path, name, body="raise ImportError('simulated: not importable')"):
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text(body + "\n")
    return {"PYTHONPATH": str(tmp_path)}


def test_start_up_survives_a_broken_wrapt(tmp_path):
    env = _fake_package(tmp_path, "wrapt")
    assert run_python("pass", env=env).stderr == ""
    result = run_python(PATCHED, env=env)
    assert result.stdout.strip() == "[]"
    lines = autoflash_lines(result.stderr)
    assert len(lines) == 1 and "could not register its import hook" in lines[0] and "simulated" in lines[0]


@pytest.mark.parametrize("transformers_imported", [True, False])
def test_doctor_tells_the_truth_when_wrapt_is_missing(tmp_path, transformers_imported):
    """The start-up warning sends the user to doctor; doctor must then say it is not active, and why."""
    env = _fake_package(tmp_path, "wrapt")
    result = run_python(f"""
        {'import ' + LLAMA if transformers_imported else ''}
        import autoflash
        from autoflash import doctor
        data = autoflash.status()
        print(data["active"])
        print(data["last_error"])
        print(doctor.report(data))
    """, env=env)
    active, error, *report = result.stdout.splitlines()
    assert active == "False"
    assert "wrapt" in error and "simulated" in error and "pip install wrapt" in error
    assert "  active in this process: no" in report and any("last problem:" in line for line in report)


def _left_behind_pth(tmp_path):
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    (site_dir / "autoflash.pth").write_text(Path(autoflash.__file__).parents[1].joinpath("autoflash.pth").read_text())
    return site_dir


def test_a_pth_left_behind_by_a_removed_package_is_silent(tmp_path):
    """A partial uninstall leaves autoflash.pth but no package: every process must start as if it were absent."""
    site_dir = _left_behind_pth(tmp_path)
    code = f"import site; site.addsitedir({str(site_dir)!r}); import json; print('started')"
    result = run_python(code, args=("-S",), cwd=tmp_path)  # -S: no other site-packages, so no autoflash
    assert run_python("import importlib.util; print(importlib.util.find_spec('autoflash'))", args=("-S",),
                      cwd=tmp_path).stdout.strip() == "None"
    assert (result.stdout.strip(), result.stderr) == ("started", "")


def test_a_pth_next_to_a_broken_package_is_silent(tmp_path):
    """An editable checkout moved away or a half-written package: importing it fails, start-up must not."""
    site_dir = _left_behind_pth(tmp_path)
    (site_dir / "autoflash").mkdir()
    (site_dir / "autoflash" / "__init__.py").write_text("raise RuntimeError('simulated broken package')\n")
    code = f"import site; site.addsitedir({str(site_dir)!r}); print('started')"
    result = run_python(code, args=("-S",), cwd=tmp_path)
    assert (result.stdout.strip(), result.stderr) == ("started", "")


@pytest.mark.parametrize("value", ["garbage", "2"])
def test_a_bad_disable_value_is_named_once_with_the_accepted_values(value):
    result = run_python(PATCHED, env={"AUTOFLASH_DISABLE": value})
    assert result.stdout.strip() == f"['{LLAMA}']"  # not disabled, as said
    lines = autoflash_lines(result.stderr) or [line for line in result.stderr.splitlines() if "AUTOFLASH" in line]
    assert len(lines) == 1, result.stderr
    assert f"AUTOFLASH_DISABLE={value!r}" in lines[0] and "1|true|yes|on" in lines[0] and "0|false|no|off" in lines[0]


def test_start_up_survives_torch_not_importable(tmp_path):
    env = _fake_package(tmp_path, "torch")
    assert run_python("pass", env=env).stderr == ""
    # transformers 5.x imports without torch, 4.x does not: either way autoflash changes nothing
    code = "import transformers; print('imported')"
    enabled = run_python(code, env=env, check=False)
    disabled = run_python(code, env={**env, "AUTOFLASH_DISABLE": "1"}, check=False)
    assert (enabled.returncode, enabled.stdout) == (disabled.returncode, disabled.stdout)
    assert enabled.stderr.strip().splitlines()[-1:] == disabled.stderr.strip().splitlines()[-1:]
    assert autoflash_lines(enabled.stderr) == []


def test_start_up_survives_transformers_not_installed(tmp_path):
    env = _fake_package(tmp_path, "transformers")
    assert run_python("import json", env=env).stderr == ""
    result = run_python("import transformers", env=env, check=False)
    assert "simulated: not importable" in result.stderr  # the user's own error, not ours
    assert autoflash_lines(result.stderr) == []


def test_a_patch_that_raises_leaves_the_model_unpatched_with_one_warning():
    result = run_python(f"""
        import autoflash.patches
        def broken(module, family):
            raise RuntimeError("simulated patch failure")
        for era in autoflash.patches.ERAS:
            era.apply = broken
        import {LLAMA} as llama
        import autoflash, transformers
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1))
        print(autoflash.status()["patched"], model.config._attn_implementation)
    """)
    assert result.stdout.strip() == "[] sdpa"
    lines = autoflash_lines(result.stderr)
    assert len(lines) == 1 and "simulated patch failure" in lines[0] and "runs unpatched" in lines[0]


def test_import_autoflash_patches_at_once_when_llama_is_already_imported():
    """Where the .pth never ran (python -S): importing autoflash afterwards is enough."""
    import site

    import autoflash

    paths = [p for p in sys.path if p] + site.getsitepackages()
    package_root = str(__import__("pathlib").Path(autoflash.__file__).parent.parent)
    result = run_python(f"""
        import sys
        sys.path[:0] = {[package_root] + paths!r}
        import {LLAMA}
        print("autoflash" in sys.modules)
        import autoflash
        print(autoflash.status()["patched"])
    """, args=("-S",))
    assert result.stdout.split() == ["False", f"['{LLAMA}']"]


def test_patching_from_two_threads_at_once_patches_once():
    result = run_python(f"""
        import threading
        import autoflash
        from autoflash import hooks
        errors = []
        def work():
            try:
                import {LLAMA}
                autoflash.enable()
            except BaseException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        # patched twice, the second patch would have recorded autoflash's own objects as originals
        originals = [getattr(getattr(o, "__func__", o), "__module__", "") or "" for _, o in
                     hooks._applied[hooks.WATCHED_MODULES[0]].replaced]
        print(errors, hooks.patched_modules(), any(m.startswith("autoflash") for m in originals))
    """)
    assert result.stdout.strip() == f"[] ['{LLAMA}'] False"
