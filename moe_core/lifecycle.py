"""Process lifecycle shared by the services.

`moe-serve up` sets MOE_PARENT_PID for the services it starts; each service then asks the kernel to
send it SIGTERM when that parent dies, so a killed launcher leaves no orphans. This runs inside the
service, after exec: doing it in a `preexec_fn` would run Python between fork and exec in a parent
that may hold gRPC threads, and gRPC's fork handlers can abort the child there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PARENT_ENV = "MOE_PARENT_PID"


def die_with_parent() -> None:
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    if os.getppid() != int(parent):  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
