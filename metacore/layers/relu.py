"""ReLU, y = max(x, 0), elementwise on any shape (T, ...).

Its second derivative is zero almost everywhere, so the R-operator only gates R{x} and R{dy}
by the same mask as the forward and backward pass. At x = 0 exactly the derivative is taken
as 0 (the mask is x > 0)."""


def relu_forward(x):
    """x: (T, ...) -> y: (T, ...); cache = mask (x > 0), a bool array like x."""
    mask = x > 0
    return x * mask, mask


def relu_backward(dy, mask):
    """dx = dy * [x > 0]."""
    return dy * mask


def relu_rforward(rx, mask):
    """R{y} = R{x} * [x > 0]; rcache is None (nothing new is needed by rbackward)."""
    return rx * mask, None


def relu_rbackward(dy, rdy, mask, rcache=None):
    """R{dx} = R{dy} * [x > 0]   (the term dy * R{[x > 0]} is 0 almost everywhere)."""
    return rdy * mask
