#!/usr/bin/env bash
# The CPU perturbation benchmark for `geneformer-v1` on another machine's CPU, e.g. the lent GPU
# machine's host with CUDA hidden (its stock python3 holds what this path needs, as for gpu_check.sh).
# Whether the 10x target is reachable on a CPU depends on its bfloat16 units: the records carry
# `cpu_bf16` (amx, avx512 or none) and the kernel floor (see bench_perturb.kernel_floor).
# Records go to $OUT/results (bring them back into benchmarks/results/ and run report.py).
# Usage there: RANKFORMER_GIT_SHA=<sha> bash benchmarks/cpu_check.sh
set -uo pipefail
out=${OUT:-/tmp/cpu_check}
mkdir -p "$out/results"
export PYTHONPATH=platform:tests:benchmarks PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
export CUDA_VISIBLE_DEVICES="" RANKFORMER_BENCH_RESULTS=$out/results RANKFORMER_BENCH_WORK=/tmp/bench_work_cpu
py=${PYTHON:-python3}
{ grep -m1 "model name" /proc/cpuinfo; nproc; grep -m1 -o -w -E "amx_bf16|avx512_bf16" /proc/cpuinfo; } | tee "$out/cpu.txt"
timeout "${CPU_CHECK_TIMEOUT_S:-420}" $py benchmarks/bench_perturb.py --skip-embed --presets geneformer-v1 \
    2>&1 | tee "$out/bench_perturb_cpu.log"
