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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_equals_eager(dtype):
    """Decode steps and prompt chunks replayed from CUDA graph segments give the eager engine's
    tokens. Decode batches of 1 and 4 fill their bucket exactly; the prompts (302 tokens) are padded
    to the 512-token bucket."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fapool import EngineConfig, LLMEngine, SamplingParams

    prompts = [[(7 * i + j) % 250 + 3 for j in range(20 + 37 * i)] for i in range(4)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    # sdpa: a kernel that does not read pages itself, so decode runs as graph segments around it.
    cfg = EngineConfig(model="tiny", device="cuda", dtype=dtype, kv_capacity_tokens=1 << 16, attention_kernel="sdpa")
    eager = LLMEngine(cfg.replace(cuda_graphs=False))
    graphed = LLMEngine(cfg)
    assert graphed.runner.graphs is not None
    want = [c.token_ids for c in eager.generate(prompts, params)]
    assert [c.token_ids for c in graphed.generate(prompts, params)] == want
    assert [graphed.generate([p], params)[0].token_ids for p in prompts] == want
    assert graphed.runner.graphs.runs[512] and graphed.runner.graphs.runs[4]  # the prompts' step and the decodes' ran graphed


def test_varlen_decode_equals_one_call_per_sequence():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fapool.attention.base import AttentionKernel

    kernel = select_kernel(DEV, "sdpa", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    arena_k = torch.randn(50000, 8, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    arena_v = torch.randn_like(arena_k)
    q = torch.randn(5, 32, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    starts, lengths = [30000, 100, 9000, 20000, 45000], [7000, 3, 8000, 1, 4999]  # out of order, gaps
    assert kernel.varlen_plan(starts, lengths, 8, DEV) is not None  # this batch takes the varlen op
    out, lse = kernel.decode_varlen(q, arena_k, arena_v, starts, lengths)
    ref, ref_lse = AttentionKernel.decode_varlen(kernel, q, arena_k, arena_v, starts, lengths)
    assert kernel._varlen_ok, "the varlen flash op was refused"
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
