#!/bin/bash
# What a lent GPU machine runs, prepared (docs/gpu.md). Here first: ./bench/gpu_wheels.sh. Then, with
# the device tool: run(command="bench/gpu_session.sh serve", carry=[".whl"], timeout_s=560), and
# if time is left, "bench/gpu_session.sh checks"; or both at once, run(command="bench/gpu_session.sh
# lease", carry=[".whl"], timeout_s=580). Results land in $OUT (come back with the reply).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
nvidia-smi -L > "$OUT/device.txt" 2>&1
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__)" >> "$OUT/device.txt" 2>&1
# Shared-memory rings live in /dev/shm: two SDXL slots take 215 MB, and a container's default is
# 64 MiB. Too small: the rings go to a directory of /tmp instead (both workers inherit this).
df -h /dev/shm >> "$OUT/device.txt" 2>&1
if [ "$(df --output=avail -k /dev/shm 2> /dev/null | tail -1)" -lt 2000000 ] 2> /dev/null; then
    export SWIFTD_SHM_DIR=/tmp/swiftd-shm && mkdir -p "$SWIFTD_SHM_DIR"
    echo "/dev/shm under 2 GB: SWIFTD_SHM_DIR=$SWIFTD_SHM_DIR" >> "$OUT/device.txt"
fi
case "$1" in
serve)  # the suite against Diffusers: SD1.5 512² first, then SDXL 1024², as far as 400 s go
    timeout 540 python3 -m bench.gpu_serve --zoo /tmp/zoo --out "$OUT/gpu_serve.json" --budget-s 400 \
        2>&1 | tee "$OUT/gpu_serve.log" | tail -40
    ;;
checks)  # CUDA IPC equality over real workers and its handoff alone, then the AOTInductor diagnosis
    timeout 200 python3 -m pytest -q -x tests/test_residual_transport.py -k cuda 2>&1 | tee "$OUT/cuda_ipc.log" | tail -15
    timeout 60 python3 -m bench.ring_handoff --device cuda --out "$OUT/ring_handoff.json" 2>&1 | tail -3
    timeout 300 python3 -m bench.gpu_check --stages eager aoti --out "$OUT/aoti.json" 2>&1 | tee "$OUT/aoti.log" | tail -25
    ;;
lease)  # everything of one lease in one call of at most ~9.5 minutes: the checks in the
    # background on CPU cores of their own (the AOTInductor builds are CPU-bound), the serving
    # benchmark in front, SDXL first (the target), SD1.5 as far as the budget goes
    pin() { if command -v taskset > /dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
    cores=$(nproc)
    front=0-$((cores / 2 - 1))
    ( pin $((cores / 2))-$((cores / 2 + cores / 4 - 1)) timeout 520 python3 -m bench.gpu_check \
        --stages eager aoti --aoti-weights copy --out "$OUT/aoti_copy.json" > "$OUT/aoti_copy.log" 2>&1 ) &
    ( pin $((cores / 2 + cores / 4))-$((cores - 1)) timeout 520 python3 -m bench.gpu_check \
        --stages eager aoti --aoti-weights live --out "$OUT/aoti_live.json" > "$OUT/aoti_live.log" 2>&1 ) &
    ( pin $front timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_residual_transport.py \
        -k cuda > "$OUT/cuda_ipc.log" 2>&1 ) &
    pin $front timeout 530 python3 -m bench.gpu_serve --zoo /tmp/zoo --families sdxl sd15 \
        --out "$OUT/gpu_serve.json" --budget-s 380 > "$OUT/gpu_serve.log" 2>&1
    echo "gpu_serve: exit $?" >> "$OUT/device.txt"
    wait
    python3 -m bench.gpu_serve --out "$OUT/gpu_serve.json" --table
    tail -n 5 "$OUT/cuda_ipc.log" "$OUT/aoti_copy.log" "$OUT/aoti_live.log"
    ;;
compiled)  # the suite on the graphs backend (torch.compile, CUDA graphs): the UNet worker builds
    # its artifacts at start while the CLI builds the ControlNet workers'; against Diffusers in the
    # same run, spread layout. `compiled` alone: SD1.5 (fits in 4 minutes); `compiled sdxl`: about
    # 9 minutes (zoo ~75 s, Diffusers ~95 s, builds ~2 min, requests), run(timeout_s=590)
    family=${2:-sd15}
    limit=235 budget=150
    [ "$family" = sdxl ] && limit=520 budget=440
    # Beside it on CPU cores of their own, CUDA IPC over real workers (tiny model; ~35 s): the
    # same latents as inline bytes (and over the shared-memory ring with GPU tensors), with each
    # step's sample through the ring as well; the step clock's GPU times and run-ahead bound; a
    # worker whose GPU hits a device-side assert exiting for a new process.
    # Each file on its own (the short ones first), so that one failing or hanging leaves the others' results.
    upper=$(($(nproc) / 2))-$(($(nproc) - 1))
    ( if command -v taskset > /dev/null; then pin="taskset -c $upper"; else pin=; fi
      for file in tests/test_step_clock.py tests/test_device_failure.py tests/test_residual_transport.py; do
          $pin timeout 150 python3 -m pytest -q -p no:cacheprovider "$file" -k "cuda or gpu" 2>&1
      done > "$OUT/cuda_ipc.log" ) &
    # The ring's handoff alone first (no model; seconds): the target ≤ 1 ms per step, isolated;
    # then GPU tensors through the shared-memory ring (a GPU the UNet worker cannot map).
    timeout 60 python3 -m bench.ring_handoff --device cuda --out "$OUT/ring_handoff.json" > "$OUT/ring_handoff.log" 2>&1
    timeout 40 python3 -m bench.ring_handoff --device cuda --transport shared_memory --family sdxl \
        --out "$OUT/ring_handoff_shm.json" > "$OUT/ring_handoff_shm.log" 2>&1
    timeout $limit python3 -m bench.gpu_serve --zoo /tmp/zoo --families "$family" --layouts spread --compiled \
        --out "$OUT/gpu_serve_compiled.json" --budget-s $budget > "$OUT/gpu_serve_compiled.log" 2>&1
    echo "gpu_serve --compiled ($family): exit $?" >> "$OUT/device.txt"
    wait
    python3 -m bench.gpu_serve --out "$OUT/gpu_serve_compiled.json" --table
    grep -E "passed|failed|error|skipped" "$OUT/cuda_ipc.log" | tail -n 6
    tail -n 25 "$OUT/gpu_serve_compiled.log"
    ;;
*)
    echo "usage: bench/gpu_session.sh serve|checks|lease|compiled [sd15|sdxl]" >&2
    exit 2
    ;;
esac
