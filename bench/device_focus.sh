#!/usr/bin/env bash
# Focused GPU check (carry .whl): CUDA unit/engine tests, one P/D end-to-end case with its
# instance logs, and the 1 -> 1 transfer bench between two GPUs. Logs land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
export UCX_TLS=cuda_ipc,cuda_copy,tcp,cma UCX_NET_DEVICES=lo
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
echo "=== unit + engine tests on CUDA"
timeout 240 python3 -m pytest -q --tb=short -rf --timeout 60 tests/engine tests/kernels tests/model \
    -p no:cacheprovider 2>&1 | tail -60
echo "=== one e2e case (CUDA instances)"
timeout 150 python3 -m pytest -q -x --timeout 120 --basetemp=/tmp/pt tests/e2e \
    -k "test_completions_match_colocated and 1P1D-tiny-first" -p no:cacheprovider 2>&1 | tail -30
for f in /tmp/pt/*/*.log /tmp/pt/*/*/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -40 "$f"; }; done \
    > "$OUT/e2e_logs.txt" 2>&1
tail -60 "$OUT/e2e_logs.txt"
echo "=== transfer bench 1 -> 1, cuda:0 -> cuda:1"
timeout 100 python3 bench/transfer_bench.py --preset nemotron-h-8b --tokens 8192 --p-tp 1 \
    --d-tp 1 --device-p cuda:0 --device-d cuda:1 --repeats 10 --warmup 2 2>&1 | tail -20
