"""The reference layers and losses (metacore.reference, one task, float64) against central
finite differences, then the fast path (metacore.layers / metacore.losses / Model, T tasks)
against the reference looped over tasks, in float64 and float32.

Shape letters: T tasks, N points (or B images), H x W images, C channels, F filters,
D / O features, K classes, P parameters per task.

Tolerances.
  FD, float64, h = 1e-6: backward rel_error <= 1e-7 (central-difference truncation ~h^2 plus
  rounding ~1e-16/h), R-passes against FD of the forward/backward along the direction <= 1e-6.
  Fast path vs reference, float64: rel_error <= 1e-12 (only the summation order differs).
  Fast path vs reference, float32: |a - ref| <= c * eps32 * (|ref| + max|ref|), eps32 =
  1.19e-7. A float32 sum of n terms is off by at most ~n * eps * sum|terms| (Higham, ch. 3);
  max|ref| stands in for sum|terms| where terms cancel. c is the longest reduction of the op
  (stated per case) times a small factor for the few float32 ops around it. Losses use the
  sum of the absolute terms per entry as the scale (their outputs cancel by design), and
  every float32 bound allows the float32 underflow threshold 1.18e-38 absolute.
Inputs are kept away from kinks by construction: ReLU inputs have |x| >= 0.1, max-pool inputs
are spaced at least 0.05 apart; model tests assert a 1e-4 margin before differencing.
"""
import numpy as np
import pytest

from metacore import network
from metacore.gradcheck import numerical_directional, numerical_gradient, rel_error
from metacore.layers import batchnorm as fbn
from metacore.layers import conv2d as fcv
from metacore.layers import linear as fln
from metacore.layers import maxpool as fmp
from metacore.layers import relu as frl
from metacore.layers import reshape as frs
from metacore.losses import bce_logits as fbce
from metacore.losses import mse as fmse
from metacore.losses import softmax_ce as fce
from metacore.models import bn_mlp, conv4_maml, conv4_protonet, sinusoid_mlp
from metacore.reference import batchnorm as rbn
from metacore.reference import conv2d as rcv
from metacore.reference import linear as rln
from metacore.reference import losses as rloss
from metacore.reference import maxpool as rmp
from metacore.reference import relu as rrl
from metacore.reference import reshape as rrs
from metacore.reference.model import reference_forward, reference_loss_grad_hvp

EPS32 = float(np.finfo(np.float32).eps)      # 1.19e-7
TINY32 = float(np.finfo(np.float32).tiny)    # 1.18e-38, smallest normal float32
FD_GRAD, FD_R, FAST64 = 1e-7, 1e-6, 1e-12


# ============================================================================ op cases
class Op:
    """One op and one set of per-task input shapes.
    ref: (fwd(ins) -> y, bwd(dy, ins) -> {k: dk}, rfwd(ins, rins) -> ry,
          rbwd(dy, rdy, ins, rins) -> {k: R{dk}}) on one task;
    fast(ins, rins, dy, rdy) -> {"y", "d<k>", "ry", "rd<k>"} on T tasks;
    kinds: {k: 'normal' | 'relu' | 'distinct' | 'gamma'}; c32: the float32 factor c."""

    def __init__(self, name, shapes, ref, fast, c32, kinds=None):
        self.name, self.shapes, self.ref, self.fast, self.c32 = name, shapes, ref, fast, c32
        self.kinds = kinds or {}

    def __repr__(self):
        return self.name


def _draw(rng, kind, shape):
    if kind == "relu":                      # |x| in [0.1, 1.1]: far from the kink at 0
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.1, 1.1, shape)
    if kind == "distinct":                  # all entries >= 0.05 apart: no max-pool near-tie
        n = int(np.prod(shape))
        return (rng.permutation(n) * 0.05 - 0.025 * n + rng.uniform(0, 0.01, n)).reshape(shape)
    if kind == "gamma":
        return rng.uniform(0.5, 1.5, shape)
    return rng.standard_normal(shape)


def _inputs(op, rng, T=None):
    """-> ins, rins: {k: (shape) or (T, *shape)} float64."""
    lead = () if T is None else (T,)
    ins = {k: _draw(rng, op.kinds.get(k, "normal"), lead + s) for k, s in op.shapes.items()}
    rins = {k: rng.standard_normal(lead + s) for k, s in op.shapes.items()}
    return ins, rins


def _keys(prefix, d):
    return {prefix + k: v for k, v in d.items()}


# ---------------------------------------------------------------- linear
def linear_op(N, D, H):
    ref = (lambda i: rln.linear_forward(i["x"], i["w"], i["b"]),
           lambda dy, i: dict(zip("xwb", rln.linear_backward(dy, i["x"], i["w"]))),
           lambda i, r: rln.linear_rforward(i["x"], i["w"], r["x"], r["w"], r["b"]),
           lambda dy, rdy, i, r: dict(zip("xwb", rln.linear_rbackward(
               dy, rdy, i["x"], i["w"], r["x"], r["w"]))))

    def fast(i, r, dy, rdy):
        y, c = fln.linear_forward(i["x"], i["w"], i["b"])
        g = fln.linear_backward(dy, c)
        ry, rc = fln.linear_rforward(r["x"], r["w"], r["b"], c)
        rg = fln.linear_rbackward(dy, rdy, c, rc)
        return {"y": y, "ry": ry, **_keys("d", dict(zip("xwb", g))),
                **_keys("rd", dict(zip("xwb", rg)))}
    # longest reduction: D (y, ry), H (dx), N (dw, db); two products summed in the R-passes
    return Op(f"linear N{N} D{D} H{H}", {"x": (N, D), "w": (D, H), "b": (H,)}, ref, fast,
              c32=4 * max(N, D, H) + 4)


# ---------------------------------------------------------------- relu
def relu_op(shape):
    ref = (lambda i: rrl.relu_forward(i["x"]),
           lambda dy, i: {"x": rrl.relu_backward(dy, i["x"])},
           lambda i, r: rrl.relu_rforward(i["x"], r["x"]),
           lambda dy, rdy, i, r: {"x": rrl.relu_rbackward(dy, rdy, i["x"])})

    def fast(i, r, dy, rdy):
        y, m = frl.relu_forward(i["x"])
        ry, rc = frl.relu_rforward(r["x"], m)
        return {"y": y, "dx": frl.relu_backward(dy, m), "ry": ry,
                "rdx": frl.relu_rbackward(dy, rdy, m, rc)}
    return Op(f"relu {shape}", {"x": shape}, ref, fast, c32=1, kinds={"x": "relu"})


# ---------------------------------------------------------------- conv2d
def conv_op(B, H, W, C, F, stride, padding):
    st, pd = stride, padding
    ref = (lambda i: rcv.conv2d_forward(i["x"], i["w"], i["b"], st, pd),
           lambda dy, i: dict(zip("xwb", rcv.conv2d_backward(dy, i["x"], i["w"], st, pd))),
           lambda i, r: rcv.conv2d_rforward(i["x"], i["w"], r["x"], r["w"], r["b"], st, pd),
           lambda dy, rdy, i, r: dict(zip("xwb", rcv.conv2d_rbackward(
               dy, rdy, i["x"], i["w"], r["x"], r["w"], st, pd))))

    def fast(i, r, dy, rdy):
        y, c = fcv.conv2d_forward(i["x"], i["w"], i["b"], st, pd)
        g = fcv.conv2d_backward(dy, c)
        ry, rc = fcv.conv2d_rforward(r["x"], r["w"], r["b"], c)
        rg = fcv.conv2d_rbackward(dy, rdy, c, rc)
        return {"y": y, "ry": ry, **_keys("d", dict(zip("xwb", g))),
                **_keys("rd", dict(zip("xwb", rg)))}
    # longest reduction: 9 C (y), 9 F (dx), B Ho Wo <= B H W (dw, db)
    return Op(f"conv B{B} {H}x{W} C{C} F{F} s{stride} {padding}",
              {"x": (B, H, W, C), "w": (3, 3, C, F), "b": (F,)}, ref, fast,
              c32=4 * max(9 * C, 9 * F, B * H * W) + 4)


# ---------------------------------------------------------------- batchnorm
def bn_op(xshape, eps=1e-5):
    C = xshape[-1]
    ref = (lambda i: rbn.batchnorm_forward(i["x"], i["g"], i["b"], eps),
           lambda dy, i: dict(zip("xgb", rbn.batchnorm_backward(dy, i["x"], i["g"], eps))),
           lambda i, r: rbn.batchnorm_rforward(i["x"], i["g"], r["x"], r["g"], r["b"], eps),
           lambda dy, rdy, i, r: dict(zip("xgb", rbn.batchnorm_rbackward(
               dy, rdy, i["x"], i["g"], r["x"], r["g"], eps))))

    def fast(i, r, dy, rdy):
        y, c = fbn.batchnorm_forward(i["x"], i["g"], i["b"], eps)
        g = fbn.batchnorm_backward(dy, c)
        ry, rc = fbn.batchnorm_rforward(r["x"], r["g"], r["b"], c)
        rg = fbn.batchnorm_rbackward(dy, rdy, c, rc)
        return {"y": y, "ry": ry, **_keys("d", dict(zip("xgb", g))),
                **_keys("rd", dict(zip("xgb", rg)))}
    M = int(np.prod(xshape[:-1]))
    # reductions of length M (mean, var, and the sums of the backward), chained a few times
    return Op(f"batchnorm {xshape}", {"x": xshape, "g": (C,), "b": (C,)}, ref, fast,
              c32=16 * M + 16, kinds={"g": "gamma"})


def bn_running_op(xshape, seed=5, eps=1e-5):
    C = xshape[-1]
    rng = np.random.default_rng(seed)
    rm, rv = rng.standard_normal(C), rng.uniform(0.3, 2.0, C)      # fixed buffers (C,)
    ref = (lambda i: rbn.batchnorm_running_forward(i["x"], i["g"], i["b"], rm, rv, eps),
           lambda dy, i: dict(zip("xgb", rbn.batchnorm_running_backward(
               dy, i["x"], i["g"], rm, rv, eps))),
           lambda i, r: rbn.batchnorm_running_rforward(i["x"], i["g"], r["x"], r["g"], r["b"],
                                                       rm, rv, eps),
           lambda dy, rdy, i, r: dict(zip("xgb", rbn.batchnorm_running_rbackward(
               dy, rdy, i["x"], i["g"], r["x"], r["g"], rm, rv, eps))))

    def fast(i, r, dy, rdy):
        T, dt = i["x"].shape[0], i["x"].dtype
        m, v = np.tile(rm.astype(dt), (T, 1)), np.tile(rv.astype(dt), (T, 1))
        y, c = fbn.batchnorm_running_forward(i["x"], i["g"], i["b"], m, v, eps)
        g = fbn.batchnorm_running_backward(dy, c)
        ry, rc = fbn.batchnorm_running_rforward(r["x"], r["g"], r["b"], c)
        rg = fbn.batchnorm_running_rbackward(dy, rdy, c, rc)
        return {"y": y, "ry": ry, **_keys("d", dict(zip("xgb", g))),
                **_keys("rd", dict(zip("xgb", rg)))}
    M = int(np.prod(xshape[:-1]))
    # the float32 running statistics are the float64 ones rounded: a few eps on every entry
    return Op(f"batchnorm running {xshape}", {"x": xshape, "g": (C,), "b": (C,)}, ref, fast,
              c32=4 * M + 16, kinds={"g": "gamma"})


# ---------------------------------------------------------------- maxpool, flatten, meanpool
def maxpool_op(shape, kind="distinct"):
    ref = (lambda i: rmp.maxpool_forward(i["x"]),
           lambda dy, i: {"x": rmp.maxpool_backward(dy, i["x"])},
           lambda i, r: rmp.maxpool_rforward(i["x"], r["x"]),
           lambda dy, rdy, i, r: {"x": rmp.maxpool_rbackward(dy, rdy, i["x"])})

    def fast(i, r, dy, rdy):
        y, c = fmp.maxpool_forward(i["x"])
        ry, rc = fmp.maxpool_rforward(r["x"], c)
        return {"y": y, "dx": fmp.maxpool_backward(dy, c), "ry": ry,
                "rdx": fmp.maxpool_rbackward(dy, rdy, c, rc)}
    return Op(f"maxpool {shape} {kind}", {"x": shape}, ref, fast, c32=1, kinds={"x": kind})


def flatten_op(shape):
    ref = (lambda i: rrs.flatten_forward(i["x"]),
           lambda dy, i: {"x": rrs.flatten_backward(dy, i["x"].shape)},
           lambda i, r: rrs.flatten_rforward(r["x"]),
           lambda dy, rdy, i, r: {"x": rrs.flatten_rbackward(dy, rdy, i["x"].shape)})

    def fast(i, r, dy, rdy):
        y, c = frs.flatten_forward(i["x"])
        ry, rc = frs.flatten_rforward(r["x"], c)
        return {"y": y, "dx": frs.flatten_backward(dy, c), "ry": ry,
                "rdx": frs.flatten_rbackward(dy, rdy, c, rc)}
    return Op(f"flatten {shape}", {"x": shape}, ref, fast, c32=1)


def meanpool_op(shape):
    ref = (lambda i: rrs.meanpool_forward(i["x"]),
           lambda dy, i: {"x": rrs.meanpool_backward(dy, i["x"].shape)},
           lambda i, r: rrs.meanpool_rforward(r["x"]),
           lambda dy, rdy, i, r: {"x": rrs.meanpool_rbackward(dy, rdy, i["x"].shape)})

    def fast(i, r, dy, rdy):
        y, c = frs.meanpool_forward(i["x"])
        ry, rc = frs.meanpool_rforward(r["x"], c)
        return {"y": y, "dx": frs.meanpool_backward(dy, c), "ry": ry,
                "rdx": frs.meanpool_rbackward(dy, rdy, c, rc)}
    H, W = shape[1], shape[2]
    return Op(f"meanpool {shape}", {"x": shape}, ref, fast, c32=2 * H * W + 4)


OPS = [
    linear_op(4, 3, 5), linear_op(1, 1, 1), linear_op(7, 2, 1),
    relu_op((4, 5)), relu_op((1, 3, 2, 1)),
    conv_op(2, 5, 4, 2, 3, 1, "same"),
    conv_op(1, 7, 5, 1, 2, 2, "same"),          # odd sizes, stride 2: one pixel each side
    conv_op(2, 6, 4, 2, 1, 2, "same"),          # even sizes, stride 2: one pixel after only
    conv_op(1, 5, 7, 2, 1, 1, "valid"),
    conv_op(1, 7, 6, 1, 2, 2, "valid"),
    conv_op(1, 1, 2, 2, 2, 1, "same"),          # smaller than the kernel
    conv_op(2, 2, 1, 1, 3, 2, "same"),
    bn_op((6, 3)), bn_op((2, 3, 2, 2)), bn_op((1, 4)), bn_op((5, 1)),
    bn_running_op((5, 3)), bn_running_op((2, 3, 3, 2)),
    maxpool_op((2, 5, 4, 2)), maxpool_op((1, 2, 3, 1)), maxpool_op((1, 7, 5, 3)),
    flatten_op((2, 3, 2, 2)), flatten_op((1, 1, 1, 3)),
    meanpool_op((2, 3, 5, 2)), meanpool_op((1, 1, 1, 1)),
]


# ============================================================================ (a) FD proofs
def _pack(arrays):
    return np.concatenate([np.ravel(a) for a in arrays])


def _directional(fn, arrays, dirs):
    """d/dr fn(arrays + r dirs) at r = 0 by central differences; fn returns a tuple/array."""
    shapes = [np.shape(a) for a in arrays]
    z, dz = _pack(arrays), _pack(dirs)

    def unpack():
        out, k = [], 0
        for s in shapes:
            n = int(np.prod(s))
            out.append(z[k:k + n].reshape(s))
            k += n
        return out
    return numerical_directional(lambda: _pack(np.atleast_1d(fn(*unpack()))), z, dz)


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_reference_op_against_finite_differences(op):
    rng = np.random.default_rng(1)
    fwd, bwd, rfwd, rbwd = op.ref
    ins, rins = _inputs(op, rng)
    y = fwd(ins)
    dy, rdy = rng.standard_normal(y.shape), rng.standard_normal(y.shape)
    grads = bwd(dy, ins)
    assert set(grads) == set(ins)
    for k in ins:                           # backward against FD of sum(fwd * dy)
        num = numerical_gradient(lambda: float((fwd(ins) * dy).sum()), ins[k])
        assert rel_error(grads[k], num) <= FD_GRAD, f"{op} d{k}"
    keys = list(ins)
    # R-forward: FD of the forward along (rins)
    num_ry = _directional(lambda *a: fwd(dict(zip(keys, a))), [ins[k] for k in keys],
                          [rins[k] for k in keys])
    assert rel_error(np.ravel(rfwd(ins, rins)), num_ry) <= FD_R, f"{op} R-forward"
    # R-backward: FD of the backward along (rdy, rins): dy moves with the direction too
    def back(dy_, *a):
        g = bwd(dy_, dict(zip(keys, a)))
        return _pack([g[k] for k in keys])
    num_rg = _directional(back, [dy] + [ins[k] for k in keys], [rdy] + [rins[k] for k in keys])
    rg = rbwd(dy, rdy, ins, rins)
    assert rel_error(_pack([rg[k] for k in keys]), num_rg) <= FD_R, f"{op} R-backward"
    for a in [y, *grads.values(), rfwd(ins, rins), *rg.values()]:
        assert a.dtype == np.float64 and np.all(np.isfinite(a))


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_reference_op_returns_fresh_arrays_and_keeps_inputs(op):
    rng = np.random.default_rng(2)
    fwd, bwd, rfwd, rbwd = op.ref
    ins, rins = _inputs(op, rng)
    y = fwd(ins)
    dy, rdy = rng.standard_normal(y.shape), rng.standard_normal(y.shape)
    given = [a.copy() for a in [*ins.values(), *rins.values(), dy, rdy]]
    outs = [y, rfwd(ins, rins), *bwd(dy, ins).values(), *rbwd(dy, rdy, ins, rins).values()]
    for a, b in zip([*ins.values(), *rins.values(), dy, rdy], given):
        np.testing.assert_array_equal(a, b)
    for o in outs:
        for a in [*ins.values(), *rins.values(), dy, rdy]:
            assert not np.shares_memory(o, a), f"{op}: an output aliases an input"


# ============================================================================ (b) fast vs ref
def _reference_all(op, ins, rins, dy, rdy):
    """The reference on every task -> {"y", "d<k>", "ry", "rd<k>"}: (T, ...) float64."""
    fwd, bwd, rfwd, rbwd = op.ref
    rows = []
    for t in range(next(iter(ins.values())).shape[0]):
        i = {k: v[t] for k, v in ins.items()}
        r = {k: v[t] for k, v in rins.items()}
        rows.append({"y": fwd(i), "ry": rfwd(i, r), **_keys("d", bwd(dy[t], i)),
                     **_keys("rd", rbwd(dy[t], rdy[t], i, r))})
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def _noncontiguous(a):
    """The same values as a, in a strided (non-contiguous) view."""
    big = np.zeros(a.shape + (2,), a.dtype)
    big[..., 1] = a
    return big[..., 1]


def _fast_case(op, T, dtype, seed, noncontig=False):
    rng = np.random.default_rng(seed)
    ins, rins = _inputs(op, rng, T)
    ins = {k: v.astype(dtype) for k, v in ins.items()}
    rins = {k: v.astype(dtype) for k, v in rins.items()}
    yshape = op.ref[0]({k: v[0] for k, v in ins.items()}).shape
    dy = rng.standard_normal((T,) + yshape).astype(dtype)
    rdy = rng.standard_normal((T,) + yshape).astype(dtype)
    ref = _reference_all(op, ins, rins, dy, rdy)        # float64 from the dtype's values
    if noncontig:
        ins, rins = ({k: _noncontiguous(v) for k, v in d.items()} for d in (ins, rins))
        dy, rdy = _noncontiguous(dy), _noncontiguous(rdy)
        assert not ins["x"].flags.c_contiguous
    fast = op.fast(ins, rins, dy, rdy)
    assert set(fast) == set(ref), f"{op}: outputs {sorted(fast)} vs {sorted(ref)}"
    return fast, ref


def assert_close32(a, ref, c, what, scale=None):
    """|a - ref| <= c * eps32 * scale, scale = |ref| + max|ref| unless the caller knows the
    sum of the absolute terms behind each entry; prints the first mismatches."""
    a64 = np.asarray(a, np.float64)
    assert a64.shape == ref.shape, f"{what}: shape {a64.shape} vs {ref.shape}"
    if scale is None:
        scale = np.abs(ref) + np.abs(ref).max(initial=0.0)
    tol = c * EPS32 * scale + TINY32       # TINY32: below it float32 underflows to 0
    bad = ~(np.abs(a64 - ref) <= tol)                  # NaN in a counts as a mismatch
    if bad.any():
        idx = np.argwhere(bad)[:5]
        rows = "\n".join(f"  at {tuple(i)}: got {a64[tuple(i)]:.9g}, ref {ref[tuple(i)]:.9g}, "
                         f"tol {tol[tuple(i)]:.3g}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} entries off "
                             f"(c = {c}):\n{rows}")


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("op", OPS, ids=repr)
def test_fast_op_float64_matches_reference(op, T):
    fast, ref = _fast_case(op, T, np.float64, seed=10 + T)
    for k in ref:
        assert fast[k].dtype == np.float64, f"{op} {k}: dtype {fast[k].dtype}"
        assert rel_error(fast[k], ref[k]) <= FAST64, f"{op} {k}: {rel_error(fast[k], ref[k])}"


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_fast_op_float32_matches_reference(op):
    fast, ref = _fast_case(op, 2, np.float32, seed=20)
    for k in ref:
        assert fast[k].dtype == np.float32, f"{op} {k}: dtype {fast[k].dtype}"
        assert_close32(fast[k], ref[k], op.c32, f"{op} {k}")


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_fast_op_noncontiguous_inputs(op):
    fast, ref = _fast_case(op, 2, np.float64, seed=30, noncontig=True)
    for k in ref:
        assert rel_error(fast[k], ref[k]) <= FAST64, f"{op} {k}: {rel_error(fast[k], ref[k])}"


def test_maxpool_ties_and_relu_zero_route_like_the_reference():
    """Exact ties: the first maximum in row-major window order wins, in both paths; ReLU's
    derivative at exactly 0 is 0 in both. (No FD here: these are the kinks.)"""
    rng = np.random.default_rng(3)
    x = rng.integers(-1, 2, (2, 2, 5, 4, 3)).astype(np.float64)       # (T, B, H, W, C)
    dy = rng.standard_normal((2, 2, 2, 2, 3))
    y, c = fmp.maxpool_forward(x)
    dx = fmp.maxpool_backward(dy, c)
    for t in range(2):
        np.testing.assert_array_equal(y[t], rmp.maxpool_forward(x[t]))
        np.testing.assert_array_equal(dx[t], rmp.maxpool_backward(dy[t], x[t]))
    # a hand-made window with all four equal routes to its top-left entry
    ones = np.ones((1, 1, 2, 2, 1))                                  # (T, B, 2, 2, C)
    _, c1 = fmp.maxpool_forward(ones)
    five = np.full((1, 1, 1, 1, 1), 5.0)
    np.testing.assert_array_equal(fmp.maxpool_backward(five, c1)[0, 0, :, :, 0],
                                  [[5.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(rmp.maxpool_backward(five[0], ones[0])[0, :, :, 0],
                                  [[5.0, 0.0], [0.0, 0.0]])
    z = np.array([[-1.0, 0.0, 2.0]])
    g = np.array([[3.0, 3.0, 3.0]])
    _, mask = frl.relu_forward(z[None])
    np.testing.assert_array_equal(frl.relu_backward(g[None], mask)[0], [[0.0, 0.0, 3.0]])
    np.testing.assert_array_equal(rrl.relu_backward(g, z), [[0.0, 0.0, 3.0]])


@pytest.mark.parametrize("L,stride,padding,expected", [
    (5, 1, "same", (5, 1, 1)), (1, 1, "same", (1, 1, 1)),
    (7, 2, "same", (4, 1, 1)), (8, 2, "same", (4, 0, 1)), (28, 2, "same", (14, 0, 1)),
    (1, 2, "same", (1, 1, 1)), (2, 2, "same", (1, 0, 1)),
    (5, 1, "valid", (3, 0, 0)), (7, 2, "valid", (3, 0, 0)), (6, 2, "valid", (2, 0, 0)),
])
def test_conv_padding_rule_by_hand(L, stride, padding, expected):
    """TensorFlow's 'same': Lo = ceil(L/s), total = max((Lo-1)s + 3 - L, 0), extra after."""
    assert rcv.output_size_and_padding(L, stride, padding) == expected


def test_conv_geometry_fast_agrees_with_reference_rule():
    for H in range(1, 12):
        for W in (1, 2, 7):
            for s in (1, 2):
                for pad in ("same", "valid"):
                    if pad == "valid" and min(H, W) < 3:
                        continue
                    Ho, top, bottom = rcv.output_size_and_padding(H, s, pad)
                    Wo, left, right = rcv.output_size_and_padding(W, s, pad)
                    assert fcv.conv2d_geometry(H, W, s, pad) == (Ho, Wo, (top, bottom),
                                                                (left, right))


def test_reference_bad_arguments_are_named():
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        rcv.output_size_and_padding(5, 3, "same")
    with pytest.raises(ValueError, match="padding must be 'same' or 'valid', got 'full'"):
        rcv.output_size_and_padding(5, 1, "full")
    with pytest.raises(ValueError, match="'valid' needs size >= 3, got 2"):
        rcv.conv2d_forward(np.zeros((1, 2, 5, 1)), np.zeros((3, 3, 1, 1)), np.zeros(1), 1,
                           "valid")
    with pytest.raises(ValueError,
                       match=r"maxpool: needs \(B, H>=2, W>=2, C\), got \(1, 1, 4, 2\)"):
        rmp.maxpool_forward(np.zeros((1, 1, 4, 2)))


# ============================================================================ losses
def _loss_case(name, N, O, scale, rng, T=None):
    lead = () if T is None else (T,)
    z = scale * rng.standard_normal(lead + (N, O))
    if name == "softmax_ce":
        target = rng.integers(0, O, lead + (N,))
    elif name == "bce_logits":
        target = rng.uniform(0, 1, lead + (N, O))
        target.reshape(-1)[:2] = [0.0, 1.0][:target.size]
    else:
        target = rng.standard_normal(lead + (N, O))
    return z, target


LOSS_CASES = [("mse", 3, 2, 1.0), ("mse", 1, 1, 1.0), ("softmax_ce", 4, 5, 1.0),
              ("softmax_ce", 1, 2, 1.0), ("softmax_ce", 3, 4, 30.0), ("bce_logits", 3, 2, 2.0),
              ("bce_logits", 1, 1, 1.0), ("bce_logits", 2, 3, 40.0)]
FAST_LOSSES = {"mse": (fmse.mse_forward, fmse.mse_backward, fmse.mse_rbackward),
               "softmax_ce": (fce.softmax_ce_forward, fce.softmax_ce_backward,
                              fce.softmax_ce_rbackward),
               "bce_logits": (fbce.bce_logits_forward, fbce.bce_logits_backward,
                              fbce.bce_logits_rbackward)}


@pytest.mark.parametrize("name,N,O,scale", LOSS_CASES)
def test_reference_loss_against_finite_differences(name, N, O, scale):
    rng = np.random.default_rng(4)
    fwd, bwd, rbwd = rloss.LOSSES[name]
    z, target = _loss_case(name, N, O, scale, rng)
    rz = rng.standard_normal(z.shape)
    dz = bwd(z, target)
    num = numerical_gradient(lambda: fwd(z, target), z)
    assert rel_error(dz, num) <= FD_GRAD
    num_r = numerical_directional(lambda: bwd(z, target), z, rz)
    assert rel_error(rbwd(rz, z, target), num_r) <= FD_R
    assert np.isfinite(fwd(z, target))


@pytest.mark.parametrize("name,N,O,scale", LOSS_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fast_loss_matches_reference(name, N, O, scale, dtype):
    rng = np.random.default_rng(6)
    T = 3
    z, target = _loss_case(name, N, O, scale, rng, T)
    z, rz = z.astype(dtype), rng.standard_normal(z.shape).astype(dtype)
    if name != "softmax_ce":
        target = target.astype(dtype)
    fwd, bwd, rbwd = FAST_LOSSES[name]
    loss, cache = fwd(z, target)
    fast = {"loss": loss, "dz": bwd(cache), "rdz": rbwd(rz, cache)}
    rf, rb, rr = rloss.LOSSES[name]
    ref = {"loss": np.array([rf(z[t], target[t]) for t in range(T)]),
           "dz": np.stack([rb(z[t], target[t]) for t in range(T)]),
           "rdz": np.stack([rr(rz[t], z[t], target[t]) for t in range(T)])}
    for k in ref:
        assert fast[k].dtype == dtype, f"{name} {k}: dtype {fast[k].dtype}"
        if dtype == np.float64:
            assert rel_error(fast[k], ref[k]) <= FAST64, f"{name} {k}"
        else:   # reductions over the N O entries of a task, plus exp/log rounding
            scale = _loss_scales(name, z, target, rz)[k]
            assert_close32(fast[k], ref[k], 4 * N * O + 16, f"{name} {k}", scale)


def _loss_scales(name, z, target, rz):
    """Per entry, the sum of the absolute values of the terms that make it up (float64): a
    float32 result is accurate to a few eps times this, not times |result|, where terms
    cancel (y ~ target; p ~ 1 at the label; rz_k ~ <p, rz> for a confident softmax)."""
    z, rz = np.asarray(z, np.float64), np.asarray(rz, np.float64)
    n = z[0].size
    if name == "mse":
        t = np.asarray(target, np.float64)
        a = np.abs(z) + np.abs(t)
        return {"loss": (a * a).reshape(len(z), -1).mean(axis=1), "dz": 2 * a / n,
                "rdz": 2 * np.abs(rz) / n}
    if name == "softmax_ce":
        N = z.shape[1]
        zmax = z.max(axis=-1, keepdims=True)
        p = np.exp(z - zmax) / np.exp(z - zmax).sum(axis=-1, keepdims=True)
        onehot = (np.arange(z.shape[-1]) == target[..., None]).astype(np.float64)
        lse_terms = np.abs(zmax[..., 0]) + np.abs(z).max(axis=-1)   # log-sum-exp and z_label
        return {"loss": lse_terms.mean(axis=1), "dz": (p + onehot) / N,
                "rdz": p * (np.abs(rz) + (p * np.abs(rz)).sum(axis=-1, keepdims=True)) / N}
    t = np.asarray(target, np.float64)
    s = np.exp(-np.logaddexp(0.0, -z))
    terms = np.logaddexp(0.0, z) + np.abs(t * z)
    return {"loss": terms.reshape(len(z), -1).mean(axis=1), "dz": (s + t) / n,
            "rdz": s * (1.0 + s) * np.abs(rz) / n}


# ============================================================================ (c) models
def _running_bn_mlp():
    model = bn_mlp(in_features=7, hidden=(6, 5), bn_mode="running")
    rng = np.random.default_rng(8)
    for layer in model.layers:
        if isinstance(layer, network.BatchNorm):
            layer.running_mean = rng.standard_normal(layer.channels)
            layer.running_var = rng.uniform(0.3, 2.0, layer.channels)
    return model


# name -> (constructor, T, N, seed). Batch-mode BN with N = 1 is left to the op tests
# (bn_op((1, 4))): in a model it makes every later activation constant (y = beta).
MODELS = {
    "sinusoid": (lambda: sinusoid_mlp(hidden=(5, 3)), 2, 5, 0),
    "sinusoid T1 N1": (lambda: sinusoid_mlp(hidden=(5, 3)), 1, 1, 0),
    "bn_mlp": (lambda: bn_mlp(in_features=7, hidden=(6, 5)), 2, 6, 0),
    "bn_mlp running": (_running_bn_mlp, 2, 4, 0),
    "bn_mlp images": (lambda: bn_mlp(n_way=3, in_features=(3, 2, 2), hidden=(4,)), 2, 5, 0),
    "conv4_maml": (lambda: conv4_maml(image_shape=(9, 9, 2), channels=3, depth=2), 2, 4, 0),
    "conv4_maml 7x5 T1": (lambda: conv4_maml(n_way=2, image_shape=(7, 5, 1), channels=2,
                                             depth=2), 1, 3, 0),
    "conv4_protonet": (lambda: conv4_protonet(image_shape=(7, 6, 2), channels=3, depth=2),
                       2, 3, 0),
}


def _probe(T, N, D, rng):
    """A fixed random quadratic loss on an embedding, L = sum(a out + b out^2 / 2), b > 0:
    target[t] = (a_t, b_t), each (N, D). -> (target, one-task loss triple)."""
    target = np.stack([rng.standard_normal((T, N, D)), rng.uniform(0.5, 1.5, (T, N, D))], 1)
    triple = (lambda out, tg: float((tg[0] * out + 0.5 * tg[1] * out * out).sum()),
              lambda out, tg: tg[0] + tg[1] * out,
              lambda rout, out, tg: tg[1] * rout)
    return target, triple


def _model_case(name):
    """-> model, theta (T, P), x, target, v, u, probe triple or None; all float64."""
    make, T, N, seed = MODELS[name]
    model = make()
    rng = np.random.default_rng(seed)
    theta = np.stack([model.init_params(rng) for _ in range(T)])
    theta += 0.3 * rng.standard_normal(theta.shape)           # tasks differ, biases nonzero
    x = rng.standard_normal((T, N) + model.in_shape)
    probe = None
    if model.loss_name == "mse":
        target = rng.standard_normal((T, N) + model.out_shape)
    elif model.loss_name == "softmax_ce":
        target = rng.integers(0, model.out_shape[-1], (T, N))
    else:
        target, probe = _probe(T, N, model.out_shape[-1], rng)
    v, u = rng.standard_normal(theta.shape), rng.standard_normal(theta.shape)
    return model, theta, x, target, v, u, probe


def _fast_loss_grad_hvp(model, theta, x, target, v, probe):
    """Model.hvp (and loss_and_grad), or for a model without a loss the four passes with the
    probe loss: forward, backward, rforward, backward_and_rbackward."""
    T = theta.shape[0]
    if probe is None:
        loss, grad, hv = model.hvp(theta, x, target, v)
        loss2, grad2 = model.loss_and_grad(theta, x, target)
        np.testing.assert_array_equal(loss2, loss)
        np.testing.assert_array_equal(grad2, grad)
        return loss, grad, hv
    out, caches = model.forward(theta, x)
    a, b = target[:, 0], target[:, 1]
    loss = (a * out + 0.5 * b * out * out).reshape(T, -1).sum(axis=1)
    dout = a + b * out
    grad1 = model.backward(dout, caches, T)
    rout, rcaches = model.rforward(v, caches)
    grad, hv = model.backward_and_rbackward(dout, b * rout, caches, rcaches, T)
    np.testing.assert_array_equal(grad1, grad)
    return loss, grad, hv


@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_reference(name):
    model, theta, x, target, v, _, probe = _model_case(name)
    loss, grad, hv = _fast_loss_grad_hvp(model, theta, x, target, v, probe)
    rloss_, rgrad, rhv = reference_loss_grad_hvp(model, theta, x, target, v, loss=probe)
    out, _ = model.forward(theta, x)
    assert rel_error(out, reference_forward(model, theta, x)) <= FAST64
    for what, a, b in (("loss", loss, rloss_), ("grad", grad, rgrad), ("hvp", hv, rhv)):
        assert a.shape == b.shape and a.dtype == np.float64
        assert rel_error(a, b) <= FAST64, f"{name} {what}: {rel_error(a, b):.3e}"


def test_model_noncontiguous_theta_x_v_match_reference():
    model, theta, x, target, v, _, _ = _model_case("conv4_maml")
    ref = reference_loss_grad_hvp(model, theta, x, target, v)
    fast = model.hvp(_noncontiguous(theta), _noncontiguous(x), target, _noncontiguous(v))
    for a, b in zip(fast, ref):
        assert rel_error(a, b) <= FAST64


def _kink_margin(model, theta, x):
    """Smallest distance of any ReLU input from 0, and of any max-pool window's maximum from
    its runner-up, over all tasks (the FD steps below must not cross either)."""
    _, inputs = reference_forward(model, theta, x, return_inputs=True)
    margin = np.inf
    for hs in inputs:
        for layer, h in zip(model.layers, hs):
            if isinstance(layer, network.ReLU):
                margin = min(margin, np.abs(h).min())
            if isinstance(layer, network.MaxPool2d):
                B, H, W, C = h.shape
                win = h[:, :H // 2 * 2, :W // 2 * 2].reshape(B, H // 2, 2, W // 2, 2, C)
                top2 = np.sort(win.transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4), axis=1)[:, 2:]
                # a window whose maximum is an exact 0 from the ReLU before it stays 0 under
                # the FD step whichever entry wins (each has derivative 0 there): no kink
                live = top2[:, 1] != 0.0
                margin = min(margin, (top2[live, 1] - top2[live, 0]).min(initial=np.inf))
    return margin


@pytest.mark.parametrize("name", list(MODELS))
def test_reference_model_against_finite_differences(name):
    """The reference model itself: d/dr [loss, grad](theta + r v) = [grad . v, H v] by FD,
    and the symmetry u . (H v) = v . (H u) of each task's Hessian."""
    model, theta, x, target, v, u, probe = _model_case(name)
    assert _kink_margin(model, theta, x) > 1e-4, "pick another seed: input too near a kink"
    loss, grad, hv = reference_loss_grad_hvp(model, theta, x, target, v, loss=probe)
    T, P = theta.shape

    def loss_and_grad(th):
        L, g, _ = reference_loss_grad_hvp(model, th.reshape(T, P), x, target, v, loss=probe)
        return np.concatenate([L, g.ravel()])
    num = _directional(loss_and_grad, [theta], [v])
    assert rel_error((grad * v).sum(axis=1), num[:T]) <= FD_GRAD, f"{name} grad"
    assert rel_error(hv.ravel(), num[T:]) <= FD_R, f"{name} hvp"
    _, _, hu = reference_loss_grad_hvp(model, theta, x, target, u, loss=probe)
    assert rel_error((u * hv).sum(axis=1), (v * hu).sum(axis=1)) <= 1e-12


def test_reference_model_bad_arguments_are_named():
    model, theta, x, _, v, _, _ = _model_case("conv4_protonet")
    with pytest.raises(ValueError, match="conv4_protonet has no loss; pass loss="):
        reference_loss_grad_hvp(model, theta, x, None, v)

    class Doubler:                          # a layer type the reference does not know
        params = []

        def out_shape(self, shape):
            return shape
    weird = network.Model("weird", [Doubler()], in_shape=(2,), loss="mse")
    with pytest.raises(TypeError, match="no reference for layer type Doubler"):
        reference_forward(weird, np.zeros((1, 0)), np.zeros((1, 1, 2)))


def test_batchnorm_running_update_matches_reference():
    """(1 - m) old + m batch, biased batch variance; momentum 1 gives the batch statistics."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 2, 2, 3))                       # (T, B, H, W, C)
    old_m, old_v = rng.standard_normal((2, 3)), rng.uniform(0.5, 2.0, (2, 3))
    _, cache = fbn.batchnorm_forward(x, np.ones((2, 3)), np.zeros((2, 3)))
    for m in (0.1, 1.0):
        new_m, new_v = fbn.batchnorm_running_update(old_m, old_v, cache, momentum=m)
        for t in range(2):
            ref_m, ref_v = rbn.batchnorm_running_update(old_m[t], old_v[t], x[t], momentum=m)
            assert rel_error(new_m[t], ref_m) <= FAST64 and rel_error(new_v[t], ref_v) <= FAST64
    rows = x[1].reshape(-1, 3)
    assert rel_error(new_v[1], rows.var(axis=0)) <= FAST64          # momentum 1: batch var
