"""The launcher: `make run`'s demo on the shipped model, and children that never outlive the launcher
(they ask for PDEATHSIG themselves)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from swiftd.launcher import DEMO_SCENE, start_gateway, wait_serving
from swiftd.shapeworld.data import held_out_scenes
from swiftd.shapeworld.render import edge_map
from swiftd.shapeworld.score import score

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


@pytest.mark.slow  # ~30 s: the four services start, one request, stop
def test_make_run_writes_a_picture_of_its_prompt_and_scores_it(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "swiftd.launcher", "demo", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    scene = held_out_scenes(DEMO_SCENE + 1)[DEMO_SCENE]
    assert scene.caption() in done.stdout
    verdict = score(np.asarray(PIL.Image.open(tmp_path / "demo.png").convert("RGB")), scene, edge_map(scene, 64))
    assert verdict.describe(scene) in done.stdout  # what it printed is the scorer's verdict on that file
    # The picture means something: the shapes asked for, where the edges are, in the LoRA's style.
    assert verdict.prompt_adherence == 1.0 and verdict.control_iou >= 0.6 and verdict.style["pastel"], done.stdout


def test_sigusr1_writes_every_threads_stack_and_the_service_serves_on():
    gateway = start_gateway(["127.0.0.1:9"], wait=True)
    try:
        dump = gateway.stacks()
        assert "Current thread" in dump or "Thread 0x" in dump, gateway.log_tail()
        assert 'swiftd/server.py", line' in dump  # the main thread, waiting in serve()
        assert gateway.process.poll() is None
        wait_serving(gateway.address, 10)
    finally:
        gateway.stop()
