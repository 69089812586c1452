"""A worker whose device fails (a CUDA error that leaves the process's context unusable) does not
go on answering health checks while failing every request: the call that hit it gets UNAVAILABLE
(callers retry elsewhere), the server drains, and the process exits with EXIT_DEVICE_FAILED so
that an orchestrator starts a new one. Other errors stay one request's INTERNAL."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import pytest
import torch

from swiftd import device
from swiftd.server import EXIT_DEVICE_FAILED

# A service served by swiftd.server.serve, as every worker is, whose RPCs run on `DEVICE`:
# "Fault" faults there (on a GPU an out-of-bounds index: a device-side assert, a real sticky CUDA
# error; on the CPU the error torch raises after one, as no CPU kernel can produce it), "Bug"
# raises an ordinary bug, "Echo" answers.
SERVICE = textwrap.dedent(
    """
    import sys
    import grpc
    import torch
    from swiftd.server import ServerConfig, serve

    DEVICE = sys.argv[1]

    def fault(request, context):
        if DEVICE == "cuda":
            index = torch.tensor([10], device="cuda")
            torch.zeros(2, device="cuda")[index].item()
        raise RuntimeError("CUDA error: an illegal memory access was encountered\\nCUDA kernel errors might be ...")

    def bug(request, context):
        raise ValueError("an ordinary bug")

    def register(server):
        unary = lambda fn: grpc.unary_unary_rpc_method_handler(fn)  # noqa: E731 - bytes in, bytes out
        handlers = {"Fault": unary(fault), "Bug": unary(bug), "Echo": unary(lambda r, c: r)}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Device", handlers)])

    serve("test.Device", ServerConfig(grace_seconds=2.0), register)
    """
)


def test_only_errors_that_break_the_device_count_as_device_failures():
    assert device.failure(RuntimeError("CUDA error: an illegal memory access was encountered")) == (
        "an illegal memory access was encountered"
    )
    assert device.failure(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    assert device.failure(RuntimeError("CUDA error: unspecified launch failure\nCompile with TORCH_USE_CUDA_DSA"))
    assert device.failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None
    assert device.failure(RuntimeError("CUDA error: invalid argument")) is None  # a bad call, not a broken context
    assert device.failure(ValueError("unknown error")) is None  # not a CUDA error at all
    # Cleanup that fails after the device did (an add-on's `fail`, a stream's close) hides nothing,
    # whatever it says of its cause: the device stays broken.
    for suppress in (False, True):
        try:
            try:
                raise RuntimeError("CUDA error: misaligned address")
            except RuntimeError as cuda:
                raise KeyError("cleanup failed") from (None if suppress else cuda)
        except KeyError as exc:
            assert device.failure(exc) == "misaligned address"


@pytest.mark.parametrize(
    "where",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="a real device-side assert needs a GPU"),
        ),
    ],
)
def test_a_worker_whose_device_failed_refuses_the_call_drains_and_exits_for_a_new_process(where):
    process = subprocess.Popen(
        [sys.executable, "-c", SERVICE, where], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("SWIFTD_LISTENING test.Device "), line + process.stderr.read()
        channel = grpc.insecure_channel(line.split()[2])
        call = lambda method: channel.unary_unary(f"/test.Device/{method}")(b"x", timeout=30)  # noqa: E731
        assert call("Echo") == b"x"
        with pytest.raises(grpc.RpcError) as bug:
            call("Bug")
        assert bug.value.code() == grpc.StatusCode.INTERNAL  # one request's failure: the worker serves on
        assert call("Echo") == b"x"
        with pytest.raises(grpc.RpcError) as fault:
            call("Fault")
        assert fault.value.code() == grpc.StatusCode.UNAVAILABLE and "device failed" in fault.value.details()
        assert process.wait(timeout=60) == EXIT_DEVICE_FAILED
        assert "the device failed" in process.stderr.read()
    finally:
        process.kill()
        process.wait()
