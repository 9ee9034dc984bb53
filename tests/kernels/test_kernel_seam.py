"""The kernel seam: one op table per device, references on CPU, metadata built once per step."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.kernels import ops as ops_mod  # noqa: E402
from hybridpd.kernels import paged_attention_ref, paged_decode_attention_ref  # noqa: E402
from hybridpd.kernels.metadata import build_prefill_meta, decode_splits  # noqa: E402
from hybridpd.kernels.ops import KernelImpl, kernel_ops  # noqa: E402

torch.set_num_threads(1)


def test_cpu_gets_the_references_and_caches_the_table() -> None:
    ops = kernel_ops("cpu")
    assert ops.name == "reference"
    assert kernel_ops(torch.device("cpu")) is ops  # resolved once
    assert all(name.startswith("hybridpd.kernels.") for name in ops.kernel_names().values())


def test_seam_import_does_not_import_triton() -> None:
    code = ("import sys, hybridpd.model.nemotron_h, hybridpd.kernels.ops as o; "
            "o.kernel_ops('cpu'); print('triton' in sys.modules)")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "HYBRIDPD_KERNELS": "auto"})
    assert out.stdout.strip() == "False"


def test_unknown_impl_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown kernel implementation 'fast'"):
        kernel_ops("cpu", "fast")
    monkeypatch.setenv(ops_mod.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="choose auto, reference"):
        kernel_ops("cpu")


def test_cuda_table_falls_back_per_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_mod, "CUDA_KERNELS", {
        "ssd_decode": "hybridpd.kernels.no_such_module:ssd_decode",
        "write_kv": "hybridpd.kernels.attention:write_kv_ref",
    })
    table = ops_mod._cuda_ops()
    assert table.ssd_decode is ops_mod.REFERENCE_OPS.ssd_decode  # missing module: reference
    assert table.write_kv is ops_mod.write_kv_ref
    monkeypatch.setattr(ops_mod, "CUDA_KERNELS", {"bogus_op": "x:y"})
    with pytest.raises(ValueError, match="unknown op 'bogus_op'"):
        ops_mod._cuda_ops()


def test_reference_impl_forced_everywhere() -> None:
    assert kernel_ops("cuda", KernelImpl.REFERENCE) is ops_mod.REFERENCE_OPS


def test_decode_attention_ref_equals_the_general_op() -> None:
    g = torch.Generator().manual_seed(1)
    nb, hkv, hq, bt, d = 14, 2, 8, 5, 16
    kv = torch.full((nb, hkv, 2, bt, d), float("nan"))  # unused slots are garbage
    seq_lens = torch.tensor([1, 7, 13, 5])
    table = torch.randperm(nb - 1, generator=g)[:12].view(4, 3) + 1
    for b, n in enumerate(seq_lens.tolist()):
        for p in range(n):
            kv[table[b, p // bt], :, :, p % bt] = torch.randn(hkv, 2, d, generator=g)
    q = torch.randn(4, hq, d, generator=g)
    got = paged_decode_attention_ref(q, kv, table, seq_lens, 0.25)
    want = paged_attention_ref(q, kv, table, torch.arange(5), seq_lens, 0.25)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prefill_meta_rebases_and_maps_tokens() -> None:
    qsl = torch.tensor([2, 5, 6, 10])  # decode tokens 0..1 come before
    meta = build_prefill_meta(qsl, torch.tensor([3, 4, 4]), torch.tensor([0, 3, 0]),
                              torch.tensor([False, True, False]), 4, 4, 8, (2, 5, 6, 10))
    assert meta.query_start_loc.tolist() == [0, 3, 4, 8]
    assert meta.query_start_loc_host == (0, 3, 4, 8)
    assert meta.token_seq.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert meta.token_pos.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert (meta.num_seqs, meta.num_tokens) == (3, 8)


def test_decode_splits_grow_with_context_and_are_bounded() -> None:
    assert decode_splits(1) == 1
    assert decode_splits(512) == 1
    assert decode_splits(513) == 2
    assert decode_splits(10**9) == 64
