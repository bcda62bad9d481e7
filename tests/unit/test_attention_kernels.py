"""Every attention kernel usable here honours the contract, and kernel selection. The CUDA
kernels' composition logic, on CPU, is `test_sdpa_logic.py`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import fapool.attention as attention_pkg
from fapool.attention import (
    KERNELS,
    FlashAttn4Kernel,
    ReferenceKernel,
    available_kernels,
    select_kernel,
)
from tests.helpers.attention import DEVICE, SHAPES, check, naive_attention, rand_qkv


def kernel_cases():
    """(kernel name, dtype) for every kernel that can run on this machine's device."""
    cases = []
    for name in available_kernels(DEVICE):
        dtypes = [] if name in ("flash4", "flash2") else [torch.float32]
        if DEVICE.type == "cuda":
            dtypes += [torch.bfloat16, torch.float16]
        cases += [pytest.param(name, dt, id=f"{name}-{str(dt)[6:]}") for dt in dtypes]
    return cases


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


# ---------------------------------------------------------------- selection


def test_cpu_gets_the_reference_kernel():
    assert available_kernels("cpu") == ["reference"]
    assert isinstance(select_kernel("cpu"), ReferenceKernel)
    assert isinstance(select_kernel(torch.device("cpu"), "reference"), ReferenceKernel)


@pytest.mark.parametrize("name", ["sdpa", "flash4", "flash2"])
def test_naming_an_unavailable_kernel_says_why_and_what_is_available(name):
    with pytest.raises(ValueError, match=rf"'{name}' cannot run on cpu: needs a CUDA device.*"
                                         r"\['auto', 'reference'\]"):
        select_kernel("cpu", name)


def test_unknown_kernel_names_list_the_choices():
    with pytest.raises(ValueError, match=r"'flash3'.*'auto', 'reference', 'sdpa', 'flash4'"):
        select_kernel("cpu", "flash3")


def test_the_kernel_is_a_setting_with_a_flag_not_an_environment_variable(monkeypatch):
    from fapool.config import ATTENTION_KERNELS
    from serve.options import ServeOptions

    assert ATTENTION_KERNELS == ("auto", *KERNELS)  # the flag's choices are the kernels
    monkeypatch.setenv("FAPOOL_ATTENTION_KERNEL", "sdpa")  # read by nothing any more
    assert isinstance(select_kernel("cpu"), ReferenceKernel)
    cfg = ServeOptions(attention_kernel="reference").cluster_config()
    assert cfg.engine.attention_kernel == "reference"


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
