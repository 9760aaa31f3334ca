#!/usr/bin/env bash
# On a machine with a CUDA GPU, in one pass: the GPU tests (tests/test_gpu.py), then the GPU
# benchmarks, which write performance-gpu.md. Results go to $OUT (the device tool's folder)
# or gpu-results/. With the workplace's device tool, run benchmarks/gpu_wheels.sh here
# first and carry .whl; the machine has no network. Tests get 150 s and each of the four
# benchmarks 100 s, so the whole pass fits one 10-minute device command.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# mcaudit itself as the import tree pyproject.toml maps out, without building: the machine's
# setuptools may predate the licence field, and there is nothing to fetch a newer one from.
rm -rf /tmp/mcaudit && mkdir -p /tmp/mcaudit
cp -r audit /tmp/mcaudit/mcaudit && cp -r plugins /tmp/mcaudit/mcaudit/plugins && cp -r reports /tmp/mcaudit/mcaudit/reports
export PYTHONPATH=/tmp/mcaudit${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.txt"
python3 benchmarks/run_all.py --timeout 100 --out "$out/performance-gpu.md" 2>&1 | tee "$out/run_all.txt"
