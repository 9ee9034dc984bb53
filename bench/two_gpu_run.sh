#!/usr/bin/env bash
# Issue 13 on a two-GPU host (device kind nvidia-h200-x2; carry .whl with the nixl-cu13 cp312
# wheel, see bench/device_full.sh): topology, UCX transports, torch peer copy, the transfer bench
# at 8B and 30B-A3B shapes x 1k/8k/32k tokens x TP 1->1, 1->2, 2->1 across the two GPUs, then
# 1P1D (P on GPU 0, D on GPU 1) vs two co-located instances under the same `hybridpd bench` loads
# (8k/1k and 1k/256, concurrency 1..64), JSON + Pareto PNGs under $OUT.
. bench/multi_gpu_env.sh two_gpu_run.log 2
echo "=== UCX transports chosen for one READ cuda:0 -> cuda:1 (rma lanes)"
UCX_LOG_LEVEL=info timeout 120 python3 bench/transfer_bench.py --preset nemotron-h-8b \
    --num-layers 4 --tokens 1024 --device-p cuda:0 --device-d cuda:1 --repeats 1 --warmup 0 \
    2>&1 | grep -E "rma|lane|transport" | sort | uniq -c | head -20
for preset in nemotron-h-8b nemotron-3-nano-30b-a3b; do
  for tokens in 1024 8192 32768; do
    for tp in "1 1" "1 2" "2 1"; do
      set -- $tp
      echo "=== transfer $preset $tokens tokens P_TP $1 -> D_TP $2 (includes the torch peer copy)"
      timeout 180 python3 bench/transfer_bench.py --preset "$preset" --tokens "$tokens" \
          --p-tp "$1" --d-tp "$2" --device-p cuda:0 --device-d cuda:1 --repeats 10 --warmup 2 \
          2>&1 | tail -7
    done
  done
done
echo "=== 8B-shape checkpoint"
time python3 -m hybridpd.cli demo-model --out /tmp/m8b --preset nemotron-h-8b --dtype bfloat16 | tail -1
for load in "8192 1024" "1024 256"; do
  set -- $load
  echo "=== serving: 1P1D vs 2x co-located, in $1 / out $2"
  timeout 3000 python3 bench/pd_vs_colocated.py --model /tmp/m8b --config pd:1x1+1x1 \
      --config colo:2x1 --input-len "$1" --output-len "$2" --concurrency 1 4 16 64 \
      --num-requests 128 --warmup 8 --max-model-len 10240 --out "$OUT/serve_$1_$2"
done
