"""Outer-loop optimizers written out by hand on one flat parameter vector.

Shape letters:
    P   number of parameters (the length of the flat parameter vector)

Every optimizer keeps its state in flat vectors shaped like the parameters, so one step is a
handful of whole-vector operations and a checkpoint holds the state as plain arrays.

    SGD        theta <- theta - lr * g
    Momentum   classical (heavy-ball) momentum in the form of Sutskever et al. (2013):
                   v <- mu * v - lr * g;   theta <- theta + v
               nesterov=True: Nesterov's accelerated gradient as reformulated by Bengio et al.
               (2013, "Advances in optimizing recurrent networks"), which needs the gradient at
               the stored parameters only: with the same v update,
                   theta <- theta + mu * v - lr * g
               (the stored theta is then the look-ahead point theta_true + mu * v).
    AdaGrad    diagonal AdaGrad (Duchi, Hazan & Singer 2011):
                   G <- G + g * g;   theta <- theta - lr * g / (sqrt(G) + eps)
    RMSProp    Tieleman & Hinton (2012, Coursera "Neural Networks for Machine Learning",
               lecture 6e): a running mean of squared gradients scales each coordinate,
                   v <- rho * v + (1 - rho) * g * g;   theta <- theta - lr * g / (sqrt(v) + eps)
               (no momentum, no centring, no bias correction; v starts at 0)
    Adam       Kingma & Ba (2015), Algorithm 1, with bias correction and eps outside the sqrt:
                   m <- b1 * m + (1 - b1) * g;   v <- b2 * v + (1 - b2) * g * g
                   mhat = m / (1 - b1**t);        vhat = v / (1 - b2**t)
                   theta <- theta - lr * mhat / (sqrt(vhat) + eps)

Usage:
    opt = make_optimizer("adam", size=P, dtype=np.float64, lr=1e-3)
    opt.step(params, grad)          # updates params (and the optimizer state) in place
    state = opt.state_dict()        # name -> ndarray / float / int / bool, all copies
    opt2 = make_optimizer("adam", size=P, dtype=np.float64)
    opt2.load_state_dict(state)     # hyperparameters and state restored; resume is bit-exact

state_dict() holds the hyperparameters as well as the state, so a checkpoint restores both.
Arrays go into a checkpoint's arrays, the scalars (Python float/int/bool) into its JSON meta;
Python floats survive JSON exactly, so the resumed run is bit-identical.
"""
import math
import numbers

import numpy as np

from metacore.nonfinite import check_outputs

from metacore.validate import FLOAT_DTYPES, check_float_array


def _check_hyper(op, name, value, low=None, high=None, low_open=False, high_open=True):
    """A finite real hyperparameter within [low, high) (open/closed ends as given); returns it
    as a Python float so that state_dict() stays JSON-exact."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{op}: {name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{op}: {name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


class _FlatOptimizer:
    """Shared plumbing: size/dtype checks, step-input checks, state_dict / load_state_dict.

    A subclass lists its hyperparameters (`_hyper`: name -> check), its state vectors
    (`_vectors`, each a (P,) array of the optimizer's dtype) and its integer counters
    (`_counters`), and writes `_update(params, grad)`.
    """
    name = "?"
    _hyper = {}          # name -> function(op, value) returning the checked value
    _vectors = ()        # names of (P,) state arrays
    _counters = ()       # names of int state counters

    def __init__(self, size, dtype):
        op = type(self).__name__
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
            raise ValueError(f"{op}: size must be a non-negative int, got {size!r}")
        try:
            dtype = np.dtype(dtype)
        except TypeError as e:
            raise TypeError(f"{op}: dtype must be float32 or float64, got {dtype!r}") from e
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: dtype must be float32 or float64, got {dtype}")
        self.size = int(size)
        self.dtype = dtype
        for v in self._vectors:
            setattr(self, v, np.zeros(self.size, dtype=self.dtype))   # (P,)
        for c in self._counters:
            setattr(self, c, 0)

    def _set_hyper(self, **values):
        op = type(self).__name__
        for key, check in self._hyper.items():
            setattr(self, key, check(op, values[key]))

    def step(self, params, grad, check=True):
        """One update. params (P,) is modified IN PLACE, as is the optimizer state; grad (P,)
        is only read. Returns None. params and grad must be 1-D of length P with the
        optimizer's dtype, params writeable, grad finite. check=False skips these checks
        (O(P) scans) for a caller whose arrays are right by construction, e.g. a training
        loop calling step() with the same two arrays every iteration."""
        if not check:
            self._update(params, grad)
            self._check_finite(params)
            return
        op = f"{type(self).__name__}.step"
        check_float_array(op, "params", params, shape=(self.size,), dtype=self.dtype,
                          finite=False)
        check_float_array(op, "grad", grad, shape=(self.size,), dtype=self.dtype)
        if not params.flags.writeable:
            raise ValueError(f"{op}: params must be writeable (it is updated in place)")
        if np.shares_memory(params, grad):
            raise ValueError(f"{op}: params and grad must not share memory")
        self._update(params, grad)
        self._check_finite(params)

    def _check_finite(self, params):
        """A finite gradient can still overflow the update or the state (Adam's g * g past
        3.4e38 in float32 makes v infinite and the step silently 0): never silent."""
        outputs = {"params": params}
        outputs.update({v: getattr(self, v) for v in self._vectors})
        check_outputs(f"{type(self).__name__}.step", self.dtype, outputs,
                      hint="learning rate or gradient scale")

    def state_dict(self):
        """Hyperparameters (Python float/bool), counters (Python int) and state vectors (copies
        of the (P,) arrays) by name. Later steps do not change the returned dict."""
        d = {key: getattr(self, key) for key in self._hyper}
        d.update({c: int(getattr(self, c)) for c in self._counters})
        d.update({v: getattr(self, v).copy() for v in self._vectors})
        return d

    def load_state_dict(self, d):
        """Restore everything state_dict() returned (same keys, arrays of shape (P,) and this
        optimizer's dtype). Arrays are copied in, so the caller's arrays stay untouched. All
        entries are checked before any is applied, so a bad dict leaves the optimizer as it was."""
        op = f"{type(self).__name__}.load_state_dict"
        if not isinstance(d, dict):
            raise TypeError(f"{op}: expected a dict, got {type(d).__name__}")
        want = set(self._hyper) | set(self._counters) | set(self._vectors)
        if set(d) != want:
            missing, extra = sorted(want - set(d)), sorted(set(d) - want)
            raise ValueError(f"{op}: keys do not match {self.name!r} state: missing {missing}, "
                             f"unexpected {extra}")
        hyper = {key: check(op, d[key]) for key, check in self._hyper.items()}
        counters = {}
        for c in self._counters:
            value = d[c]
            if isinstance(value, np.integer):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{op}: {c} must be a non-negative int, got {value!r}")
            counters[c] = value
        for v in self._vectors:
            check_float_array(op, v, d[v], shape=(self.size,), dtype=self.dtype)
        for key, value in hyper.items():
            setattr(self, key, value)
        for c, value in counters.items():
            setattr(self, c, value)
        for v in self._vectors:
            np.copyto(getattr(self, v), d[v])

    def __repr__(self):
        hyper = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyper)
        return f"{type(self).__name__}(size={self.size}, dtype={self.dtype}, {hyper})"


def _lr(op, value):
    return _check_hyper(op, "lr", value, low=0.0, low_open=True)


def _eps(op, value):
    return _check_hyper(op, "eps", value, low=0.0, low_open=True)


def _flag(op, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: nesterov must be a bool, got {type(value).__name__}")
    return bool(value)


class SGD(_FlatOptimizer):
    """Plain gradient descent: theta <- theta - lr * g."""
    name = "sgd"
    _hyper = {"lr": _lr}

    def __init__(self, size, dtype, *, lr):
        super().__init__(size, dtype)
        self._set_hyper(lr=lr)

    def _update(self, params, grad):
        params -= self.lr * grad                              # (P,)


class Momentum(_FlatOptimizer):
    """Heavy-ball momentum (Sutskever et al. 2013 form), or Nesterov's accelerated gradient in
    Bengio et al.'s (2013) form with nesterov=True. State: velocity v (P,), starting at 0.

        v <- mu * v - lr * g
        theta <- theta + v                    (classical)
        theta <- theta + mu * v - lr * g      (nesterov; v already updated)
    """
    name = "momentum"
    _hyper = {"lr": _lr,
              "momentum": lambda op, x: _check_hyper(op, "momentum", x, low=0.0, high=1.0),
              "nesterov": _flag}
    _vectors = ("velocity",)

    def __init__(self, size, dtype, *, lr, momentum=0.9, nesterov=False):
        super().__init__(size, dtype)
        self._set_hyper(lr=lr, momentum=momentum, nesterov=nesterov)

    def _update(self, params, grad):
        v = self.velocity                                     # (P,)
        v *= self.momentum
        v -= self.lr * grad
        if self.nesterov:
            params += self.momentum * v - self.lr * grad
        else:
            params += v


class AdaGrad(_FlatOptimizer):
    """Diagonal AdaGrad (Duchi, Hazan & Singer 2011). State: the running sum of squared
    gradients G (P,), starting at `initial_accumulator` (0 by default).

        G <- G + g * g
        theta <- theta - lr * g / (sqrt(G) + eps)

    eps sits outside the sqrt and only guards coordinates whose gradient has been 0 so far.
    """
    name = "adagrad"
    _hyper = {"lr": _lr, "eps": _eps,
              "initial_accumulator": lambda op, x: _check_hyper(op, "initial_accumulator", x,
                                                                low=0.0)}
    _vectors = ("sum_sq",)

    def __init__(self, size, dtype, *, lr, eps=1e-10, initial_accumulator=0.0):
        super().__init__(size, dtype)
        self._set_hyper(lr=lr, eps=eps, initial_accumulator=initial_accumulator)
        self.sum_sq.fill(self.initial_accumulator)

    def _update(self, params, grad):
        G = self.sum_sq                                       # (P,)
        G += grad * grad
        params -= self.lr * grad / (np.sqrt(G) + self.eps)


class Adam(_FlatOptimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1), defaults from the paper (lr = alpha = 0.001,
    b1 = 0.9, b2 = 0.999, eps = 1e-8). State: first and second moment estimates m, v (P,) and
    the step count t (int; t = 1 on the first step).

        m <- b1 * m + (1 - b1) * g
        v <- b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t),   vhat = v / (1 - b2**t)
        theta <- theta - lr * mhat / (sqrt(vhat) + eps)

    This is the algorithm as stated, not the paper's cheaper rearrangement (folding the bias
    corrections into the step size), which moves eps and so changes results slightly.
    On the first step mhat = g and vhat = g * g, so each coordinate moves by
    lr * g / (|g| + eps) ~= lr * sign(g).
    """
    name = "adam"
    _hyper = {"lr": _lr,
              "beta1": lambda op, x: _check_hyper(op, "beta1", x, low=0.0, high=1.0),
              "beta2": lambda op, x: _check_hyper(op, "beta2", x, low=0.0, high=1.0),
              "eps": _eps}
    _vectors = ("m", "v")
    _counters = ("t",)

    def __init__(self, size, dtype, *, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__(size, dtype)
        self._set_hyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps)

    def _update(self, params, grad):
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        m, v = self.m, self.v                                 # (P,), (P,)
        m *= b1
        m += (1.0 - b1) * grad
        v *= b2
        v += (1.0 - b2) * (grad * grad)
        # Python floats: b**t stays exact in float64 and is rounded once into float32 state.
        mhat = m / (1.0 - b1 ** self.t)                       # (P,)
        vhat = v / (1.0 - b2 ** self.t)                       # (P,)
        params -= self.lr * mhat / (np.sqrt(vhat) + self.eps)


class RMSProp(_FlatOptimizer):
    """RMSProp (Tieleman & Hinton 2012, lecture 6e of "Neural Networks for Machine
    Learning"): divide the gradient by a running root mean square of recent gradients.
    State: the mean square v (P,), starting at 0.

        v <- rho * v + (1 - rho) * g * g
        theta <- theta - lr * g / (sqrt(v) + eps)

    rho = 0.9 is the lecture's suggestion. eps sits outside the sqrt, as in AdaGrad and
    Adam here; the lecture gives no eps, and libraries differ in its value and place
    (TensorFlow 1: 1e-10 inside the sqrt; PyTorch: 1e-8 outside), so 1e-8 outside is this
    module's choice. With v starting at 0 and no bias correction the first step moves each
    coordinate by lr * g / (sqrt(1 - rho) |g| + eps) ~= 3.16 lr sign(g) for rho = 0.9.
    """
    name = "rmsprop"
    _hyper = {"lr": _lr,
              "rho": lambda op, x: _check_hyper(op, "rho", x, low=0.0, high=1.0),
              "eps": _eps}
    _vectors = ("mean_sq",)

    def __init__(self, size, dtype, *, lr, rho=0.9, eps=1e-8):
        super().__init__(size, dtype)
        self._set_hyper(lr=lr, rho=rho, eps=eps)

    def _update(self, params, grad):
        v = self.mean_sq                                      # (P,)
        v *= self.rho
        v += (1.0 - self.rho) * (grad * grad)
        params -= self.lr * grad / (np.sqrt(v) + self.eps)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adagrad": AdaGrad, "rmsprop": RMSProp,
              "adam": Adam}


def make_optimizer(name, size, dtype, **hyper):
    """Build an optimizer by name: "sgd", "momentum", "nesterov" (= momentum with
    nesterov=True), "adagrad", "rmsprop" or "adam", for a flat (size,) parameter vector of `dtype`.
    `hyper` goes to the class (lr is required except for adam, whose defaults are the paper's)."""
    if not isinstance(name, str):
        raise TypeError(f"make_optimizer: name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key == "nesterov":
        if "nesterov" in hyper:
            raise ValueError("make_optimizer: 'nesterov' names the optimizer; do not also pass "
                             "nesterov=")
        return Momentum(size, dtype, nesterov=True, **hyper)
    if key not in OPTIMIZERS:
        raise ValueError(f"make_optimizer: unknown optimizer {name!r}; expected one of "
                         f"{sorted(OPTIMIZERS) + ['nesterov']}")
    # an unknown or missing keyword fails in the class's __init__, whose error names the class
    return OPTIMIZERS[key](size, dtype, **hyper)
