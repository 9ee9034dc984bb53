#!/usr/bin/env bash
# Run on the lent GPU machine (no registry access): install the carried NIXL wheel from .whl/
# into /tmp/site, put the repo on PYTHONPATH, then run bench/gpu_suite.sh with its log in $OUT.
#   device run:  bash bench/device_run.sh      (carry: .whl)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
export PYTHON=python3
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
set -o pipefail
bash bench/gpu_suite.sh 2>&1 | tee "$OUT/gpu_suite.log"
