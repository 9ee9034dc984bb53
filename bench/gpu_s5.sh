#!/usr/bin/env bash
# One H200 call (carry .whl): GPU tests of the merged tree, one P/D case on CUDA instances,
# decode profiles, and `hybridpd bench engine` figures. Logs and JSON land in $OUT.
#   bash bench/gpu_s5.sh PART...   PART: tests tlite ipc e2elog e2e prof8 prof30 moe b8 ws hf b30
. bench/multi_gpu_env.sh gpu_s5.log 1  # wheels, PYTHONPATH, UCX, the GPU list; log in $OUT
set -o pipefail
EB="python3 -m hybridpd.bench.engine_bench --device cuda"
for part in "$@"; do
  echo "=== $part $(date -u +%T)"
  case $part in
    tests)
      timeout 200 python3 -m pytest -p no:cacheprovider -q -n 8 -rfs --timeout 150 --tb=short \
        tests/kernels tests/model tests/engine tests/disagg 2>&1 | tee "$OUT/pytest.log" \
        | tail -30 ;;
    tlite)
      timeout 150 python3 -m pytest -p no:cacheprovider -q -n 8 -rfs --timeout 150 --tb=short \
        tests/kernels tests/model tests/engine/test_fork.py tests/engine/test_decode_graphs.py \
        tests/engine/test_engine.py tests/engine/test_engine_reference.py 2>&1 \
        | tee "$OUT/pytest_lite.log" | tail -12 ;;
    ws)  # cuBLAS without workspace (no split-K with a separate reduction) vs default, 8B
      for env in "" "CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0"; do
        echo "--- env: ${env:-default}"
        env $env timeout 120 $EB --preset nemotron-h-8b --batch-sizes 1 8 --context-len 1024 \
          --prefill-lens 8000 --decode-steps 20 --prefill-iters 2 --variants auto+graphs 2>&1 \
          | grep -E "decode|prefill|device"
      done ;;
    ipc)  # the same-GPU transport: a real export mapped by a second process, then the bench
      timeout 120 python3 -m pytest -p no:cacheprovider -q -rfs --timeout 100 \
        tests/disagg/test_cuda_ipc.py 2>&1 | tail -4
      timeout 150 python3 bench/transfer_bench.py --preset nemotron-h-8b --tokens 8192 \
        --device-p cuda:0 --device-d cuda:0 --repeats 10 --warmup 2 2>&1 | tail -9 ;;
    e2elog)  # one P/D case on CUDA instances; their handshake lines (transport, GB/s)
      timeout 150 python3 -m pytest -p no:cacheprovider -q -x --timeout 120 --basetemp=/tmp/pt \
        tests/e2e/test_pd_equivalence.py -k "1P1D" 2>&1 | tail -3
      grep -rh "kv handshake\|slow\|IPC" /tmp/pt 2>/dev/null | sort | uniq -c | head -12 ;;
    e2e)
      timeout 150 python3 -m pytest -p no:cacheprovider -q -x --timeout 120 --tb=short \
        tests/e2e/test_pd_equivalence.py -k "1P1D" 2>&1 | tee "$OUT/e2e.log" | tail -15 ;;
    prof8)
      timeout 150 python3 bench/decode_profile.py --preset nemotron-h-8b --batch 1 64 \
        --context-len 1024 --json "$OUT/prof8.json" 2>&1 | tee "$OUT/prof8.log" ;;
    prof30)
      timeout 150 python3 bench/decode_profile.py --preset nemotron-3-nano-30b-a3b --batch 1 \
        --context-len 1024 --top 35 --json "$OUT/prof30.json" 2>&1 | tee "$OUT/prof30.log" ;;
    moe)
      timeout 200 python3 bench/moe_decode_micro.py --sweep 2>&1 | tee "$OUT/moe_micro.log" ;;
    b8)
      timeout 200 $EB --preset nemotron-h-8b --batch-sizes 1 8 32 64 --context-len 1024 \
        --prefill-lens 8000 --decode-steps 20 --prefill-iters 3 --variants auto+graphs \
        --json "$OUT/bench_8b.json" 2>&1 | tee "$OUT/bench_8b.log" ;;
    hf)
      timeout 240 $EB --preset nemotron-h-8b --batch-sizes 1 8 32 64 --context-len 128 \
        --prefill-lens 2000 --decode-steps 10 --prefill-iters 2 --variants auto+graphs \
        --compare-transformers --json "$OUT/bench_8b_hf.json" 2>&1 | tee "$OUT/bench_8b_hf.log" ;;
    b30)
      timeout 200 $EB --preset nemotron-3-nano-30b-a3b --batch-sizes 1 8 32 64 \
        --context-len 1024 --prefill-lens 8000 --decode-steps 20 --prefill-iters 3 \
        --variants auto+graphs --json "$OUT/bench_30b.json" 2>&1 | tee "$OUT/bench_30b.log" ;;
  esac
done
echo "=== done $(date -u +%T)"
