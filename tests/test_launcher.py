"""The launcher's children never outlive the launcher (they ask for PDEATHSIG themselves)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LAUNCHER = """
import sys, time
from swiftd.launcher import start_gateway
gateway = start_gateway(["127.0.0.1:9"], wait=True)  # no torch in it: the quickest service to start
print(gateway.process.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split(")")[-1].split()[0] != "Z"


def _threads(pid: int) -> str:
    """Where each thread of a process that would not exit waits (for the failure message)."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            name = (task / "comm").read_text().strip()
            wchan = (task / "wchan").read_text().strip()
            state = (task / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        out.append(f"{name}[{state}:{wchan}]")
    return ", ".join(out)


def test_a_service_stops_when_its_launcher_is_killed():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(launcher.stdout.readline())
        assert _alive(child)
        launcher.send_signal(signal.SIGKILL)  # no atexit, no cleanup: only PDEATHSIG reaches the child
        launcher.wait(timeout=10)
        # SIGTERM drains (grace 10 s by default, nothing in flight here); 60 s leaves room for a
        # machine busy with the rest of the suite.
        deadline = time.monotonic() + 60
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), f"the service outlived its launcher: {_threads(child)}"
    finally:
        launcher.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
