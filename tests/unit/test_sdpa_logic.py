"""The CUDA kernels' composition logic, run on CPU: GQA folding, LSE shapes, bottom-right causal
from top-left ops, KV splits, and the fallback past fused ops that refuse a shape."""

from __future__ import annotations

import math

import pytest
import torch

from fapool.attention import FlashAttn4Kernel, SdpaCudnnKernel, causal_by_diagonal
from fapool.attention.base import normalise_lse
from fapool.attention.sdpa_ops import FusedOpSpec, cpu_flash_op, cudnn_op, flash_op, kv_splits_for
from tests.helpers.attention import SHAPES, check, naive_attention, rand_qkv


# ---------------------------------------------------------------- CUDA kernels' logic, on CPU


def top_left_primitive(calls):
    """A float64 attend(q, k, v, causal, scale) whose causal mask is TOP-LEFT, as torch's fused
    ops are; it records each call's (Tq, Tk, causal)."""
    def attend(q, k, v, causal, scale):
        calls.append((q.shape[0], k.shape[0], causal))
        o, lse = naive_attention(q, k, v, causal, scale, top_left=True)
        return o.float(), lse.float()
    return attend


@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 30), (7, 7), (7, 30), (29, 30)])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1)])
def test_causal_by_diagonal_makes_bottom_right_causal_from_top_left_calls(tq, tk, hq, hkv):
    q, k, v = rand_qkv(tq, tk, hq, hkv, d=16, seed=tq + tk, device="cpu")
    calls = []
    o, lse = causal_by_diagonal(top_left_primitive(calls), q, k, v, 0.25)
    o_ref, lse_ref = naive_attention(q, k, v, causal=True, scale=0.25)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)
    assert all(tq_ == tk_ for tq_, tk_, causal in calls if causal)  # causal only on squares
    if tq < tk and tq > 1:  # the test can tell the alignments apart
        o_wrong, _ = naive_attention(q, k, v, causal=True, scale=0.25, top_left=True)
        assert not torch.allclose(o_wrong, o_ref, atol=1e-3)


def cpu_sdpa():
    return SdpaCudnnKernel(ops=[FusedOpSpec("cpu", cpu_flash_op)])


@pytest.mark.parametrize("tq,tk,hq,hkv,causal", SHAPES)
def test_sdpa_kernel_logic_matches_float64_attention_with_cpu_op(tq, tk, hq, hkv, causal):
    q, k, v = rand_qkv(tq, tk, hq, hkv, seed=tq + 7 * tk, device="cpu")
    check(cpu_sdpa(), q, k, v, causal)


@pytest.mark.parametrize("tq,tk,hq,hkv,causal", SHAPES)
def test_sdpa_kernel_split_kv_logic_matches_float64_attention(tq, tk, hq, hkv, causal):
    batches = []

    def spy(q4, k4, v4, causal, scale):
        batches.append(q4.shape[0])
        return cpu_flash_op(q4, k4, v4, causal, scale)

    q, k, v = rand_qkv(tq, tk, hq, hkv, seed=tq + 5 * tk, device="cpu")
    kernel = SdpaCudnnKernel(ops=[FusedOpSpec("spy", spy)], min_split_keys=4, target_blocks=64)
    check(kernel, q, k, v, causal)
    if tk - tq >= 8 or (not causal and tk >= 8):  # enough unmasked keys for two chunks
        assert max(batches) > 1


def test_decode_shaped_work_uses_the_decode_chain_and_self_splitting_ops_run_whole():
    calls = []

    def spy(label):
        def op(q4, k4, v4, causal, scale):
            calls.append((label, q4.shape[0], k4.shape[2]))
            return cpu_flash_op(q4, k4, v4, causal, scale)
        return op

    kernel = SdpaCudnnKernel(
        ops=[FusedOpSpec("prefill", spy("prefill"))],
        decode_ops=[FusedOpSpec("decode", spy("decode"), splits_kv=True)],
        min_split_keys=8, target_blocks=16,
    )
    q, k, v = rand_qkv(1, 40, 4, 2, d=16, seed=8, device="cpu")
    check(kernel, q, k, v, causal=True)  # one row per head over 40 keys: decode-shaped
    assert calls == [("decode", 1, 40)]  # the op splits KV itself, so it gets all keys at once
    assert kernel.op_for(torch.float32, 16, False, decode=True) == "decode"
    calls.clear()
    q, k, v = rand_qkv(12, 12, 4, 2, d=16, seed=9, device="cpu")
    check(kernel, q, k, v, causal=True)  # a square prefill: only the ordinary chain
    assert {label for label, _, _ in calls} == {"prefill"}


def test_kv_splits_fill_the_gpu_only_when_few_blocks_run():
    assert kv_splits_for(65536, 8, 4, 2048, 264) == 32  # one decode token, GQA group 4
    assert kv_splits_for(65536, 1, 1, 2048, 264) == 32  # capped by chunks of >= 2048 keys
    assert kv_splits_for(3000, 8, 4, 2048, 264) == 1  # too short to split
    assert kv_splits_for(65536, 8, 4096, 2048, 264) == 1  # prefill rows already fill the GPU


def test_cudnn_and_flash_ops_refuse_float32():
    # cuDNN returned NaN for float32 on H100 instead of refusing; the adapters refuse for it.
    x = torch.zeros(1, 1, 2, 8)
    for op in (cudnn_op, flash_op):
        with pytest.raises(RuntimeError, match="float16 or bfloat16"):
            op(x, x, x, False, 1.0)


def test_sdpa_kernel_only_asks_fused_ops_for_square_causal_work():
    seen = []

    def spy(q4, k4, v4, causal, scale):
        seen.append((q4.shape, k4.shape, causal))
        return cpu_flash_op(q4, k4, v4, causal, scale)

    q, k, v = rand_qkv(6, 25, 8, 2, d=16, seed=6, device="cpu")
    check(SdpaCudnnKernel(ops=[FusedOpSpec("spy", spy)]), q, k, v, causal=True)
    causal_calls = [(qs, ks) for qs, ks, c in seen if c]
    assert causal_calls and all(qs[2] == ks[2] for qs, ks in causal_calls)
    # The unmasked prefix stacks each KV head's 4 query heads as rows: (1, Hkv, 4 * Tq, D).
    assert [(tuple(qs), tuple(ks)) for qs, ks, c in seen if not c] == [
        ((1, 2, 24, 16), (1, 2, 19, 16))
    ]


def test_sdpa_kernel_falls_back_past_a_refusing_op_and_remembers():
    refusals = []

    def refuses(q4, k4, v4, causal, scale):
        refusals.append(causal)
        raise RuntimeError("cuDNN refuses float32\nsecond line")

    kernel = SdpaCudnnKernel(
        ops=[FusedOpSpec("refuses", refuses), FusedOpSpec("cpu", cpu_flash_op)]
    )
    q, k, v = rand_qkv(1, 17, 4, 2, d=16, seed=7, device="cpu")
    for _ in range(3):
        check(kernel, q, k, v, causal=True)
    assert refusals == [False]  # refused once, then skipped for this (dtype, D, causal)
    assert kernel.op_for(torch.float32, 16, False, decode=True) == "cpu"  # one query row: decode-shaped
    assert kernel.op_for(torch.float32, 16, True) is None


def test_sdpa_kernel_reports_every_refusal_when_no_op_accepts():
    def refuses(*args):
        raise RuntimeError("not on this build")

    kernel = SdpaCudnnKernel(ops=[FusedOpSpec("a", refuses), FusedOpSpec("b", refuses)])
    q, k, v = rand_qkv(1, 4, 2, 2, d=8, device="cpu")
    with pytest.raises(RuntimeError, match="a: not on this build; b: not on this build"):
        kernel.forward(q, k, v, causal=False)


@pytest.mark.parametrize("raw_shape", [(1, 3, 5), (1, 3, 5, 1), (1, 3, 32)])
def test_normalise_lse_accepts_every_fused_op_shape(raw_shape):
    raw = torch.arange(math.prod(raw_shape), dtype=torch.float32).reshape(raw_shape)
    lse = normalise_lse(raw, num_heads=3, num_rows=5)
    assert lse.shape == (3, 5) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, raw.reshape(3, -1)[:, :5])


def test_flash_kernels_refuse_float32_before_touching_the_gpu():
    q, k, v = rand_qkv(2, 4, 2, 2, d=8, device="cpu")
    with pytest.raises(ValueError, match="'flash4' takes float16 or bfloat16"):
        FlashAttn4Kernel().forward(q, k, v, causal=False)
