#!/usr/bin/env bash
# The checks that need a GPU, as one short run (under 10 minutes) on a lent GPU machine (its stock
# python3 holds torch, transformers, pyarrow, pandas, scipy, h5py, numba and pytest; these paths need
# no Ray, MLflow, anndata, s3fs or pydantic, which tests/test_repo.py checks with those blocked),
# most wanted first:
#   the pretraining MFU benchmark (padded against packed, with and without attention dropout, and
#   the budget from free memory), the `gpu` tests (bf16 pretraining learns, packed attention and
#   fine-tuning in bf16, the training budget probe; GPU perturbation and embeddings equal the CPU's;
#   training steps, perturbation, embeddings and predictions queue without the host waiting for
#   the GPU), then the perturbation benchmark's GPU variants.
# Records go to $OUT/results (bring them back into benchmarks/results/ and run report.py).
# Usage there: RANKFORMER_GIT_SHA=<sha> bash benchmarks/gpu_check.sh
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out/results"
export PYTHONPATH=platform:tests:benchmarks PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
export RANKFORMER_BENCH_RESULTS=$out/results RANKFORMER_BENCH_WORK=/tmp/bench_work
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
$py -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)" | tee -a "$out/gpu.txt"
rc=0
timeout 270 $py benchmarks/bench_pretrain_gpu.py 2>&1 | tee "$out/bench_pretrain_gpu.log" || rc=1
timeout 150 $py -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" || rc=1
timeout 120 $py benchmarks/bench_perturb.py --skip-embed --gpu-only --gpu-cells 128 2>&1 | tee "$out/bench_perturb.log" || rc=1
exit $rc
