"""Float64 attention and the checks every kernel test shares."""
from __future__ import annotations

import math

import torch

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


SHAPES = [  # (Tq, Tk, Hq, Hkv, causal)
    (1, 1, 2, 2, True), (1, 37, 4, 1, True), (1, 37, 4, 2, False), (9, 9, 2, 2, True),
    (9, 40, 4, 2, True), (9, 40, 4, 4, False), (33, 70, 8, 2, True), (70, 33, 4, 1, False),
    (64, 64, 4, 1, True),
]
