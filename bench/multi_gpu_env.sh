# Sourced by the multi-GPU run scripts: `. bench/multi_gpu_env.sh LOGNAME MIN_GPUS`. Logs to
# $OUT/LOGNAME, installs carried wheels (.whl/), sets the UCX / NCCL environment of one GPU host
# (NVLink multicast off, as the device machines require), prints the GPUs and their topology,
# and sets NGPU (exits 2 with fewer than MIN_GPUS).
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
exec > >(tee "$OUT/$1") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 HYBRIDPD_CACHE=/tmp/hc
export UCX_TLS=cuda_ipc,cuda_copy,tcp,cma UCX_NET_DEVICES=lo
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# the Nemotron-H-8B preset says 8192 positions; its 8k/1k loads need 10240 (NoPE + Mamba: no
# positional limit), which serve refuses unless allowed (it used to cut it silently)
export HYBRIDPD_ALLOW_LONG_MAX_MODEL_LEN=1
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "=== GPUs: $NGPU"; nvidia-smi -L; nvidia-smi topo -m
[ "$NGPU" -ge "$2" ] || { echo "needs at least $2 GPUs (found $NGPU)"; exit 2; }
