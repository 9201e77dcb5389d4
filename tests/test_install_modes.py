"""A regular install, an editable install and a wheel each put autoflash.pth where Python runs it.

Each mode gets one fresh virtual environment for the whole module. It borrows torch,
transformers and wrapt from the environment running the tests through a plain path
line (a path line adds a directory to sys.path without processing that directory's own
.pth files), so the only autoflash.pth the new interpreter processes is the one the
install under test put there.
"""

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

from _subprocess import run_python

REPO = Path(__file__).resolve().parent.parent
LLAMA = "transformers.models.llama.modeling_llama"


def _dependency_dirs():
    import torch
    import transformers
    import wrapt

    dirs = {str(Path(m.__file__).resolve().parent.parent) for m in (torch, transformers, wrapt)}
    return sorted(dirs)


def _pip(python, *args, cwd=None):
    subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True, cwd=cwd,
                   capture_output=True, text=True, timeout=600)


def _site_packages(python):
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module", params=["regular", "editable", "wheel"])
def installed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"venv-{request.param}")
    venv.EnvBuilder(with_pip=True).create(root / "env")
    python = str(root / "env" / ("Scripts" if os.name == "nt" else "bin") / "python")
    (_site_packages(python) / "_borrowed_dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    if request.param == "regular":
        _pip(python, "install", str(REPO))
    elif request.param == "editable":
        _pip(python, "install", "-e", str(REPO))
    else:
        wheels = root / "wheels"
        _pip(python, "wheel", "--no-deps", "-w", str(wheels), str(REPO))
        (wheel,) = wheels.glob("autoflash-*.whl")
        _pip(python, "install", str(wheel))
    return request.param, python


def test_startup_files_land_at_the_root_of_site_packages(installed):
    _, python = installed
    site_packages = _site_packages(python)
    assert (site_packages / "autoflash.pth").read_text() == (REPO / "autoflash.pth").read_text()
    assert (site_packages / "autoflash.start").read_text() == (REPO / "autoflash.start").read_text()


def test_importing_the_llama_module_applies_the_patch(installed):
    mode, python = installed
    result = run_python(f"""
        import {LLAMA}
        import autoflash, json
        print(json.dumps([autoflash.__file__, autoflash.status()["patched"]]))
    """, python=python)
    location, patched = json.loads(result.stdout)
    assert patched == [LLAMA]
    inside = Path(location).resolve().is_relative_to(REPO) if mode == "editable" else \
        Path(location).resolve().is_relative_to(_site_packages(python).resolve())
    assert inside, f"{mode} install imported autoflash from {location}"


def test_plain_start_imports_nothing_heavy(installed):
    _, python = installed
    result = run_python("""
        import sys
        heavy = ("torch", "transformers", "wrapt", "autoflash.hooks", "autoflash.attention", "autoflash.backends")
        print(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy)))
    """, python=python)
    assert result.stdout.strip() == "[]" and result.stderr == ""


def test_console_script_reports_the_installed_pth(installed):
    _, python = installed
    script = Path(python).parent / "autoflash"
    out = subprocess.run([str(script), "doctor", "--json"], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("AUTOFLASH_")})
    data = json.loads(out.stdout)
    assert data["startup"]["will_run"] is True
    assert str(_site_packages(python) / "autoflash.pth") in data["startup"]["files"]



def test_ci_runs_the_readmes_own_commands():
    """CI installs and tests exactly as the README tells a newcomer: every command .ci/run executes is a line
    of the README (a README that drifts from what CI proves fails here)."""
    readme = (REPO / "README.md").read_text()
    commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "rm ", "#!"))]
    assert commands, "no command found in .ci/run"
    for command in commands:
        assert command in readme, f"{command!r} is run by CI but not written in README.md"
