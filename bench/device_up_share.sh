#!/usr/bin/env bash
# On one lent GPU (carry: .whl with aiohttp + nixl-cu13 cp312 wheels): `hybridpd up --gpus 0
# --share-gpus` with a 10-layer Nemotron-H-8B-shape random model, `hybridpd bench` through it,
# one long request's kv_transfer_stats, D's calibration line / warning / metrics, the pools'
# sizes from the memory share, and SIGKILL of up leaving no child. Logs to $OUT.
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" HYBRIDPD_CACHE=/tmp/hc OMP_NUM_THREADS=4 HYBRIDPD_ALLOW_LONG_MAX_MODEL_LEN=1  # --max-model-len 9000 > 8192
get() { python3 -c "import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],timeout=10).read().decode())" "$1"; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv
python3 -c "import torch, aiohttp; print('torch', torch.__version__, torch.cuda.device_count())"
echo "=== refusal: two GPUs asked on a one-GPU machine"
python3 -m hybridpd.cli up --gpus 0,1; echo "rc=$?"
python3 -m hybridpd.cli up --share-gpus; echo "rc=$?"
echo "=== model"
time python3 -m hybridpd.cli demo-model --out /tmp/m --preset nemotron-h-8b --num-layers 10 \
    --dtype bfloat16 | tail -2
echo "=== up"
python3 -m hybridpd.cli up --model /tmp/m --gpus 0 --share-gpus --gpu-memory-utilization 0.4 \
    --port 0 --log-dir /tmp/logs --max-model-len 9000 --max-num-batched-tokens 8192 \
    --served-model-name h8b > /tmp/up.out 2>&1 &
UP=$!
for i in $(seq 150); do grep -q "^  proxy" /tmp/up.out && break; sleep 1; done
cat /tmp/up.out
URL=$(awk '/^  proxy/{print $2}' /tmp/up.out)
D=$(awk '/^  decode0/{print $2}' /tmp/up.out); P=$(awk '/^  prefill0/{print $2}' /tmp/up.out)
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
for u in $P $D; do get $u/v1/pool; done
echo "=== one 8k-token request"
python3 - "$URL" <<'PY'
import json, sys, urllib.request
body = {"model": "h8b", "prompt": [(7 * i) % 1000 + 3 for i in range(8160)], "max_tokens": 8,
        "temperature": 0, "ignore_eos": True, "return_token_ids": True}
req = urllib.request.Request(sys.argv[1] + "/v1/completions", json.dumps(body).encode(),
                             {"content-type": "application/json"})
out = json.loads(urllib.request.urlopen(req, timeout=300).read())
print(json.dumps(out.get("kv_transfer_stats"), indent=1)); print(out.get("pd_timing"))
PY
echo "=== bench"
python3 -m hybridpd.cli bench --url "$URL" --num-requests 12 --concurrency 1 4 \
    --input-len-range 512 1024 --output-len 32 --warmup 2 --num-gpus 1 --label "1P1D-shared" \
    --json "$OUT/bench.json" --plot "$OUT/pareto.png"
echo "=== D: calibration and metrics"
grep -E "kv handshake|slow|Refusing" /tmp/logs/decode0.log | head -5
get "$D/metrics" | grep -E "kv_peer_bandwidth|kv_transfer_gbps_(sum|count)"
get "$URL/metrics" | grep -E "handover.*_(sum|count)"
echo "=== SIGKILL up"
python3 - "$UP" <<'PY'
import os, signal, sys, time
up = int(sys.argv[1])
def parents():
    out = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                out[int(e)] = int(open(f"/proc/{e}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out
def running(p):
    try:
        return "zombie" not in open(f"/proc/{p}/status").read()
    except OSError:
        return False
par, tree, front = parents(), set(), {up}
while front:
    front = {c for c, p in par.items() if p in front} - tree
    tree |= front
os.kill(up, signal.SIGKILL)
t0 = time.monotonic()
while (alive := [p for p in tree if running(p)]) and time.monotonic() - t0 < 5:
    time.sleep(0.05)
print(f"SIGKILL of up: {len(tree)} descendants, alive after {time.monotonic() - t0:.2f}s: {alive}")
PY
cp /tmp/logs/decode0.log /tmp/logs/prefill0.log /tmp/logs/proxy.log "$OUT/" 2>/dev/null
