"""The compiled elementwise chains (`EngineConfig.torch_compile`) compute what the eager ones do."""
import torch

from fapool import EngineConfig, LLMEngine, SamplingParams
from fapool.attention.paged import merge_splits
from fapool.model.ops import EAGER, LARGE_ROWS, compiled_ops, fused


def test_compiled_ops_equal_eager_at_every_batch_size():
    ops, g = compiled_ops(), torch.Generator().manual_seed(0)
    w = torch.randn(64, generator=g)
    for n in (1, 3, 17):  # one compiled function for every size
        x, d = torch.randn(n, 64, generator=g), torch.randn(n, 64, generator=g)
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), EAGER.rms_norm(x, w, 1e-6))
        for a, b in zip(ops.add_rms_norm(x, d, w, 1e-6), EAGER.add_rms_norm(x, d, w, 1e-6)):
            torch.testing.assert_close(a, b)
        q, k = torch.randn(n, 4, 16, generator=g), torch.randn(n, 2, 16, generator=g)
        cos, sin = torch.randn(n, 1, 16, generator=g), torch.randn(n, 1, 16, generator=g)
        for a, b in zip(ops.rotary(q, k, cos, sin), EAGER.rotary(q, k, cos, sin)):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(ops.silu_mul(x, d), EAGER.silu_mul(x, d))


def test_a_compiled_engine_gives_the_eager_engines_greedy_tokens():
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [40] * 30]
    cfg = EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=1024)
    eager = LLMEngine(cfg).generate(prompts, params)
    got = LLMEngine(cfg.replace(torch_compile=True)).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in eager]
    assert all(len(c.token_ids) == 12 for c in got)


def test_compiled_split_merge_equals_eager_with_empty_chunks():
    g = torch.Generator().manual_seed(1)
    merge = fused(merge_splits)
    for b, s in ((1, 8), (3, 2)):
        o = torch.randn(b * s, 4, 16, generator=g)
        lse = torch.randn(4, b * s, generator=g)
        rows = torch.randint(0, 3, (b * s,), generator=g)
        rows[0] = 1  # at least one chunk with rows
        for a, want in zip(merge(o, lse, rows, s), merge_splits(o, lse, rows, s)):
            torch.testing.assert_close(a, want)


def test_a_compiled_step_graph_engine_gives_the_same_tokens():
    """The step-graph path (eager on CPU) with the compiled chains, async scheduling included."""
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], [9] * 20, [11, 12]]
    cfg = EngineConfig(model="tiny", device="cpu", kv_capacity_tokens=1024, max_model_len=256)
    want = [c.token_ids for c in LLMEngine(cfg).generate(prompts, params)]
    e = LLMEngine(cfg.replace(torch_compile=True))
    e.use_step_graphs(capture=False)
    assert [c.token_ids for c in e.generate(prompts, params)] == want


def test_compiled_rotary_and_swiglu_on_the_layers_strided_views_give_the_same_bits():
    """The fused projections' output is sliced into views (row stride wider than the row); the
    compiled chains keep the row length constant, and elementwise work gives eager's exact bits."""
    ops, g = compiled_ops(), torch.Generator().manual_seed(2)
    for n in (4, 1, 9, LARGE_ROWS + 1, LARGE_ROWS + 7):  # both kernels of each (by_rows)
        gate, up = torch.randn(n, 96, generator=g).to(torch.bfloat16).chunk(2, dim=-1)
        assert torch.equal(ops.silu_mul(gate, up), EAGER.silu_mul(gate, up))
        q, k, _ = torch.randn(n, 128, generator=g).to(torch.bfloat16).split([64, 32, 32], dim=-1)
        q, k = q.view(n, 4, 16), k.view(n, 2, 16)
        cos, sin = (torch.randn(n, 1, 16, generator=g).to(torch.bfloat16) for _ in range(2))
        for a, b in zip(ops.rotary(q, k, cos, sin), EAGER.rotary(q, k, cos, sin)):
            assert torch.equal(a, b)
