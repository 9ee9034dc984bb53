"""Source gates on the engine ↔ P/D seam: the scheduler is the only place blocks are freed, the
connectors never import the engine or the scheduler (data in, decisions out), the engine and
P/D packages have no import cycle, and `Request` carries no P/D state (it is the connector's)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from hybridpd.request import Request

ROOT = Path(__file__).resolve().parents[2] / "hybridpd"
CONNECTORS = ("engine/kv_connector.py", "engine/prefill_side.py", "engine/decode_side.py")


def _module(path: Path) -> str:
    return "hybridpd." + ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    """hybridpd modules `path` imports at module level (not under TYPE_CHECKING)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hybridpd"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hybridpd"))
    return out


def _all_imports(path: Path) -> set[str]:
    """Every hybridpd module `path` names in an import, anywhere in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hybridpd"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hybridpd"))
    return out


def test_blocks_are_freed_only_by_the_scheduler() -> None:
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in ("engine/scheduler.py", "engine/block_manager.py"):
            continue
        text = path.read_text()
        assert "blocks.free(" not in text and "free_held(" not in text, rel


def test_connectors_see_neither_the_engine_nor_the_scheduler() -> None:
    banned = {"hybridpd.engine.core", "hybridpd.engine.scheduler", "hybridpd.engine.executor",
              "hybridpd.engine.llm"}
    for rel in CONNECTORS:
        assert not _all_imports(ROOT / rel) & banned, rel
    for path in sorted((ROOT / "disagg").glob("*.py")):
        assert not any(m.startswith("hybridpd.engine") for m in _all_imports(path)), path.name


def test_no_import_cycle_in_engine_and_disagg() -> None:
    paths = sorted((ROOT / "engine").glob("*.py")) + sorted((ROOT / "disagg").glob("*.py"))
    graph = {_module(p): _imports(p) for p in paths}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            assert state.get(n) != 1, " -> ".join([*stack, m, n])
            if n not in state:
                visit(n, [*stack, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_request_carries_no_p_d_state() -> None:
    names = {f.name for f in dataclasses.fields(Request)}
    assert not names & {"remote_tokens", "hold_on_finish", "output_offset"}


def test_the_instance_side_channel_is_the_transfer_services_alone() -> None:
    """One side-channel server per instance, built by the transfer service: no worker,
    endpoint, receiver or engine module constructs one or answers a handshake."""
    owners = {"disagg/instance_channel.py"}  # the transfer service's (open_side_channel)
    built = set()
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if "SideChannelServer(" in path.read_text() and rel != "disagg/side_channel.py":
            built.add(rel)
    assert built == owners
    service = (ROOT / "disagg/transfer_service.py").read_text()
    assert "InstanceSideChannel(" in service
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel not in ("disagg/transfer_service.py", "disagg/instance_channel.py"):
            assert "InstanceSideChannel(" not in path.read_text(), rel
    for rel in ("engine/worker.py", "disagg/endpoint.py", "engine/executor.py",
                "engine/tp_executor.py", "disagg/receiver.py"):
        text = (ROOT / rel).read_text()
        assert "side_channel_port" not in text and "SideChannelServer" not in text, rel


def test_only_the_transfer_service_calls_peers() -> None:
    """Workers make no control-plane call: handshakes, renewals, releases and confirmations
    are the transfer service's (`confirm_lease` runs on its pool)."""
    callers = {str(p.relative_to(ROOT)) for p in sorted(ROOT.rglob("*.py"))
               if "side_channel_call(" in p.read_text()}
    assert callers == {"disagg/side_channel.py", "disagg/transfer_service.py",
                       "disagg/leases.py"}
