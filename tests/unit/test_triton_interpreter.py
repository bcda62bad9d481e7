"""The Triton decode kernels' logic on CPU, in Triton's interpreter (the GPU tests run them compiled).

The interpreter is set up by an environment variable read at import, so the check runs in a
subprocess. Its numpy-backed dot product cannot multiply bfloat16, so grouped heads are checked
in float32 and float16 here and in bfloat16 on the GPU.
"""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9):
    # Older interpreters index with 1-element numpy arrays, which numpy 2 refuses.
    pytest.skip(f"Triton {triton.__version__}'s interpreter fails on loops with run-time bounds; "
                "tests/gpu runs the kernels compiled", allow_module_level=True)

SCRIPT = textwrap.dedent("""
    import torch
    from fapool.attention.merge import merge_stacked
    from fapool.attention.reference import ReferenceKernel
    from fapool.attention.triton_decode import SplitPlan, _merge, decode_split_kv

    torch.manual_seed(0)
    cases = [(torch.float32, 4, 4), (torch.float32, 8, 2), (torch.float16, 8, 2),
             (torch.float16, 4, 4), (torch.bfloat16, 4, 4)]
    for dtype, hq, hkv in cases:
        d = 32
        ka, va = torch.randn(3000, hkv, d).to(dtype), torch.randn(3000, hkv, d).to(dtype)
        starts, lengths = [10, 900, 2000], [700, 1, 999]
        q = torch.randn(3, hq, d).to(dtype)
        ref_o, ref_l = ReferenceKernel().decode_varlen(q.double(), ka.double(), va.double(), starts, lengths)
        for target in (40, 1):  # several chunks per sequence (some empty), and one each
            plan = SplitPlan.build(starts, lengths, hkv, torch.device("cpu"), target_programs=target)
            o, lse = decode_split_kv(q, ka, va, plan, d ** -0.5)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert o.dtype == dtype and o.shape == q.shape and lse.shape == (hq, 3)
            torch.testing.assert_close(o.double(), ref_o.to(dtype).double(), rtol=tol, atol=tol)
            torch.testing.assert_close(lse.double(), ref_l.double(), rtol=1e-4, atol=1e-4)
        assert SplitPlan.build(starts, lengths, hkv, torch.device("cpu"), target_programs=40).splits > 1
    outs, lses = torch.randn(3, 5, 4, 16), torch.randn(3, 4, 5)
    lses[:, :, 2] = float("-inf")  # a sequence no part holds: out 0, lse -inf
    lses[1, :, 3] = float("-inf")
    ref, ref_lse = merge_stacked(outs, lses)
    got, got_lse = _merge(outs.transpose(0, 1), lses.permute(2, 1, 0), outs.dtype)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse, ref_lse)
    assert torch.isneginf(got_lse[:, 2]).all() and (got[2] == 0).all()
    print("ok")
""")


def test_triton_decode_kernels_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-3000:] + res.stderr[-3000:]
