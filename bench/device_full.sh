#!/usr/bin/env bash
# Whole suite on the GPU machine (carry .whl): unit/engine tests in parallel (xdist), then the
# end-to-end tests (CUDA instances), then the transfer bench for TP 1->2 and 2->1.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
export UCX_TLS=cuda_ipc,cuda_copy,tcp,cma UCX_NET_DEVICES=lo
echo "=== suite without e2e, on CUDA where tests are device-parametrized"
timeout 200 python3 -m pytest -q -n 8 --tb=line -rfs --timeout 120 --ignore=tests/e2e \
    -p no:cacheprovider 2>&1 | tail -25
echo "=== e2e (instances on CUDA)"
timeout 260 python3 -m pytest -q --tb=line -rf --timeout 120 tests/e2e -p no:cacheprovider \
    2>&1 | tail -25
for tp in "1 2" "2 1"; do
    set -- $tp
    echo "=== transfer bench P_TP $1 -> D_TP $2, cuda:0 -> cuda:1"
    timeout 60 python3 bench/transfer_bench.py --preset nemotron-h-8b --tokens 8192 --p-tp "$1" \
        --d-tp "$2" --device-p cuda:0 --device-d cuda:1 --repeats 10 --warmup 2 2>&1 | tail -7
done
