"""`hybridpd demo-model` arguments and entry point."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.demo.cli import add_arguments, main  # noqa: E402

torch.set_num_threads(1)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_writes_the_requested_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    args = _parse(["--out", str(out), "--preset", "small", "--seed", "3", "--num-layers", "4",
                   "--dtype", "float16"])
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hybrid_override_pattern"] == "MEM*" and cfg["dtype"] == "float16"
    assert "small" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_parse(["--out", str(tmp_path / "a"), "--num-layers", "99"])) == 2
    assert "num_layers" in capsys.readouterr().err
    assert main(_parse(["--out", str(tmp_path / "b"), "--dtype", "int4"])) == 2
    assert main(_parse(["--out", str(tmp_path / "c")])) == 0
    assert main(_parse(["--out", str(tmp_path / "c")])) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(_parse(["--out", str(tmp_path / "c"), "--overwrite"])) == 0
    with pytest.raises(SystemExit):
        _parse(["--out", str(tmp_path / "d"), "--preset", "huge"])
