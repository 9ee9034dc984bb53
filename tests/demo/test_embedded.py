"""The random embedded demo model is written once, atomically, even when processes race."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.demo import embedded  # noqa: E402

torch.set_num_threads(1)

CALL = "from hybridpd.demo.embedded import random_model_dir; print(random_model_dir())"


def test_written_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDPD_CACHE", str(tmp_path))
    first = embedded.random_model_dir()
    assert first == tmp_path / "models" / f"tiny-{embedded.embedded_version()}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (first / name).is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    calls: list[object] = []
    monkeypatch.setattr(embedded, "write_demo_model", lambda *a, **k: calls.append(a))
    assert embedded.random_model_dir() == first
    assert calls == [] and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]  # no temp leftovers


def test_version_tracks_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    before = embedded.embedded_version()
    assert before == embedded.embedded_version()
    monkeypatch.setattr(embedded, "EMBEDDED_SEED", embedded.EMBEDDED_SEED + 1)
    assert embedded.embedded_version() != before


def test_failed_write_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDPD_CACHE", str(tmp_path))

    def broken(out: Path, *args: object, **kwargs: object) -> None:
        (Path(out) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "write_demo_model", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded.random_model_dir()
    assert list((tmp_path / "models").iterdir()) == []


def test_two_racing_processes_get_the_same_complete_model(tmp_path: Path) -> None:
    env = {**os.environ, "HYBRIDPD_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CALL], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    model = Path(paths.pop())
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [model.name]


def test_losing_the_rename_race_keeps_the_winner(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDPD_CACHE", str(tmp_path))
    real_write = embedded.write_demo_model
    final = tmp_path / "models" / f"tiny-{embedded.embedded_version()}"

    def write_while_another_process_wins(out: Path, *args: object, **kwargs: object) -> object:
        real_write(final, *args, **kwargs)  # the other process finishes first
        (final / "winner").write_text("1")
        return real_write(out, *args, **kwargs)

    monkeypatch.setattr(embedded, "write_demo_model", write_while_another_process_wins)
    assert embedded.random_model_dir() == final
    assert (final / "winner").is_file()  # not replaced by the loser's copy
    assert [p.name for p in (tmp_path / "models").iterdir()] == [final.name]
