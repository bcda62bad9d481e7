"""Every attention kernel usable here honours the contract; kernel selection; the CUDA kernels'
composition logic (GQA folding, LSE shapes, bottom-right causal from top-left ops) on CPU."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import fapool.attention as attention_pkg
from fapool.attention import (
    KERNEL_ENV_VAR,
    KERNELS,
    FlashAttn4Kernel,
    ReferenceKernel,
    SdpaCudnnKernel,
    available_kernels,
    causal_by_diagonal,
    select_kernel,
)
from fapool.attention.base import normalise_lse
from fapool.attention.sdpa_ops import (
    FusedOpSpec,
    cpu_flash_op,
    cudnn_op,
    flash_op,
    kv_splits_for,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HALF = (torch.float16, torch.bfloat16)


def naive_attention(q, k, v, causal, scale=None, top_left=False):
    """Float64 softmax(scale * QK^T)V; the causal mask is bottom-right unless ``top_left``."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # (Hq, Tq, Tk)
    if causal:
        shift = 0 if top_left else tk - tq
        hidden = torch.arange(tk)[None, :] > torch.arange(tq)[:, None] + shift
        scores = scores.masked_fill(hidden, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (Hq, Tq)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]))  # rows with no keys: zeros
    return torch.einsum("hqk,khd->qhd", probs, v), lse


def rand_qkv(tq, tk, hq, hkv, d=64, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(tq, hq, d, generator=g), torch.randn(tk, hkv, d, generator=g),
               torch.randn(tk, hkv, d, generator=g))
    return tuple(t.to(device=device, dtype=dtype) for t in tensors)


def tolerance(dtype, device):
    if dtype in HALF:  # outputs are rounded to 8 or 11 mantissa bits; the LSE is float32
        return {"rtol": 2e-2, "atol": 2e-2}, {"rtol": 2e-3, "atol": 2e-3}
    if device.type == "cuda":  # fused kernels reorder float32 sums
        return {"rtol": 1e-4, "atol": 1e-4}, {"rtol": 1e-4, "atol": 1e-4}
    return {"rtol": 1e-5, "atol": 1e-5}, {"rtol": 1e-5, "atol": 1e-5}


def check(kernel, q, k, v, causal, scale=None):
    o, lse = kernel.forward(q, k, v, causal=causal, scale=scale)
    assert o.shape == q.shape and o.dtype == q.dtype and o.device == q.device
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    o_ref, lse_ref = naive_attention(q, k, v, causal, scale)
    o_tol, lse_tol = tolerance(q.dtype, q.device)
    torch.testing.assert_close(o.cpu().double(), o_ref, **o_tol)
    torch.testing.assert_close(lse.cpu().double(), lse_ref, **lse_tol)


def kernel_cases():
    """(kernel name, dtype) for every kernel that can run on this machine's device."""
    cases = []
    for name in available_kernels(DEVICE):
        dtypes = [] if name in ("flash4", "flash2") else [torch.float32]
        if DEVICE.type == "cuda":
            dtypes += [torch.bfloat16, torch.float16]
        cases += [pytest.param(name, dt, id=f"{name}-{str(dt)[6:]}") for dt in dtypes]
    return cases


SHAPES = [  # (Tq, Tk, Hq, Hkv, causal)
    (1, 1, 2, 2, True), (1, 37, 4, 1, True), (1, 37, 4, 2, False), (9, 9, 2, 2, True),
    (9, 40, 4, 2, True), (9, 40, 4, 4, False), (33, 70, 8, 2, True), (70, 33, 4, 1, False),
    (64, 64, 4, 1, True),
]


# ---------------------------------------------------------------- the contract, per kernel


@pytest.mark.parametrize("name,dtype", kernel_cases())
@pytest.mark.parametrize("tq,tk,hq,hkv,causal", SHAPES)
def test_kernel_matches_float64_attention(name, dtype, tq, tk, hq, hkv, causal):
    q, k, v = rand_qkv(tq, tk, hq, hkv, seed=tq * 100 + tk, dtype=dtype)
    check(KERNELS[name](), q, k, v, causal)


@pytest.mark.parametrize("name,dtype", kernel_cases())
def test_kernel_honours_an_explicit_scale(name, dtype):
    q, k, v = rand_qkv(5, 12, 4, 2, seed=3, dtype=dtype)
    check(KERNELS[name](), q, k, v, causal=True, scale=0.05)


@pytest.mark.parametrize("name,dtype", kernel_cases())
def test_kernel_with_no_keys_gives_zeros_and_minus_inf(name, dtype):
    q, k, v = rand_qkv(3, 0, 4, 2, dtype=dtype)
    o, lse = KERNELS[name]().forward(q, k, v, causal=False)
    assert o.shape == q.shape and torch.all(o == 0)
    assert lse.shape == (4, 3) and torch.all(torch.isneginf(lse))
    o, lse = KERNELS[name]().forward(q[:0], k, v, causal=True)
    assert o.shape == (0, 4, 64) and lse.shape == (4, 0)


@pytest.mark.parametrize("name,dtype", kernel_cases())
def test_kernel_accepts_strided_views(name, dtype):
    q, k, v = rand_qkv(8, 20, 4, 2, seed=4, dtype=dtype)
    # Slices of a (H, T, D) buffer, as a KV cache laid out by head would hand them over.
    k_view = k.transpose(0, 1).contiguous().transpose(0, 1)[3:]
    v_view = v.transpose(0, 1).contiguous().transpose(0, 1)[3:]
    check(KERNELS[name](), q[::1], k_view, v_view, causal=True)


@pytest.mark.parametrize(
    "shapes,causal,match",
    [
        (((5, 2, 8), (3, 2, 8), (3, 2, 8)), True, "Tq <= Tk"),
        (((2, 3, 8), (4, 2, 8), (4, 2, 8)), False, "multiple of KV heads"),
        (((2, 2, 8), (4, 2, 16), (4, 2, 16)), False, "head dim 8"),
        (((2, 2, 8), (4, 2, 8), (5, 2, 8)), False, "one shape"),
        (((1, 2, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), False, "drop the batch"),
    ],
)
def test_contract_violations_raise_value_error(shapes, causal, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ReferenceKernel().forward(q, k, v, causal=causal)


# ---------------------------------------------------------------- reference specifics


@pytest.mark.parametrize("causal", [True, False])
def test_reference_row_chunking_is_exact(causal):
    q, k, v = rand_qkv(23, 31, 4, 2, d=16, seed=5, device="cpu")
    whole = ReferenceKernel().forward(q, k, v, causal=causal)
    for budget in (1, 4 * 31 * 3, 4 * 31 * 7 + 5):  # 1 row, 3 rows, 7 rows per chunk
        chunked = ReferenceKernel(score_budget_elements=budget).forward(q, k, v, causal=causal)
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    check(ReferenceKernel(score_budget_elements=1), q, k, v, causal)


def test_reference_keeps_float64_inputs_in_float64():
    q, k, v = rand_qkv(6, 9, 2, 1, d=8, device="cpu", dtype=torch.float64)
    o, lse = ReferenceKernel().forward(q, k, v, causal=True)
    o_ref, lse_ref = naive_attention(q, k, v, causal=True)
    assert o.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=1e-6)


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


# ---------------------------------------------------------------- selection


def test_cpu_gets_the_reference_kernel(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    assert available_kernels("cpu") == ["reference"]
    assert isinstance(select_kernel("cpu"), ReferenceKernel)
    assert isinstance(select_kernel(torch.device("cpu"), "reference"), ReferenceKernel)


@pytest.mark.parametrize("name", ["sdpa", "flash4", "flash2"])
def test_naming_an_unavailable_kernel_says_why_and_what_is_available(monkeypatch, name):
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=rf"'{name}' cannot run on cpu: needs a CUDA device.*"
                                         r"\['auto', 'reference'\]"):
        select_kernel("cpu", name)


def test_unknown_kernel_names_list_the_choices():
    with pytest.raises(ValueError, match=r"'flash3'.*'auto', 'reference', 'sdpa', 'flash4'"):
        select_kernel("cpu", "flash3")


def test_environment_variable_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV_VAR, "sdpa")
    with pytest.raises(ValueError, match="'sdpa' cannot run on cpu"):
        select_kernel("cpu")
    assert isinstance(select_kernel("cpu", "reference"), ReferenceKernel)
    monkeypatch.setenv(KERNEL_ENV_VAR, "reference")
    assert isinstance(select_kernel("cpu"), ReferenceKernel)


def test_flash_kernels_are_refused_for_float32(monkeypatch):
    monkeypatch.setattr(FlashAttn4Kernel, "unavailable_reason", classmethod(lambda cls, d: None))
    assert isinstance(select_kernel("cpu", "flash4", dtype=torch.bfloat16), FlashAttn4Kernel)
    with pytest.raises(ValueError, match="'flash4'.*float16 or bfloat16, not torch.float32"):
        select_kernel("cpu", "flash4", dtype=torch.float32)


def test_attention_package_never_imports_ray():
    for path in Path(attention_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "ray" or n.startswith("ray.") for n in names), path
