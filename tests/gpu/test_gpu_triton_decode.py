"""The Triton split-KV decode kernel against the reference, over ragged arena regions."""
import pytest
import torch

from fapool.attention import select_kernel
from fapool.attention.triton_decode import SplitPlan, decode_split_kv, merge_partials, triton_decode_reason

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.setenv("FAPOOL_TRITON_DECODE", "1")


def _needs_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    reason = triton_decode_reason(DEV)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(32, 32), (32, 8), (28, 4)])
def test_split_kv_decode_equals_reference(dtype, heads):
    _needs_triton()
    hq, hkv = heads
    g = torch.Generator(device="cuda").manual_seed(hq + hkv)
    rows, d = 40000, 128
    ka = torch.randn(rows, hkv, d, device=DEV, dtype=dtype, generator=g)
    va = torch.randn(rows, hkv, d, device=DEV, dtype=dtype, generator=g)
    starts, lengths = [5, 3000, 9000, 20000], [2900, 1, 10999, 19000]
    q = torch.randn(len(starts), hq, d, device=DEV, dtype=dtype, generator=g)
    ref_o, ref_lse = select_kernel("cpu", "reference").decode_varlen(
        q.cpu().double(), ka.cpu().double(), va.cpu().double(), starts, lengths)
    for target in (None, 8):  # the default chunking and a coarse one (one chunk for most)
        plan = SplitPlan.build(starts, lengths, hkv, DEV, target_programs=target)
        o, lse = decode_split_kv(q, ka, va, plan, d**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(o.double().cpu(), ref_o.to(o.dtype).double(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse.double().cpu(), ref_lse.double(), rtol=1e-4, atol=1e-4)


def test_merge_partials_matches_torch_merge():
    _needs_triton()
    from fapool.attention import merge_stacked

    outs = torch.randn(4, 8, 32, 128, device=DEV, dtype=torch.bfloat16)
    lses = torch.randn(4, 32, 8, device=DEV)
    lses[2, :, 3] = float("-inf")  # a part with no shard of sequence 3
    ref, _ = merge_stacked(outs, lses)
    torch.testing.assert_close(merge_partials(outs, lses).float(), ref.float(), rtol=1e-2, atol=1e-2)
