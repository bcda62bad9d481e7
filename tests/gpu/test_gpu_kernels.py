"""Split attention on the GPU kernels: bf16 within tolerance of unsplit, fp32 exact."""
import pytest
import torch

from fapool.attention import available_kernels, select_kernel, split_decode, split_prefill

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parts", [1, 2, 4, 33])
def test_split_equals_unsplit_on_gpu(dtype, parts):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kernel = select_kernel(DEV, "auto", dtype=dtype)
    g = torch.Generator(device="cuda").manual_seed(parts)
    n, hq, hkv, d = 3000, 32, 8, 128
    q = torch.randn(n, hq, d, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(n, hkv, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(n, hkv, d, device=DEV, dtype=dtype, generator=g)
    ref, ref_lse = kernel.forward(q, k, v, causal=True)
    out, lse = split_prefill(kernel, q, k, v, parts)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
    o1, l1 = split_decode(kernel, q[-1:], k, v, parts)
    r1, rl1 = kernel.forward(q[-1:], k, v, causal=True)
    torch.testing.assert_close(o1.float(), r1.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(l1, rl1, rtol=1e-3, atol=1e-3)


def test_every_available_kernel_agrees_in_fp16():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    names = available_kernels(DEV)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(700, 16, 128, device=DEV, dtype=torch.float16, generator=g)
    k = torch.randn(900, 4, 128, device=DEV, dtype=torch.float16, generator=g)
    v = torch.randn(900, 4, 128, device=DEV, dtype=torch.float16, generator=g)
    ref, ref_lse = select_kernel(DEV, "reference").forward(q, k, v, causal=True)
    for name in names:
        out, lse = select_kernel(DEV, name, dtype=torch.float16).forward(q, k, v, causal=True)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2, msg=name)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3, msg=name)
