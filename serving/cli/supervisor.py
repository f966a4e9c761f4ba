"""Run `moe-serve up` in a session of its own, so that a signal to the whole process group drains.

systemd (KillMode=mixed), `timeout`, shells and many supervisors send SIGTERM to a process group.
Ray's own processes (GCS, raylet, workers), started by the server, would be in that group too:
they die at once, and the server, asked to drain, finds no Ray left (it hung for a minute, then
failed with "Failed to connect to GCS"). So the command the user started stays a thin supervisor
in the caller's group; the server runs in a child in a new session, with Ray under it. The
supervisor forwards SIGINT, SIGTERM and SIGHUP to the child alone and exits with its status; the
child drains exactly as it does for a signal sent to it.

If the supervisor is killed outright (SIGKILL), the child gets SIGTERM from the kernel (Linux's
parent-death signal) and drains too: no server outlives its supervisor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

CHILD_ENV = "MOE_SERVE_SUPERVISED"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def supervised() -> bool:
    """Whether this process is the child of a supervisor."""
    return CHILD_ENV in os.environ


def supervise(argv: Sequence[str]) -> int:
    """Run `python -m serving.cli ARGV` in a new session; forward signals; return its status."""
    env = dict(os.environ, **{CHILD_ENV: str(os.getpid())})
    child = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", *argv], env=env, start_new_session=True
    )

    def forward(signum: int, _frame) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:  # already gone: wait() returns at once
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = child.wait()  # handlers run while waiting (PEP 475 retries the wait)
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def die_with_supervisor() -> None:
    """In the child: ask the kernel for SIGTERM when the supervisor dies (Linux only); stop at
    once if it is already gone (nothing has started yet)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if str(os.getppid()) != os.environ.get(CHILD_ENV):
        raise SystemExit("moe-serve up: its supervisor is gone; not starting")
