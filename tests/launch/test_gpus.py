"""GPU placement of `hybridpd up` (pure function) and `up`'s flag pass-through (no processes)."""

from __future__ import annotations

import argparse

import pytest

from hybridpd.launch.gpus import PlacementError, parse_gpu_list, place_instances
from hybridpd.launch.up import Deployment, add_arguments, spec_from_args


def _place(**kw):
    base = dict(num_prefill=1, num_decode=1, prefill_tp=1, decode_tp=1, visible_count=4,
                gpus=None)
    return place_instances(**{**base, **kw})


def test_each_instance_gets_its_own_gpus_prefill_first():
    out = _place(num_prefill=2, num_decode=1, prefill_tp=1, decode_tp=2)
    assert [(p.role, p.index, p.gpus, p.visible) for p in out] == [
        ("prefill", 0, (0,), "0"), ("prefill", 1, (1,), "1"), ("decode", 0, (2, 3), "2,3")]
    out = _place(gpus=[3, 1])
    assert [p.visible for p in out] == ["3", "1"]


def test_indices_map_through_the_launchers_visible_devices():
    out = _place(visible_count=2, parent_visible="GPU-aaa,GPU-bbb")
    assert [p.visible for p in out] == ["GPU-aaa", "GPU-bbb"]


def test_too_few_gpus_are_refused_with_the_count():
    with pytest.raises(PlacementError, match="need 3 GPUs, 2 given.*--share-gpus"):
        _place(visible_count=2, decode_tp=2)
    with pytest.raises(PlacementError, match="only 2 GPU"):
        _place(visible_count=2, gpus=[0, 5])
    with pytest.raises(PlacementError, match="TP size"):
        _place(visible_count=1, share=True, decode_tp=2, memory_utilization=0.4)


def test_no_gpus_means_cpu_unless_gpus_are_asked_for():
    assert [p.gpus for p in _place(visible_count=0)] == [(), ()]
    assert all(p.visible is None for p in _place(visible_count=0))
    with pytest.raises(PlacementError, match="no visible CUDA GPU"):
        _place(visible_count=0, gpus=[0])


def test_sharing_needs_an_explicit_share_that_fits():
    with pytest.raises(PlacementError, match="--gpu-memory-utilization"):
        _place(visible_count=1, share=True)
    out = _place(visible_count=1, share=True, memory_utilization=0.45)
    assert [p.gpus for p in out] == [(0,), (0,)]
    assert all(p.memory_utilization == 0.45 for p in out)
    with pytest.raises(PlacementError, match="GPU 0 holds 2 instances.*at most 0.50"):
        _place(visible_count=1, share=True, memory_utilization=0.6)


def test_gpu_list_parsing():
    assert parse_gpu_list("0,2") == [0, 2]
    for bad in ("", "a", "0,0", "-1"):
        with pytest.raises(PlacementError):
            parse_gpu_list(bad)


def _spec(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return spec_from_args(parser.parse_args(list(argv)))


def test_serve_flags_pass_through_per_role_last():
    spec = _spec("--served-model-name", "m", "--max-model-len", "64", "--cache-memory", "8MiB",
                 "--decode-cache-memory", "4MiB", "--prefill-max-num-batched-tokens", "256",
                 "--serve-args", "--seed-unused 1", "--kv-require-fast-transport",
                 "--log-level", "debug")
    common = list(spec.extra_serve_args)
    assert common[common.index("--served-model-name") + 1] == "m"
    assert common[common.index("--max-model-len") + 1] == "64"
    assert common[common.index("--cache-memory") + 1] == str(8 * 2**20)
    assert "--kv-require-fast-transport" in common and common[-2:] == ["--seed-unused", "1"]
    assert list(spec.decode_serve_args) == ["--cache-memory", str(4 * 2**20)]
    assert list(spec.prefill_serve_args) == ["--max-num-batched-tokens", "256"]
    assert list(spec.proxy_args) == ["--log-level", "debug"]
    dep = Deployment(spec)
    dep.lifeline = None
    place = dep.plan()[1]  # this machine's GPUs, or CPU: the argv is the same apart from those
    argv = dep._instance(1, place, "/m").argv
    # the per-role value comes after the common one: argparse keeps the last
    assert argv.index("--cache-memory") < len(argv) - argv[::-1].index("--cache-memory") - 1
    assert argv[argv.index("--port") + 1] == "0" and "--ready-file" in argv


def test_pinned_ports():
    spec = _spec("--instance-base-port", "9100", "--side-channel-base-port", "9200",
                 "--decode-tp", "2")
    dep = Deployment(spec)
    places = place_instances(num_prefill=1, num_decode=1, prefill_tp=1, decode_tp=2,
                             visible_count=0, gpus=None)
    argvs = [dep._instance(k, p, "/m").argv for k, p in enumerate(places)]
    assert [a[a.index("--port") + 1] for a in argvs] == ["9100", "9101"]
    assert [a[a.index("--side-channel-port") + 1] for a in argvs] == ["9200", "9202"]


@pytest.mark.parametrize("argv", [["--gpu-memory-utilization", "1.5"],
                                  ["--kv-transport-floor-gbps", "-1"], ["--cache-memory", "x"]])
def test_bad_values_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _spec(*argv)
    assert info.value.code == 2 and argv[0] in capsys.readouterr().err
