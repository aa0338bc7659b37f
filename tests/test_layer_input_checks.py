"""Bad input to the layer and loss functions: an error naming the op, the argument, and the
expected and received shape or dtype, before any arithmetic."""
import numpy as np
import pytest

from metacore.layers import batchnorm as bn
from metacore.layers import conv2d as cv
from metacore.layers import linear as ln
from metacore.layers import maxpool as mp
from metacore.losses import bce_logits, mse, softmax_ce

z = np.zeros


def test_linear_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"linear: w must have shape \(2, 4, \*\), got \(2, 3, 5\)"):
        ln.linear_forward(z((2, 3, 4)), z((2, 3, 5)), z((2, 5)))
    with pytest.raises(ValueError, match=r"linear: b must have shape \(2, 5\), got \(5,\)"):
        ln.linear_forward(z((2, 3, 4)), z((2, 4, 5)), z(5))
    with pytest.raises(TypeError, match=r"linear: w has dtype float32, expected float64"):
        ln.linear_forward(z((2, 3, 4)), z((2, 4, 5), np.float32), z((2, 5)))
    with pytest.raises(TypeError, match=r"linear: x must be float32 or float64, got dtype int64"):
        ln.linear_forward(z((2, 3, 4), np.int64), z((2, 4, 5)), z((2, 5)))
    y, cache = ln.linear_forward(z((2, 3, 4)), z((2, 4, 5)), z((2, 5)))
    with pytest.raises(ValueError, match=r"linear backward: dy must have shape \(2, 3, 5\)"):
        ln.linear_backward(z((2, 3, 4)), cache)
    with pytest.raises(ValueError, match=r"linear rforward: rw must have the shape of w"):
        ln.linear_rforward(None, z((2, 5, 4)), z((2, 5)), cache)


def test_conv2d_shapes():
    with pytest.raises(ValueError, match=r"conv2d: x must have 5 dimensions, got shape \(2, 8, 8, 1\)"):
        cv.conv2d_forward(z((2, 8, 8, 1)), z((2, 3, 3, 1, 4)), z((2, 4)))
    with pytest.raises(ValueError, match=r"conv2d: w must have shape \(2, 3, 3, 1, \*\), got \(2, 3, 3, 2, 4\)"):
        cv.conv2d_forward(z((2, 1, 8, 8, 1)), z((2, 3, 3, 2, 4)), z((2, 4)))
    with pytest.raises(ValueError, match=r"conv2d: stride must be 1 or 2, got 3"):
        cv.conv2d_forward(z((2, 1, 8, 8, 1)), z((2, 3, 3, 1, 4)), z((2, 4)), stride=3)
    y, cache = cv.conv2d_forward(z((2, 1, 8, 8, 1)), z((2, 3, 3, 1, 4)), z((2, 4)), stride=2)
    with pytest.raises(ValueError, match=r"conv2d backward: dy must have shape \(2, 1, 4, 4, 4\)"):
        cv.conv2d_backward(z((2, 1, 8, 8, 4)), cache)


def test_batchnorm_and_maxpool():
    with pytest.raises(ValueError, match=r"batchnorm: gamma must have shape \(2, 3\), got \(3,\)"):
        bn.batchnorm_forward(z((2, 4, 3)), z(3), z((2, 3)))
    with pytest.raises(ValueError, match=r"at least 3 dimensions, got \(4, 3\)"):
        bn.batchnorm_forward(z((4, 3)), z((4, 3)), z((4, 3)))
    with pytest.raises(ValueError, match=r"running_var has a negative entry"):
        bn.batchnorm_running_forward(z((1, 2, 3)), z((1, 3)), z((1, 3)), z((1, 3)),
                                     -np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"maxpool2d: needs H, W >= 2, got input shape \(1, 1, 1, 4, 1\)"):
        mp.maxpool_forward(z((1, 1, 1, 4, 1)))


def test_losses():
    with pytest.raises(ValueError, match=r"mse: target must have shape \(2, 3, 1\), got \(2, 3\)"):
        mse.mse_forward(z((2, 3, 1)), z((2, 3)))
    with pytest.raises(ValueError, match=r"mse: target contains 1 non-finite"):
        mse.mse_forward(z((1, 1, 1)), np.full((1, 1, 1), np.nan))
    with pytest.raises(ValueError, match=r"softmax_ce: labels has value -1 below the allowed minimum 0"):
        softmax_ce.softmax_ce_forward(z((1, 2, 3)), np.array([[0, -1]]))
    with pytest.raises(ValueError, match=r"softmax_ce: labels must have shape \(1, 2\), got \(2,\)"):
        softmax_ce.softmax_ce_forward(z((1, 2, 3)), np.array([0, 1]))
    with pytest.raises(TypeError, match=r"bce_logits: target has dtype float32, expected float64"):
        bce_logits.bce_logits_forward(z((1, 2)), z((1, 2), np.float32))
