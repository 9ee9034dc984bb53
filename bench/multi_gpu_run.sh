#!/usr/bin/env bash
# Issue 14 on a 4-GPU host (nvidia-h200-x4) or an 8-GPU host (nvidia-h200-x8); carry .whl as in
# bench/device_full.sh. 4 GPUs: (a) P/D PTP2 + DTP2, (b) 2 x PTP1 + DTP2, (c) co-located TP4,
# (d) 2 x co-located TP2 behind a round-robin, at the Nemotron-H-8B and Nemotron-3-Nano-30B-A3B
# shapes, loads 8k/1k and 2k/512, concurrency 8..128. 8 GPUs: PTP4 + DTP4 vs co-located TP8 at
# the 30B-A3B shape. JSON and one Pareto PNG per model and load under $OUT.
. bench/multi_gpu_env.sh multi_gpu_run.log 4
run() {  # model-dir tag configs...
  local model=$1 tag=$2; shift 2
  local cfgs=(); for c in "$@"; do cfgs+=(--config "$c"); done
  for load in "8192 1024" "2048 512"; do
    set -- $load
    echo "=== $tag: in $1 / out $2"
    timeout 5400 python3 bench/pd_vs_colocated.py --model "$model" "${cfgs[@]}" \
        --input-len "$1" --output-len "$2" --concurrency 8 16 32 64 128 --num-requests 256 \
        --warmup 16 --max-model-len 10240 --out "$OUT/${tag}_$1_$2"
  done
}
python3 -m hybridpd.cli demo-model --out /tmp/m30b --preset nemotron-3-nano-30b-a3b --dtype bfloat16 | tail -1
if [ "$NGPU" -ge 8 ]; then
  run /tmp/m30b 30b_8gpu pd:1x4+1x4 colo:1x8
else
  python3 -m hybridpd.cli demo-model --out /tmp/m8b --preset nemotron-h-8b --dtype bfloat16 | tail -1
  for m in 8b 30b; do
    run "/tmp/m$m" "${m}_4gpu" pd:1x2+1x2 pd:2x1+1x2 colo:1x4 colo:2x2
  done
fi
