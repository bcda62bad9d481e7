"""The Triton kernels of `triton_decode` (imported only when that kernel is switched on, so a
process that never uses it never loads Triton)."""
import triton
import triton.language as tl


@triton.jit
def partial_kernel(
    Q, K, V, STARTS, LENGTHS, O_PART, L_PART,
    stride_qb, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_ls,
    scale_log2, chunk,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    start = tl.load(STARTS + b)
    length = tl.load(LENGTHS + b)
    lo = s * chunk
    hi = tl.minimum(lo + chunk, length)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    qf = q.to(tl.float32) * scale_log2  # base-2 softmax: exp2 is the fast path
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        rows = start + offs_n
        k = tl.load(K + rows[:, None] * stride_kr + kvh * stride_kh + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(V + rows[:, None] * stride_vr + kvh * stride_vh + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        if USE_DOT:
            if IEEE:
                sc = tl.dot(qf, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:  # q as stored, scaled after the fp32 accumulate (rounding it scaled would add error)
                sc = tl.dot(q, tl.trans(k)) * scale_log2
        else:
            sc = tl.sum(qf[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        sc = tl.where(n_mask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        p = tl.exp2(sc - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m = m_new
    # An empty chunk (past a short sequence's end) leaves l == 0: out 0, lse -inf.
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptr = O_PART + b * stride_ob + s * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptr, out, mask=g_mask[:, None])
    tl.store(L_PART + b * stride_lb + s * stride_ls + heads, lse, mask=g_mask)

@triton.jit
def merge_kernel(
    O_PART, L_PART, OUT, LSE, num_splits,
    stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh,
    stride_outb, stride_outh, stride_lse_h,
    BLOCK_S: tl.constexpr, D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < num_splits
    lse = tl.load(L_PART + b * stride_lb + offs_s * stride_ls + h * stride_lh, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    finite = top > float("-inf")
    w = tl.exp(lse - tl.where(finite, top, 0.0))  # masked and empty chunks: exp(-inf) = 0
    denom = tl.sum(w, axis=0)
    o = tl.load(O_PART + b * stride_ob + offs_s[:, None] * stride_os + h * stride_oh + offs_d[None, :],
                mask=s_mask[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(finite, denom, 1.0)
    tl.store(OUT + b * stride_outb + h * stride_outh + offs_d, out.to(OUT.dtype.element_ty))
    tl.store(LSE + h * stride_lse_h + b, tl.where(finite, top + tl.log(tl.where(finite, denom, 1.0)), float("-inf")))
