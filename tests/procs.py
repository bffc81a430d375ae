"""Subprocesses for the tests that launch commands: on a timeout the whole process group is killed (an
``accelerate launch`` leaves its workers running if only the launcher is), then the test fails."""

from __future__ import annotations

import os
import signal
import subprocess


def run_group(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)`` in a new session, killed as a group on timeout.

    Raises:
        subprocess.TimeoutExpired: after the group is killed and reaped.
    """
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
