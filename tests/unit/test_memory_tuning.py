"""The researcher's malloc tuning: applied once on glibc, left alone when the operator says so."""

from __future__ import annotations

import subprocess
import sys


def run(code: str, **env: str) -> str:
    import os

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env}, check=True)
    return out.stdout.strip()


def test_tuning_is_applied_once_and_can_be_turned_off():
    code = ("from fedlab.researcher.memory_tuning import tune_for_large_buffers as t; "
            "print(t(), t())")
    import platform

    glibc = platform.libc_ver()[0] == "glibc"
    assert run(code) == ("True True" if glibc else "False False")  # elsewhere there is nothing to tune
    assert run(code, FEDLAB_MALLOC_TUNE="0") == "False False"
