"""Run Python in a fresh interpreter: start-up behaviour can only be seen from a new process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SWITCHES = ("AUTOFLASH_DISABLE", "AUTOFLASH_BACKEND", "AUTOFLASH_LOG")


def run_python(code: str, *, python: str = sys.executable, env: dict | None = None, args=(), check=True,
               timeout=300, cwd=None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in SWITCHES and k != "PYTHONPATH"}
    environment.update(env or {})
    result = subprocess.run([python, *args, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=environment, timeout=timeout, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def autoflash_lines(stderr: str):
    return [line for line in stderr.splitlines() if "autoflash" in line]
