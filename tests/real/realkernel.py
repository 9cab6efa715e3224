"""Whether real-kernel tests can run here, and what to do when they cannot.

Off CI they skip where root or BPF is missing; under CI (CI=true) they fail instead, so a CI run
can never pass with them silently skipped.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def real_kernel_problem() -> Optional[str]:
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/sys/kernel/btf/vmlinux") and not os.path.isdir("/sys/kernel/tracing"):
        return "no BTF and no tracefs"
    try:
        from rsttrace.capture.bccload import import_bcc

        import_bcc()
    except Exception as e:  # any failure to get bcc means: cannot trace here
        return "bcc unavailable: %s" % e
    return None


def require_real_kernel() -> None:
    problem = real_kernel_problem()
    if problem is None:
        return
    if IN_CI:
        pytest.fail("real-kernel test cannot run in CI: %s (CI must run these, never skip them)" % problem)
    pytest.skip("real-kernel test needs root and BPF: %s" % problem)
