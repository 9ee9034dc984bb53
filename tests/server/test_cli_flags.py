"""`hybridpd serve` / `proxy` / `up` command lines without processes: flags generated from
`EngineArgs`, help and defaults shown, validation before anything loads, the stats line."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import io
import json
import shutil
from pathlib import Path

import pytest

from hybridpd.cli import HelpFormatter, OneLineErrorParser
from hybridpd.config import ConfigError, check_model_dir
from hybridpd.demo.embedded import embedded_model_dir
from hybridpd.engine.args import DType, EngineArgs, Role, cli_options
from hybridpd.engine.protocol import EngineStats
from hybridpd.launch import up
from hybridpd.progress import Progress
from hybridpd.proxy import cli as proxy_cli
from hybridpd.request import SamplingParams
from hybridpd.server import cli as serve_cli
from hybridpd.server.engine_client import _changed
from hybridpd.server.stats_log import Sample, is_idle, stats_line


def _parser(module) -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="hybridpd x", formatter_class=HelpFormatter)
    module.add_arguments(p)
    return p


def _serve(*argv: str) -> argparse.Namespace:
    return _parser(serve_cli).parse_args(list(argv))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return Path(embedded_model_dir())


@pytest.mark.parametrize("module", [serve_cli, proxy_cli, up])
def test_every_flag_has_help_and_shows_its_default(module):
    parser = _parser(module)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
    text = parser.format_help()
    assert "default:" in text
    for action in parser._actions:
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                and not isinstance(action, argparse._HelpAction):
            assert f"(default: {action.default})" in " ".join(text.split()), action.dest


def test_engine_flags_take_names_defaults_and_choices_from_the_dataclass():
    parser = _parser(serve_cli)
    by_dest = {a.dest: a for a in parser._actions}
    fields = {f.name: f for f in dataclasses.fields(EngineArgs)}
    options = cli_options()
    assert {o.dest for o in options} >= {"role", "dtype", "tp_size", "max_num_seqs",
                                         "max_num_batched_tokens", "gpu_memory_utilization"}
    for o in options:
        action = by_dest[o.dest]
        assert tuple(action.option_strings) == o.flags
        default = fields[o.dest].default
        assert action.default == (default.value if isinstance(default, enum.Enum) else default)
        assert action.help == o.help
    assert tuple(by_dest["role"].choices) == tuple(r.value for r in Role)
    assert tuple(by_dest["dtype"].choices) == tuple(d.value for d in DType)
    # parsed with no flags, the engine gets exactly the dataclass's defaults
    parsed = serve_cli.engine_args_from(_serve(), "/m")
    plain = EngineArgs(model_dir="/m")
    for o in options:
        assert getattr(parsed, o.dest) == getattr(plain, o.dest), o.dest


@pytest.mark.parametrize("flag", ["-tp", "--tensor-parallel-size", "--tp"])
def test_tensor_parallel_size_spellings(flag):
    assert serve_cli.engine_args_from(_serve(flag, "2"), "/m").tp_size == 2


def test_vllm_shaped_flags_reach_the_engine():
    ea = serve_cli.engine_args_from(_serve("/some/model", "--gpu-memory-utilization", "0.5",
                                           "--dtype", "auto", "--max-num-seqs", "7",
                                           "--max-num-batched-tokens", "99"), "/m")
    assert (ea.gpu_memory_utilization, ea.dtype, ea.max_num_seqs,
            ea.max_num_batched_tokens) == (0.5, "auto", 7, 99)
    assert serve_cli.engine_args_from(_serve("--dtype", "half"), "/m").dtype == "float16"


def test_model_is_positional_or_a_flag_but_not_two_different_ones():
    assert serve_cli.model_dir_of(_serve("/a")) == "/a"
    assert serve_cli.model_dir_of(_serve("--model", "/b")) == "/b"
    assert serve_cli.model_dir_of(_serve("/a", "--model", "/a")) == "/a"
    with pytest.raises(ConfigError, match="two models"):
        serve_cli.model_dir_of(_serve("/a", "--model", "/b"))


def test_host_defaults_all_interfaces_for_serve_and_proxy_but_loopback_for_up():
    assert _serve().host == "0.0.0.0"
    assert _parser(proxy_cli).parse_args(["--prefill", "p", "--decode", "d"]).host == "0.0.0.0"
    spec = up.spec_from_args(_parser(up).parse_args([]))
    assert spec.host == "127.0.0.1"
    dep = up.Deployment(dataclasses.replace(spec, visible_gpus=0, log_dir="/unused"))
    for k, place in enumerate(dep.plan()):
        child = dep._instance(k, place, "/m")
        assert child.argv[child.argv.index("--host") + 1] == "127.0.0.1"


def test_several_served_model_names_each_accepted(model_dir):
    plan = serve_cli.plan_from(_serve(str(model_dir), "--served-model-name", "a", "b"))
    assert plan.server.model_name == "a" and plan.server.model_names == ("a", "b")
    assert serve_cli.plan_from(_serve(str(model_dir))).server.model_names == (model_dir.name,)


def test_up_passes_log_flags_and_names_to_every_instance():
    spec = up.spec_from_args(_parser(up).parse_args([
        "--served-model-name", "x", "y", "--enable-log-requests", "--log-stats-interval", "3",
        "--disable-log-stats", "--dtype", "bfloat16"]))
    common = list(spec.extra_serve_args)
    i = common.index("--served-model-name")
    assert common[i + 1:i + 3] == ["x", "y"]
    assert "--enable-log-requests" in common and "--disable-log-stats" in common
    assert common[common.index("--log-stats-interval") + 1] == "3.0"
    assert common[common.index("--dtype") + 1] == "bfloat16"
    # what up passes, serve parses
    parsed = _serve(*common)
    assert parsed.served_model_name == ["x", "y"] and parsed.enable_log_requests


def test_parser_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        _serve("--dtype", "fp8")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'fp8'" in err


# ---- validation before anything loads ------------------------------------------------------
def _copy_model(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_check_model_dir_names_each_problem(model_dir, tmp_path):
    raw = json.loads((model_dir / "config.json").read_text())
    assert check_model_dir(model_dir).vocab_size == raw["vocab_size"]
    cases = {}
    cases["does not exist"] = tmp_path / "nope"
    (tmp_path / "file").write_text("x")
    cases["is not a directory"] = tmp_path / "file"
    cases["no config.json"] = _copy_model(model_dir, tmp_path / "noconf", ("config.json",))
    cases["has no tokenizer"] = _copy_model(model_dir, tmp_path / "notok", ("tokenizer.json",))
    cases["no \\*.safetensors"] = _copy_model(model_dir, tmp_path / "now",
                                              ("model.safetensors",))
    bad = _copy_model(model_dir, tmp_path / "llama", ("config.json",))
    (bad / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    cases["unsupported model_type 'llama'"] = bad
    broken = _copy_model(model_dir, tmp_path / "broken", ("config.json",))
    (broken / "config.json").write_text("{not json")
    cases["not readable JSON"] = broken
    for message, path in cases.items():
        with pytest.raises(ConfigError, match=message):
            check_model_dir(path)
    limit = raw["max_position_embeddings"]
    assert check_model_dir(model_dir, max_model_len=limit).max_position_embeddings == limit
    with pytest.raises(ConfigError, match=f"above the model's limit of {limit}"):
        check_model_dir(model_dir, max_model_len=limit + 1)
    with pytest.raises(ConfigError, match="unsupported dtype"):
        check_model_dir(model_dir, dtype="fp8")


def test_a_longer_max_model_len_only_when_the_environment_allows_it(model_dir, monkeypatch):
    cfg = check_model_dir(model_dir)
    limit = cfg.max_position_embeddings
    assert cfg.context_limit(limit + 100) == limit  # what the engine did silently before
    monkeypatch.setenv("HYBRIDPD_ALLOW_LONG_MAX_MODEL_LEN", "1")
    assert check_model_dir(model_dir, max_model_len=limit + 100).context_limit(limit + 100) \
        == limit + 100


def test_plan_refuses_bad_bounds_and_p_d_roles_without_secret(model_dir, monkeypatch):
    monkeypatch.delenv("HYBRIDPD_KV_SECRET", raising=False)
    with pytest.raises(ConfigError, match="HYBRIDPD_KV_SECRET"):
        serve_cli.plan_from(_serve(str(model_dir), "--role", "prefill"))
    with pytest.raises(ConfigError, match="--max-connections"):
        serve_cli.plan_from(_serve(str(model_dir), "--max-connections", "0"))
    with pytest.raises(ConfigError, match="lease"):
        serve_cli.plan_from(_serve(str(model_dir), "--lease-s", "5", "--max-lease-s", "1"))
    plan = serve_cli.plan_from(_serve(str(model_dir), "--max-model-len", "64"))
    assert plan.server.max_model_len == 64 and plan.engine.max_model_len == 64


# ---- logs ------------------------------------------------------------------------------------
def test_stats_line_reports_throughput_queue_and_kv_usage():
    stats = EngineStats(num_running=3, num_waiting=2, pool_total_blocks=200,
                        pool_free_blocks=150)
    line = stats_line(Sample(10.0, 100, 40), Sample(12.0, 300, 140), stats)
    assert line == ("Avg prompt throughput: 100.0 tokens/s, Avg generation throughput: "
                    "50.0 tokens/s, Running: 3 reqs, Waiting: 2 reqs, KV cache usage: 25.0%")
    idle = EngineStats(num_running=0, num_waiting=0, pool_total_blocks=10, pool_free_blocks=10)
    assert is_idle(Sample(0, 5, 5), Sample(1, 5, 5), idle)
    assert not is_idle(Sample(0, 5, 5), Sample(1, 5, 6), idle)
    assert not is_idle(Sample(0, 5, 5), Sample(1, 5, 5), stats)


def test_request_log_shows_the_parameters_that_differ_from_defaults():
    assert _changed(SamplingParams()) == "defaults"
    assert _changed(SamplingParams(max_tokens=5, temperature=0.0)) == \
        "max_tokens=5, temperature=0.0"


def test_progress_lines_on_a_pipe_are_one_per_tenth_and_one_at_the_end():
    out = io.StringIO()
    with Progress("Loading weights", 20, "layers", stream=out) as bar:
        for _ in range(20):
            bar.update()
    lines = out.getvalue().splitlines()
    assert [ln.split(":")[1].split("%")[0].strip() for ln in lines] == \
        [str(10 * k) for k in range(1, 10)] + ["100"]
    assert lines[-1].endswith("done") and "20 layers / 20 layers" in lines[-1]
    quiet = io.StringIO()
    with Progress("x", 5, stream=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""
