"""Child processes that die with their parent.

``visar eval sample --num-processes N`` and ``visar train --num-processes N`` start a launcher (``accelerate
launch``, whose torch elastic agent starts the workers, each in a session of its own). Killing the
command (``kill -9``, a closed terminal, a job scheduler's preemption) would leave the launcher and the
workers running as orphans that keep writing into the output folder. Two links prevent it:

* :func:`call_tied` starts the launcher with ``PR_SET_PDEATHSIG = SIGTERM`` (Linux): when the command
  dies, the launcher gets ``SIGTERM``, and torch's agent then stops its workers;
* each worker calls :func:`die_with_parent` first thing: when its parent (the agent) dies, however it
  died, the worker gets ``SIGKILL`` (workers write atomically, so nothing half-written stays).

Elsewhere than Linux, :func:`die_with_parent` watches the parent id from a daemon thread (once a second).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Sequence

_PR_SET_PDEATHSIG = 1


def _prctl_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` through libc; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None, poll_s: float = 1.0) -> None:
    """Make this process receive ``sig`` when its parent process ends.

    Args:
        sig: the signal to receive (``SIGKILL``: certain, no handler can ignore it).
        parent: the parent's pid as read at start-up (default: ``os.getppid()`` now). If the parent is
            already gone when the link is made, the signal is sent at once.
        poll_s: interval of the watchdog thread used where ``prctl`` is unavailable.
    """
    parent = os.getppid() if parent is None else parent
    if not _prctl_pdeathsig(sig):
        def watch() -> None:
            import time

            while os.getppid() == parent:
                time.sleep(poll_s)
            os.kill(os.getpid(), sig)

        threading.Thread(target=watch, name="visar-lifeline", daemon=True).start()
    if os.getppid() != parent:  # the parent ended before the link existed
        os.kill(os.getpid(), sig)


def _preexec_for(parent: int):
    """The ``preexec_fn`` of a child of ``parent``: it runs in the child between fork and exec (the setting
    survives exec). A parent that died before ``prctl`` ran would never send the signal, so the child
    checks its parent after the link exists and ends at once if the parent is already gone."""
    def preexec() -> None:
        _prctl_pdeathsig(signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def call_tied(cmd: Sequence[str], env: dict | None = None) -> int:
    """``subprocess.call(cmd, env=env)`` whose child gets ``SIGTERM`` if this process dies (Linux); on
    Ctrl-C here the child is stopped too. Returns the child's exit status."""
    linux = sys.platform.startswith("linux")
    with subprocess.Popen(list(cmd), env=env, preexec_fn=_preexec_for(os.getpid()) if linux else None) as proc:
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


__all__ = ["die_with_parent", "call_tied"]
