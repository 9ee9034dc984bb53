#!/usr/bin/env bash
# GPU machine suite: (a) the test suite on CUDA (not slow), (b) the NIXL transfer bench between
# two GPUs (cuda:0 -> cuda:1) when there are two, else cuda:0 -> cuda:0. Prints everything;
# exits non-zero if any part failed. Run from the repository root:  bash bench/gpu_suite.sh
# PYTHON overrides the interpreter (default: python). Extra bench args: TRANSFER_ARGS="...".
set -u
PY="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export UCX_TLS="${UCX_TLS:-cuda_ipc,cuda_copy,tcp,cma}"
export UCX_NET_DEVICES="${UCX_NET_DEVICES:-lo}"
status=0

echo "=== machine"
date -u
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 || true
nvidia-smi topo -m 2>&1 | head -20 || true
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(" ", i, torch.cuda.get_device_name(i))
for pkg in ("nixl", "nixl_cu13", "nixl_cu12"):
    try:
        __import__(pkg)
        print("NIXL package:", pkg)
        break
    except ImportError:
        pass
else:
    print("NIXL: not installed")
PYEOF
echo "UCX_TLS=$UCX_TLS UCX_NET_DEVICES=$UCX_NET_DEVICES"

echo "=== (a) test suite on CUDA: pytest -q -m 'not slow'"
"$PY" -m pytest -q -m "not slow" || status=1

echo "=== (b) NIXL transfer bench"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then DEV_D=cuda:1; else DEV_D=cuda:0; fi
echo "P on cuda:0, D on $DEV_D ($NGPU GPUs)"
for tp in "1 1" "1 2" "2 1"; do
    set -- $tp
    echo "--- nemotron-h-8b, 8192 tokens, P_TP $1 -> D_TP $2"
    "$PY" bench/transfer_bench.py --preset nemotron-h-8b --tokens 8192 --p-tp "$1" --d-tp "$2" \
        --device-p cuda:0 --device-d "$DEV_D" --repeats 10 --warmup 2 ${TRANSFER_ARGS:-} \
        || status=1
done
echo "=== done: status $status"
exit $status
