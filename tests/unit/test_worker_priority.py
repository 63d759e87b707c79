"""Workers run at normal CPU priority where the process may restore it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no setpriority on this platform")
def test_restore_priority_undoes_rays_niceness():
    code = (
        "import os; os.nice(15); assert os.getpriority(os.PRIO_PROCESS, 0) == 15;"
        "from elastictrain.runtime.worker import restore_priority;"
        "print(restore_priority(), os.getpriority(os.PRIO_PROCESS, 0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    restored, nice = out.stdout.split()
    if os.geteuid() == 0:
        assert (restored, nice) == ("True", "0")
    else:  # without privilege the worker keeps Ray's priority and says so
        assert (restored, nice) == ("False", "15")
