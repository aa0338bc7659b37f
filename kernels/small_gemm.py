"""Register-tiled products of small matrices for Numba kernels: C = bias + A1 B1 (+ A2 B2).

Shape letters: M rows of the output, K the reduced axis (K1, K2 per term), H output width,
L vector lanes (kernels/simd.py: 8 float32 or 4 float64).

Op (Numba-callable, unchecked; the caller guarantees shapes and dtypes):
    gemm(A1, B1, A2, B2, two, bias, use_bias, C)
        C (M, H) <- [bias (H,) if use_bias] + A1 (M, K1) @ B1 (K1, H) [+ A2 (M, K2) @ B2 (K2, H)
        if two]. A1, A2 any layout (read one scalar at a time, so a transposed view works);
        B1, B2, C C-contiguous; C must not overlap the inputs (it is overwritten).
Reference: plain NumPy, bias + A1 @ B1 + A2 @ B2 (tests/test_small_gemm.py).

How: a 2-row by 4-vector block of C (8 vector accumulators) stays in registers for the
whole reduction; each step loads 4 vectors of one B row and multiplies them by two
broadcast scalars of A (8 fused multiply-adds per 4 loads). Leftover vectors of a row go
through a 2-row by 1-vector block, leftover columns (H mod L) through a scalar loop over k
with two partial sums per output (k even, k odd) for both rows at once. An odd last row is computed as a pair with
itself: C is only ever stored, never accumulated, so writing it twice is harmless.
Rounding: each output is a sum over k in increasing k (term 1, then term 2), one fused
multiply-add per product, starting from the bias; the scalar tail sums even and odd k
apart (and term 1 and term 2 apart), adding the partial sums at the end.
"""
from numba import njit

from metacore.kernels.simd import vfma, vload, vsplat, vstore, vzero


@njit(cache=True)
def _block_2x4(A, B, m, m1, h, L, c00, c01, c02, c03, c10, c11, c12, c13):
    """Accumulate A[m|m1, :] @ B[:, h : h + 4L] into eight vectors."""
    for k in range(A.shape[1]):
        s0 = vsplat(A[m, k])
        s1 = vsplat(A[m1, k])
        row = B[k]
        w0 = vload(row, h)
        w1 = vload(row, h + L)
        w2 = vload(row, h + 2 * L)
        w3 = vload(row, h + 3 * L)
        c00 = vfma(s0, w0, c00)
        c01 = vfma(s0, w1, c01)
        c02 = vfma(s0, w2, c02)
        c03 = vfma(s0, w3, c03)
        c10 = vfma(s1, w0, c10)
        c11 = vfma(s1, w1, c11)
        c12 = vfma(s1, w2, c12)
        c13 = vfma(s1, w3, c13)
    return c00, c01, c02, c03, c10, c11, c12, c13


@njit(cache=True)
def _block_2x1(A, B, m, m1, h, c0, c1):
    """Accumulate A[m|m1, :] @ B[:, h : h + L] into two vectors."""
    for k in range(A.shape[1]):
        w = vload(B[k], h)
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
def gemm(A1, B1, A2, B2, two, bias, use_bias, C):
    """C <- [bias] + A1 @ B1 [+ A2 @ B2] (module docstring)."""
    M, H = C.shape
    L = 32 // C.itemsize
    zero = C.dtype.type(0)
    for m in range(0, M, 2):
        m1 = m + 1 if m + 1 < M else m
        r0, r1 = C[m], C[m1]
        h = 0
        while h + 4 * L <= H:
            if use_bias:
                c00, c01 = vload(bias, h), vload(bias, h + L)
                c02, c03 = vload(bias, h + 2 * L), vload(bias, h + 3 * L)
            else:
                c00 = c01 = c02 = c03 = vzero(r0)
            c10, c11, c12, c13 = c00, c01, c02, c03
            c00, c01, c02, c03, c10, c11, c12, c13 = _block_2x4(
                A1, B1, m, m1, h, L, c00, c01, c02, c03, c10, c11, c12, c13)
            if two:
                c00, c01, c02, c03, c10, c11, c12, c13 = _block_2x4(
                    A2, B2, m, m1, h, L, c00, c01, c02, c03, c10, c11, c12, c13)
            vstore(r0, h, c00)
            vstore(r0, h + L, c01)
            vstore(r0, h + 2 * L, c02)
            vstore(r0, h + 3 * L, c03)
            vstore(r1, h, c10)
            vstore(r1, h + L, c11)
            vstore(r1, h + 2 * L, c12)
            vstore(r1, h + 3 * L, c13)
            h += 4 * L
        while h + L <= H:
            c0 = vload(bias, h) if use_bias else vzero(r0)
            c1 = c0
            c0, c1 = _block_2x1(A1, B1, m, m1, h, c0, c1)
            if two:
                c0, c1 = _block_2x1(A2, B2, m, m1, h, c0, c1)
            vstore(r0, h, c0)
            vstore(r1, h, c1)
            h += L
        while h < H:
            b = bias[h] if use_bias else zero
            s0, s1 = _column_pair(A1, B1, m, m1, h)
            if two:
                t0, t1 = _column_pair(A2, B2, m, m1, h)
                s0, s1 = s0 + t0, s1 + t1
            r0[h] = b + s0
            r1[h] = b + s1
            h += 1
