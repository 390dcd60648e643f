"""Run a child process without root's power to write past permission bits, so a test of a read-only directory
means the same as root (CI here runs as root) as for any user."""

from __future__ import annotations

import ctypes
import os


def _drop_dac_override() -> None:
    """In the child, before it runs Python: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding set."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def as_a_plain_user():
    """``preexec_fn`` for subprocess.run: drops root's override where the tests run as root, else nothing."""
    return _drop_dac_override if os.geteuid() == 0 else None
