#!/usr/bin/env bash
# Here, where PyPI can be reached: fetch into .whl/ the wheels that the lent GPU machine
# lacks (its image has torch, pluggy, jinja2, matplotlib, scikit-learn, pytest and more, but
# not these). benchmarks/gpu_session.sh installs them there. .whl/ is ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 torchattacks==3.5.1 captum==0.9.0 pydicom==3.0.2
ls -la .whl
