#!/usr/bin/env bash
# GPU run for issue 7's decode half (one H200): kernel/graph correctness tests, then
# `hybridpd bench engine` on the Nemotron-H-8B shape with before/after variants in one run.
#   device run:  cd .gpuwt-decode && export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 && bash bench/gpu_decode.sh [PART]
# PART: tests | tests2 | moe | b8 | b30 | b30g | hf (default: tests b8). Logs and JSON land in $OUT.
set -u
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
set -o pipefail
parts="${*:-tests b8}"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
python3 - <<'PY'
import torch, triton, transformers, torch.nn.functional as F
print("torch", torch.__version__, "triton", triton.__version__, "transformers",
      transformers.__version__, torch.cuda.get_device_name())
for dt in (torch.bfloat16, torch.float32):
    try:
        a = torch.randn(10, 64, device="cuda", dtype=dt)
        b = torch.randn(4, 64, 32, device="cuda", dtype=dt)
        offs = torch.tensor([3, 3, 7, 10], device="cuda", dtype=torch.int32)
        F.grouped_mm(a, b, offs=offs)
        print("grouped_mm", dt, "ok")
    except Exception as e:  # noqa: BLE001
        print("grouped_mm", dt, "FAILS:", str(e).splitlines()[0])
PY
for part in $parts; do
  case $part in
    tests)
      timeout 170 python3 -m pytest -p no:cacheprovider -q -rs --timeout 120 tests/kernels \
        tests/model/test_moe_grouped.py tests/engine/test_decode_graphs.py 2>&1 \
        | tee "$OUT/pytest.log" | tail -25 ;;
    b8)
      timeout 220 python3 -m hybridpd.bench.engine_bench --preset nemotron-h-8b --device cuda \
        --batch-sizes 1 8 32 64 --context-len 1024 --prefill-lens 8000 --decode-steps 20 \
        --prefill-iters 2 --variants reference+eager auto+eager auto+graphs \
        --json "$OUT/bench_8b.json" 2>&1 | tee "$OUT/bench_8b.log" ;;
    tests2)
      timeout 150 python3 -m pytest -p no:cacheprovider -q -rs --timeout 120 \
        tests/kernels/test_triton_norms.py tests/kernels/test_kernel_seam.py \
        tests/engine/test_decode_graphs.py 2>&1 | tee "$OUT/pytest2.log" | tail -15 ;;
    moe)
      timeout 120 python3 -m pytest -p no:cacheprovider -q -rs --timeout 100 \
        tests/kernels/test_triton_moe.py tests/engine/test_decode_graphs.py 2>&1 \
        | tee "$OUT/pytest3.log" | tail -8
      timeout 120 python3 bench/moe_decode_micro.py 2>&1 | tee "$OUT/moe_micro.log" ;;
    b30g)
      timeout 150 python3 -m hybridpd.bench.engine_bench --preset nemotron-3-nano-30b-a3b \
        --device cuda --batch-sizes 1 8 32 64 --context-len 1024 --prefill-lens \
        --decode-steps 20 --variants auto+graphs \
        --json "$OUT/bench_30b_graphs.json" 2>&1 | tee "$OUT/bench_30b_graphs.log" ;;
    b30)
      timeout 200 python3 -m hybridpd.bench.engine_bench --preset nemotron-3-nano-30b-a3b \
        --device cuda --batch-sizes 1 8 32 64 --context-len 1024 --prefill-lens 8000 \
        --decode-steps 20 --prefill-iters 2 --variants auto+eager auto+graphs \
        --json "$OUT/bench_30b.json" 2>&1 | tee "$OUT/bench_30b.log" ;;
    hf)
      timeout 220 python3 -m hybridpd.bench.engine_bench --preset nemotron-h-8b --device cuda \
        --batch-sizes 1 32 --context-len 128 --prefill-lens 2000 --decode-steps 10 \
        --prefill-iters 2 --variants auto+graphs --compare-transformers \
        --json "$OUT/bench_8b_hf.json" 2>&1 | tee "$OUT/bench_8b_hf.log" ;;
  esac
done
