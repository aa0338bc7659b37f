"""BLAS thread control: set, read back, restore; refuse nonsense."""
import numpy as np
import pytest

from metacore.blas import blas_threads, get_blas_threads, set_blas_threads


def test_set_and_restore():
    before = get_blas_threads()
    if before is None:
        pytest.skip("no OpenBLAS found in this process (NumPy linked against another BLAS)")
    with blas_threads(1):
        assert get_blas_threads() == 1
        a = np.arange(12.0).reshape(3, 4)
        np.testing.assert_array_equal(a @ a.T, np.einsum("ik,jk->ij", a, a))
    assert get_blas_threads() == before
    assert set_blas_threads(before) == before


@pytest.mark.parametrize("n", [0, -1, 1.5, "2"])
def test_bad_thread_counts(n):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        set_blas_threads(n)
