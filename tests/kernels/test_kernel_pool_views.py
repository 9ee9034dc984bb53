"""The ops write through strided views of one uint8 page buffer (the pool), in place."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from hybridpd.kernels import (  # noqa: E402
    causal_conv1d_prefill_ref,
    ssd_decode_ref,
    ssd_prefill_ref,
    write_kv_ref,
)

torch.set_num_threads(1)
NB, S = 6, 2  # blocks, shared tensors (regions)
HKV, BT, HD = 2, 4, 4  # attention page: (Hkv, 2, bt, D) fp32 = 256 B
CH, K = 6, 4  # conv state (C, K-1) bf16 = 36 B
H, G, P, N = 2, 1, 3, 5  # ssm state (H, P, N) fp32 = 120 B
PAGE = HKV * 2 * BT * HD * 4
CONV_BYTES = CH * (K - 1) * 2
SSM_OFF = -(-CONV_BYTES // 16) * 16
SSM_BYTES = H * P * N * 4


def _views(buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kv = buf[:, 0, :].view(torch.float32).view(NB, HKV, 2, BT, HD)
    conv = buf[:, 1, :CONV_BYTES].view(torch.bfloat16).view(NB, CH, K - 1)
    ssm = buf[:, 1, SSM_OFF:SSM_OFF + SSM_BYTES].view(torch.float32).view(NB, H, P, N)
    return kv, conv, ssm


def test_writes_land_in_byte_buffer(device):
    g = torch.Generator().manual_seed(0)
    buf = torch.zeros(NB, S, PAGE, dtype=torch.uint8, device=device)
    kv, conv, ssm = _views(buf)
    assert not kv.is_contiguous() and not ssm.is_contiguous()
    lens, ids = [3, 5], torch.tensor([4, 1], device=device)
    qsl = torch.tensor([0, 3, 8], device=device)
    no_init = torch.tensor([False, False], device=device)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    xbc = r(sum(lens), CH)
    conv_ref = torch.zeros(NB, CH, K - 1, dtype=torch.bfloat16, device=device)
    w, bias = r(CH, K), r(CH)
    causal_conv1d_prefill_ref(xbc, w, bias, conv, ids, qsl, no_init)
    causal_conv1d_prefill_ref(xbc, w, bias, conv_ref, ids, qsl, no_init)

    x, dt, A, D, dtb = r(8, H, P), r(8, H), -torch.rand(H).to(device), r(H), r(H)
    Bm, Cm = r(8, G, N), r(8, G, N)
    ssm_ref = torch.zeros(NB, H, P, N, device=device)
    ssd_prefill_ref(x, dt, A, Bm, Cm, D, dtb, ssm, ids, qsl, no_init, chunk_size=2)
    ssd_prefill_ref(x, dt, A, Bm, Cm, D, dtb, ssm_ref, ids, qsl, no_init, chunk_size=2)
    dec = (r(2, H, P), r(2, H), A, r(2, G, N), r(2, G, N), D, dtb)
    ssd_decode_ref(*dec, ssm, ids)
    ssd_decode_ref(*dec, ssm_ref, ids)

    k, v = r(3, HKV, HD), r(3, HKV, HD)
    slots = torch.tensor([2 * BT + 1, 5 * BT + 3, 2 * BT + 0], device=device)
    write_kv_ref(k, v, kv, slots)

    kv2, conv2, ssm2 = _views(buf)  # fresh views: the bytes really are in buf
    torch.testing.assert_close(conv2, conv_ref, atol=0, rtol=0)
    torch.testing.assert_close(ssm2, ssm_ref, atol=0, rtol=0)
    assert ssm2[ids].abs().sum() > 0
    torch.testing.assert_close(kv2[2, :, 0, 1], k[0], atol=0, rtol=0)
    torch.testing.assert_close(kv2[5, :, 1, 3], v[1], atol=0, rtol=0)
    assert int((kv2 != 0).any(dim=-1).sum()) == 3 * HKV * 2
    assert int(buf[:, 1, SSM_OFF + SSM_BYTES:].count_nonzero()) == 0  # padding never written
    assert int(buf[:, 1, CONV_BYTES:SSM_OFF].count_nonzero()) == 0
    untouched = [b for b in range(NB) if b not in ids.tolist()]
    assert int(buf[untouched, 1].count_nonzero()) == 0
