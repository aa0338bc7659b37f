"""Register-tiled products of small matrices for Numba kernels: C = bias + A1 B1 (+ A2 B2).

Shape letters: M rows of the output, K the reduced axis (K1, K2 per term), H output width,
L vector lanes (kernels/simd.py: 8 float32 or 4 float64).

Op (Numba-callable, unchecked; the caller guarantees shapes and dtypes):
    gemm(A1, B1, A2, B2, two, bias, use_bias, C)
        C (M, H) <- [bias (H,) if use_bias] + A1 (M, K1) @ B1 (K1, H) [+ A2 (M, K2) @ B2 (K2, H)
        if two]. A1, A2 any layout (read one scalar at a time, so a transposed view works);
        B1, B2, C C-contiguous; C must not overlap the inputs (it is overwritten).
    gemv(A1, b1, A2, b2, two, bias, use_bias, c)
        the one-column case: c (M,) <- [bias (scalar)] + A1 (M, K1) @ b1 (K1,) [+ A2 @ b2];
        A1, A2 C-contiguous (their rows are loaded as vectors), b1, b2, c 1-D C-contiguous.
Reference: plain NumPy, bias + A1 @ B1 + A2 @ B2 (tests/test_small_gemm.py).

How: a 4-row by 5-vector block of C (20 vector accumulators) stays in registers for the
whole reduction; each step loads 5 vectors of one B row and multiplies them by four
broadcast scalars of A (20 fused multiply-adds per 5 loads; 5 vectors = the 40-wide rows
of the sinusoid net in float32). Rows left over go through 2-row by 5-vector blocks,
leftover vectors of a row through 2-row by 1-vector blocks, leftover columns (H mod L)
through a scalar loop over k with two partial sums per output (k even, k odd) for both
rows at once. K = 1 (outer products, e.g. a 1-input first layer) skips the tiling: one
vector multiply-add per output vector. An odd last row is computed as a pair with itself:
C is only ever stored, never accumulated, so writing it twice is harmless. Loads and
stores address the 2-D arrays directly (simd.vload2 / vstore2): a row view would cost two
reference-count updates.
Rounding: each output is a sum over k in increasing k (term 1, then term 2), one fused
multiply-add per product, starting from the bias; the scalar tail sums even and odd k
apart (and term 1 and term 2 apart), adding the partial sums at the end.
"""
from numba import njit

from .simd import vfma, vload, vload2, vsplat, vstore2, vsum, vzero


@njit(cache=True)
def _block_4x5(A, B, m, h, L, c):
    """Accumulate A[m : m + 4, :] @ B[:, h : h + 5L] into c, 20 vectors: c[5 i + j] is row
    m + i, vector j."""
    (c00, c01, c02, c03, c04, c10, c11, c12, c13, c14,
     c20, c21, c22, c23, c24, c30, c31, c32, c33, c34) = c
    for k in range(A.shape[1]):
        w0, w1, w2 = vload2(B, k, h), vload2(B, k, h + L), vload2(B, k, h + 2 * L)
        w3, w4 = vload2(B, k, h + 3 * L), vload2(B, k, h + 4 * L)
        s = vsplat(A[m, k])
        c00, c01, c02 = vfma(s, w0, c00), vfma(s, w1, c01), vfma(s, w2, c02)
        c03, c04 = vfma(s, w3, c03), vfma(s, w4, c04)
        s = vsplat(A[m + 1, k])
        c10, c11, c12 = vfma(s, w0, c10), vfma(s, w1, c11), vfma(s, w2, c12)
        c13, c14 = vfma(s, w3, c13), vfma(s, w4, c14)
        s = vsplat(A[m + 2, k])
        c20, c21, c22 = vfma(s, w0, c20), vfma(s, w1, c21), vfma(s, w2, c22)
        c23, c24 = vfma(s, w3, c23), vfma(s, w4, c24)
        s = vsplat(A[m + 3, k])
        c30, c31, c32 = vfma(s, w0, c30), vfma(s, w1, c31), vfma(s, w2, c32)
        c33, c34 = vfma(s, w3, c33), vfma(s, w4, c34)
    return (c00, c01, c02, c03, c04, c10, c11, c12, c13, c14,
            c20, c21, c22, c23, c24, c30, c31, c32, c33, c34)


@njit(cache=True)
def _block_2x5(A, B, m, m1, h, L, c):
    """Accumulate A[m|m1, :] @ B[:, h : h + 5L] into c, 10 vectors (row m, then row m1)."""
    c00, c01, c02, c03, c04, c10, c11, c12, c13, c14 = c
    for k in range(A.shape[1]):
        w0, w1, w2 = vload2(B, k, h), vload2(B, k, h + L), vload2(B, k, h + 2 * L)
        w3, w4 = vload2(B, k, h + 3 * L), vload2(B, k, h + 4 * L)
        s = vsplat(A[m, k])
        c00, c01, c02 = vfma(s, w0, c00), vfma(s, w1, c01), vfma(s, w2, c02)
        c03, c04 = vfma(s, w3, c03), vfma(s, w4, c04)
        s = vsplat(A[m1, k])
        c10, c11, c12 = vfma(s, w0, c10), vfma(s, w1, c11), vfma(s, w2, c12)
        c13, c14 = vfma(s, w3, c13), vfma(s, w4, c14)
    return c00, c01, c02, c03, c04, c10, c11, c12, c13, c14


@njit(cache=True)
def _block_2x1(A, B, m, m1, h, c0, c1):
    """Accumulate A[m|m1, :] @ B[:, h : h + L] into two vectors."""
    for k in range(A.shape[1]):
        w = vload2(B, k, h)
        c0 = vfma(vsplat(A[m, k]), w, c0)
        c1 = vfma(vsplat(A[m1, k]), w, c1)
    return c0, c1


@njit(cache=True, fastmath={"contract"})
def _column_pair(A, B, m, m1, h):
    """(A[m, :] @ B[:, h], A[m1, :] @ B[:, h]), each summed as (even k) + (odd k): four
    independent multiply-add chains in one loop."""
    zero = B.dtype.type(0)
    e0, o0, e1, o1 = zero, zero, zero, zero
    K = A.shape[1]
    k = 0
    while k + 1 < K:
        b0, b1 = B[k, h], B[k + 1, h]
        e0 += A[m, k] * b0
        o0 += A[m, k + 1] * b1
        e1 += A[m1, k] * b0
        o1 += A[m1, k + 1] * b1
        k += 2
    if k < K:
        e0 += A[m, k] * B[k, h]
        e1 += A[m1, k] * B[k, h]
    return e0 + o0, e1 + o1


@njit(cache=True)
def _start(bias, use_bias, h, L):
    """The 5 vectors an output block starts from: bias[h : h + 5L], or zeros."""
    if use_bias:
        return (vload(bias, h), vload(bias, h + L), vload(bias, h + 2 * L),
                vload(bias, h + 3 * L), vload(bias, h + 4 * L))
    z = vzero(bias)
    return z, z, z, z, z


@njit(cache=True)
def _store5(C, m, h, L, c0, c1, c2, c3, c4):
    vstore2(C, m, h, c0)
    vstore2(C, m, h + L, c1)
    vstore2(C, m, h + 2 * L, c2)
    vstore2(C, m, h + 3 * L, c3)
    vstore2(C, m, h + 4 * L, c4)


@njit(cache=True)
def _rows2(A1, B1, A2, B2, two, bias, use_bias, C, m, m1, h):
    """Rows m and m1 of C from column h on: 2 x 5-vector blocks, then single vectors, then
    scalar columns."""
    H = C.shape[1]
    L = 32 // C.itemsize
    zero = C.dtype.type(0)
    while h + 5 * L <= H:
        b = _start(bias, use_bias, h, L)
        c = _block_2x5(A1, B1, m, m1, h, L, b + b)
        if two:
            c = _block_2x5(A2, B2, m, m1, h, L, c)
        _store5(C, m, h, L, c[0], c[1], c[2], c[3], c[4])
        _store5(C, m1, h, L, c[5], c[6], c[7], c[8], c[9])
        h += 5 * L
    while h + L <= H:
        c0 = vload(bias, h) if use_bias else vzero(bias)
        c0, c1 = _block_2x1(A1, B1, m, m1, h, c0, c0)
        if two:
            c0, c1 = _block_2x1(A2, B2, m, m1, h, c0, c1)
        vstore2(C, m, h, c0)
        vstore2(C, m1, h, c1)
        h += L
    while h < H:
        b0 = bias[h] if use_bias else zero
        s0, s1 = _column_pair(A1, B1, m, m1, h)
        if two:
            t0, t1 = _column_pair(A2, B2, m, m1, h)
            s0, s1 = s0 + t0, s1 + t1
        C[m, h] = b0 + s0
        C[m1, h] = b0 + s1
        h += 1


@njit(cache=True)
def _outer(A1, B1, A2, B2, two, bias, use_bias, C):
    """The K = 1 case (outer products): C[m] <- [bias] + A1[m, 0] B1[0] [+ A2[m, 0] B2[0]],
    one vector at a time; H a multiple of L."""
    M, H = C.shape
    L = 32 // C.itemsize
    for m in range(M):
        s1 = vsplat(A1[m, 0])
        s2 = vsplat(A2[m, 0]) if two else s1
        for h in range(0, H, L):
            c = vload(bias, h) if use_bias else vzero(bias)
            c = vfma(s1, vload2(B1, 0, h), c)
            if two:
                c = vfma(s2, vload2(B2, 0, h), c)
            vstore2(C, m, h, c)


@njit(cache=True)
def gemm(A1, B1, A2, B2, two, bias, use_bias, C):
    """C <- [bias] + A1 @ B1 [+ A2 @ B2] (module docstring)."""
    M, H = C.shape
    L = 32 // C.itemsize
    if H % L == 0 and A1.shape[1] == 1 and (not two or A2.shape[1] == 1):
        _outer(A1, B1, A2, B2, two, bias, use_bias, C)     # K = 1: no reduction to tile
        return
    m = 0
    while m + 3 < M:                     # four rows at a time, 5 vectors wide
        h = 0
        while h + 5 * L <= H:
            b = _start(bias, use_bias, h, L)
            c = _block_4x5(A1, B1, m, h, L, b + b + b + b)
            if two:
                c = _block_4x5(A2, B2, m, h, L, c)
            _store5(C, m, h, L, c[0], c[1], c[2], c[3], c[4])
            _store5(C, m + 1, h, L, c[5], c[6], c[7], c[8], c[9])
            _store5(C, m + 2, h, L, c[10], c[11], c[12], c[13], c[14])
            _store5(C, m + 3, h, L, c[15], c[16], c[17], c[18], c[19])
            h += 5 * L
        if h < H:                        # the columns left over, as two pairs of rows
            _rows2(A1, B1, A2, B2, two, bias, use_bias, C, m, m + 1, h)
            _rows2(A1, B1, A2, B2, two, bias, use_bias, C, m + 2, m + 3, h)
        m += 4
    while m < M:                         # then pairs; an odd last row pairs with itself
        _rows2(A1, B1, A2, B2, two, bias, use_bias, C, m, min(m + 1, M - 1), 0)
        m += 2


@njit(cache=True, fastmath={"contract"})
def _dot2(A, m, m1, b):
    """(A[m, :] . b, A[m1, :] . b), b (K,): whole vectors in one vector accumulator per row
    (lanes summed by vsum), the K mod L tail added after in order. Two rows at once, so
    that two independent chains share each load of b."""
    K = b.shape[0]
    L = 32 // b.itemsize
    acc0 = vzero(b)
    acc1 = acc0
    k = 0
    while k + L <= K:
        w = vload(b, k)
        acc0 = vfma(vload2(A, m, k), w, acc0)
        acc1 = vfma(vload2(A, m1, k), w, acc1)
        k += L
    s0, s1 = vsum(acc0), vsum(acc1)
    while k < K:
        s0 += A[m, k] * b[k]
        s1 += A[m1, k] * b[k]
        k += 1
    return s0, s1


@njit(cache=True)
def gemv(A1, b1, A2, b2, two, bias, use_bias, c):
    """c <- [bias] + A1 @ b1 [+ A2 @ b2] (module docstring)."""
    M = c.shape[0]
    for m in range(0, M, 2):
        m1 = min(m + 1, M - 1)           # an odd last row pairs with itself
        s0, s1 = _dot2(A1, m, m1, b1)
        if two:
            t0, t1 = _dot2(A2, m, m1, b2)
            s0, s1 = s0 + t0, s1 + t1
        if use_bias:
            s0, s1 = bias + s0, bias + s1
        c[m] = s0
        c[m1] = s1
