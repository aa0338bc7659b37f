"""kernels/simd.py (vector values for Numba) and kernels/small_gemm.py (register-tiled
C = bias + A1 B1 + A2 B2) against plain NumPy float64, on shapes that hit every block of
the tiling: full 2 x 4-vector blocks, single vectors, scalar tail columns, odd rows, K = 1.

Shape letters: M output rows, K reduced axis, H output width, L vector lanes.
"""
import numpy as np
import pytest

pytest.importorskip("numba")

from numba import njit                                                   # noqa: E402
from numba.core.errors import TypingError                                # noqa: E402

from metacore.kernels.simd import (LANES, as_flat, vadd, vfma, vload, vsplat,  # noqa: E402
                                   vstore, vsum, vtranspose, view2d, vzero)
from metacore.kernels.small_gemm import gemm, gemv                       # noqa: E402

DTYPES = [np.float32, np.float64]
# relative to max |C|: float32 sums of up to ~60 products, float64 likewise
TOL = {np.float32: 2e-6, np.float64: 1e-14}


@njit
def _lanes_demo(a, b, c, out, s):
    """out[i:i+L] = s * a + (b + c) for every vector, then out[0:L] += 0 (vzero)."""
    L = 32 // a.itemsize
    for i in range(0, a.shape[0] - L + 1, L):
        vstore(out, i, vfma(vsplat(s), vload(a, i), vadd(vload(b, i), vload(c, i))))
    vstore(out, 0, vadd(vload(out, 0), vzero(out)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_intrinsics_match_numpy(dtype):
    L = LANES[np.dtype(dtype)]
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(3 * L + 1).astype(dtype) for _ in range(3))
    out = np.full(3 * L + 1, 7.0, dtype)
    _lanes_demo(a, b, c, out, dtype(1.5))
    want = (1.5 * a.astype(np.float64) + (b.astype(np.float64) + c))[:3 * L]
    assert np.abs(out[:3 * L] - want).max() <= TOL[dtype] * np.abs(want).max()
    assert out[3 * L] == 7.0                      # the partial vector at the end untouched


def test_vector_intrinsics_refuse_wrong_types():
    @njit
    def load_int(x):
        return vload(x, 0)

    with pytest.raises((TypeError, TypingError), match="C-contiguous 1-D float32 or float64"):
        load_int(np.zeros(8, np.int64))

    @njit
    def load_2d(x):
        return vload(x, 0)

    with pytest.raises((TypeError, TypingError), match="C-contiguous 1-D"):
        load_2d(np.zeros((2, 8), np.float32))

    @njit
    def store_mixed(x, y):
        vstore(x, 0, vload(y, 0))

    with pytest.raises((TypeError, TypingError), match="Vec of float32"):
        store_mixed(np.zeros(8, np.float32), np.zeros(8, np.float64))


def _reference(A1, B1, A2, B2, two, bias, use_bias):
    C = A1.astype(np.float64) @ B1.astype(np.float64)
    if two:
        C += A2.astype(np.float64) @ B2.astype(np.float64)
    if use_bias:
        C += bias
    return C


def _shapes(dtype):
    L = LANES[np.dtype(dtype)]
    return [(10, 40, 4 * L + L),        # one 2x4 block and one single vector per row pair
            (11, 7, 8 * L + 3),         # odd rows, two 2x4 blocks, 3 tail columns
            (1, 1, L),                  # one row, K = 1, one vector
            (5, 3, 2),                  # tail columns only
            (40, 10, 1),                # a single column (the sinusoid net's output)
            (10, 1, 5 * L),             # K = 1 (outer products: a 1-input first layer)
            (2, 13, 2 * L + 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("two", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_gemm_matches_numpy(dtype, two, use_bias):
    rng = np.random.default_rng(1)
    for M, K, H in _shapes(dtype):
        K2 = K if K == 1 else K + 2                 # the second term's K differs (but
                                                    # K = 1 twice takes the outer path)
        A1 = rng.standard_normal((M, K)).astype(dtype)
        B1 = rng.standard_normal((K, H)).astype(dtype)
        A2 = rng.standard_normal((K2, M)).astype(dtype).T      # a transposed view
        B2 = rng.standard_normal((K2, H)).astype(dtype)
        bias = rng.standard_normal(H).astype(dtype)
        C = np.full((M, H), np.nan, dtype)          # every entry must be written
        gemm(A1, B1, A2, B2, two, bias, use_bias, C)
        want = _reference(A1, B1, A2, B2, two, bias, use_bias)
        err = np.abs(C - want).max() / np.abs(want).max()
        assert err <= TOL[dtype], ((M, K, H), err)


@njit
def _sum_lanes(a):
    return vsum(vload(a, 0))


@njit
def _views(buf, off, rows, cols):
    v = view2d(buf, off, rows, cols)
    v[rows - 1, cols - 1] = -1.0            # writes through to buf
    return v.copy(), as_flat(v).copy()


@njit
def _transpose(src, so, sl, dst, do, dl):
    vtranspose(src, so, sl, dst, do, dl)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vsum_views_and_transpose(dtype):
    L = LANES[np.dtype(dtype)]
    a = np.arange(1, L + 1, dtype=dtype)
    assert _sum_lanes(a) == a.sum()
    buf = np.arange(40, dtype=dtype)
    v, flat = _views(buf, 3, 4, 5)
    want = np.arange(3, 23, dtype=dtype).reshape(4, 5)
    want[3, 4] = -1
    assert np.array_equal(v, want) and np.array_equal(flat, want.ravel())
    assert buf[22] == -1                       # a view, not a copy
    src = np.arange(2 + 3 * L * L, dtype=dtype)
    dst = np.full(1 + 2 * L * L, np.nan, dtype)
    _transpose(src, 2, 3 * L, dst, 1, 2 * L)    # row strides wider than the block
    block = np.array([[src[2 + i * 3 * L + j] for j in range(L)] for i in range(L)])
    got = np.array([[dst[1 + j * 2 * L + i] for j in range(L)] for i in range(L)])
    assert np.array_equal(got, block)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("two", [False, True])
def test_gemv_matches_numpy(dtype, two):
    rng = np.random.default_rng(2)
    L = LANES[np.dtype(dtype)]
    for M, K in [(10, 5 * L), (3, 2 * L + 3), (1, 1), (7, L - 1)]:
        A1, A2 = (rng.standard_normal((M, K)).astype(dtype) for _ in range(2))
        b1, b2 = (rng.standard_normal(K).astype(dtype) for _ in range(2))
        c = np.full(M, np.nan, dtype)
        gemv(A1, b1, A2, b2, two, dtype(0.5), True, c)
        want = A1.astype(np.float64) @ b1 + 0.5 + (A2.astype(np.float64) @ b2 if two else 0)
        assert np.abs(c - want).max() <= TOL[dtype] * np.abs(want).max(), (M, K)
