"""`hybridpd serve` / `proxy` as real processes: each configuration mistake ends in one line on
stderr and exit code 2 before any model loads; `serve MODEL -tp 1 --gpu-memory-utilization 0.5
--dtype auto` starts on CPU with the demo model, answers under every served name, and logs its
start-up summary, its requests and the periodic stats line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hybridpd.demo.embedded import embedded_model_dir

MISTAKE_DEADLINE_S = 60.0  # a deadline on the subprocess (a loaded CI box), not a bound asserted
START_DEADLINE_S = 180.0
LOG_DEADLINE_S = 60.0


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridpd.cli", *argv], capture_output=True,
                          text=True, timeout=MISTAKE_DEADLINE_S,
                          env={**os.environ, **(env or {})})


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return Path(embedded_model_dir())


@pytest.fixture(scope="module")
def broken_models(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, skip in (("notok", "tokenizer.json"), ("llama", "config.json"),
                       ("longer", "config.json")):
        d = root / name
        d.mkdir()
        for f in model_dir.iterdir():
            if f.name != skip:
                shutil.copy(f, d / f.name)
        out[name] = d
    raw = json.loads((model_dir / "config.json").read_text())
    (out["llama"] / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    pattern = raw["hybrid_override_pattern"] + "M"  # one layer more than the weights hold
    (out["longer"] / "config.json").write_text(json.dumps(
        {**raw, "hybrid_override_pattern": pattern, "num_hidden_layers": len(pattern)}))
    return out


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_missing_model_directory(tmp_path):
    line = _one_line_error(_run("serve", str(tmp_path / "absent"), "--port", "0"))
    assert "does not exist" in line and str(tmp_path / "absent") in line


def test_a_model_without_tokenizer(broken_models):
    line = _one_line_error(_run("serve", str(broken_models["notok"]), "--port", "0"))
    assert "no tokenizer" in line and "tokenizer.json" in line


def test_an_unsupported_model_type(broken_models):
    line = _one_line_error(_run("serve", str(broken_models["llama"]), "--port", "0"))
    assert "unsupported model_type 'llama'" in line


def test_a_bad_dtype(model_dir):
    line = _one_line_error(_run("serve", str(model_dir), "--dtype", "fp8", "--port", "0"))
    assert "--dtype" in line and "'fp8'" in line


def test_max_model_len_above_the_models_limit(model_dir):
    limit = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    line = _one_line_error(_run("serve", str(model_dir), "--max-model-len", str(limit + 1),
                                "--port", "0"))
    assert f"limit of {limit} tokens" in line


def test_a_busy_port_is_found_before_the_model_loads(model_dir, busy_port):
    line = _one_line_error(_run("serve", str(model_dir), "--port", str(busy_port)))
    assert f":{busy_port}" in line and "in use" in line


def test_the_proxy_on_a_busy_port(busy_port):
    line = _one_line_error(_run("proxy", "--prefill", "http://p", "--decode", "http://d",
                                "--port", str(busy_port)))
    assert f":{busy_port}" in line and "in use" in line


def test_a_refusal_while_the_engine_builds_is_one_error_line_too(broken_models):
    """Missing weights are found only when loading: still no traceback, exit code 2."""
    proc = _run("serve", str(broken_models["longer"]), "--port", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("hybridpd serve: error:")]
    assert len(errors) == 1 and "MissingWeightsError" in errors[0]
    assert "backbone.layers.8." in errors[0]


def test_a_p_d_role_without_the_secret(model_dir):
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDPD_KV_SECRET"}
    proc = subprocess.run([sys.executable, "-m", "hybridpd.cli", "serve", str(model_dir),
                           "--role", "decode", "--port", "0"], capture_output=True, text=True,
                          timeout=MISTAKE_DEADLINE_S, env=env)
    assert "HYBRIDPD_KV_SECRET" in _one_line_error(proc)


def _wait_for(pred, deadline_s: float, what: str):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)  # polling a condition with a deadline
    raise AssertionError(f"timed out waiting for {what}")


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_vllm_shaped_serve_starts_answers_and_logs(model_dir, tmp_path):
    ready, err_path = tmp_path / "ready.json", tmp_path / "serve.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hybridpd.cli", "serve", str(model_dir), "-tp", "1",
             "--gpu-memory-utilization", "0.5", "--dtype", "auto", "--port", "0",
             "--host", "127.0.0.1", "--ready-file", str(ready), "--served-model-name",
             "first", "second", "--enable-log-requests", "--log-stats-interval", "0.2",
             "--device", "cpu"],
            stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_for(lambda: ready.is_file() or proc.poll() is not None, START_DEADLINE_S,
                  "the ready file")
        assert proc.poll() is None, err_path.read_text()
        url = json.loads(ready.read_text())["url"]
        names = [c["id"] for c in json.loads(urllib.request.urlopen(
            f"{url}/v1/models", timeout=30).read())["data"]]
        assert names == ["first", "second"]
        outs = [_post(f"{url}/v1/completions", {"model": name, "prompt": "12+7=",
                                                 "max_tokens": 4, "temperature": 0})
                for name in names]
        assert outs[0]["choices"][0]["text"] == outs[1]["choices"][0]["text"]
        generated = sum(o["usage"]["completion_tokens"] for o in outs)
        assert generated > 0
        def busy_log() -> str | None:
            text = err_path.read_text()
            return text if _busy_stats_line(text) else None

        log = _wait_for(busy_log, LOG_DEADLINE_S, "a stats line with generated tokens")
        summary = next(ln for ln in log.splitlines() if "engine ready:" in ln)
        for part in ("8 layers", "dtype float32", "on cpu", "blocks x", "tokens =",
                     "role both, TP 1"):
            assert part in summary, summary
        assert "Loading weights: 100%" in log
        for o in outs:
            assert f"received request {o['id']}: " in log and "max_tokens=4" in log
            assert f"finished request {o['id']}: " in log
        assert log.index("loading ") < log.index("Loading weights") < log.index("engine ready")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _busy_stats_line(text: str) -> bool:
    """Some stats line reports generation throughput above zero."""
    for line in text.splitlines():
        if "Avg generation throughput: " in line:
            value = float(line.split("Avg generation throughput: ")[1].split()[0])
            if value > 0:
                return True
    return False
