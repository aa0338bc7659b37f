"""The public checking API (metacore.gradcheck.check_grad / check_hvp / check_vjp): it
passes correct derivations to ~1e-9, FAILS known-wrong ones (a sign error in a backward, a
wrong factor in an HVP, a transposed weight gradient), refuses float32, seeds its probes,
and the README's example runs verbatim."""
import pathlib
import re

import numpy as np
import pytest

from metacore import gradcheck as gc
from metacore.layers import linear as ln

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------- a smooth test function
# f(x) = sum(log cosh(A x)) + 0.25 * |x|^4, x (n,): g = A^T tanh(A x) + |x|^2 x,
# H = A^T diag(1 - tanh^2(A x)) A + |x|^2 I + 2 x x^T
A = np.random.default_rng(3).standard_normal((6, 5))


def f(x):
    return float(np.sum(np.log(np.cosh(A @ x))) + 0.25 * (x @ x) ** 2)


def grad_f(x):
    return A.T @ np.tanh(A @ x) + (x @ x) * x


def hvp_f(x, v):
    s = 1.0 - np.tanh(A @ x) ** 2
    return A.T @ (s * (A @ v)) + (x @ x) * v + 2.0 * x * (x @ v)


X = np.random.default_rng(4).standard_normal(5)


def test_correct_gradient_passes():
    r = gc.check_grad(f, grad_f, X)
    assert r.passed and bool(r) and r.quantity == "gradient"
    assert r.max_rel_error <= 1e-8, r
    assert r.eps == gc.EPS and r.tol == gc.TOL and r.n_checked == 5


def test_sign_error_in_gradient_fails_and_names_the_worst_index():
    def wrong(x):
        g = grad_f(x)
        g[2] = -g[2]
        return g
    r = gc.check_grad(f, wrong, X)
    assert not r.passed and not bool(r)
    assert r.worst_index == (2,)
    assert r.analytic == pytest.approx(-r.numerical, rel=1e-6)
    with pytest.raises(gc.GradcheckError, match=r"gradient check FAILED.*index \(2,\)"):
        gc.check_grad(f, wrong, X, raise_on_fail=True)


def test_correct_hvp_passes_both_ways():
    r = gc.check_hvp(f, hvp_f, X, grad_f=grad_f)
    assert r.passed and r.max_rel_error <= 1e-8 and r.symmetry_error <= 1e-12, r
    r2 = gc.check_hvp(f, hvp_f, X)                    # second differences of f alone
    assert r2.passed and r2.eps == gc.EPS_SECOND and r2.tol == gc.TOL_SECOND, r2
    assert r2.max_rel_error <= 1e-6, r2


@pytest.mark.parametrize("use_grad", [True, False])
def test_hvp_with_a_wrong_factor_fails(use_grad):
    wrong = lambda x, v: 2.0 * hvp_f(x, v)           # the classic missing 1/2
    r = gc.check_hvp(f, wrong, X, grad_f=grad_f if use_grad else None)
    assert not r.passed
    assert r.max_rel_error == pytest.approx(1 / 3, rel=1e-3)   # |2a - a| / (2|a| + |a|)
    with pytest.raises(gc.GradcheckError, match="hvp check FAILED"):
        gc.check_hvp(f, wrong, X, grad_f=grad_f if use_grad else None, raise_on_fail=True)


def test_hvp_missing_a_term_fails():
    wrong = lambda x, v: A.T @ ((1.0 - np.tanh(A @ x) ** 2) * (A @ v)) + (x @ x) * v
    assert not gc.check_hvp(f, wrong, X, grad_f=grad_f).passed


def test_asymmetric_hvp_fails_the_symmetry_check():
    B = np.triu(np.ones((5, 5)))
    quad = lambda x: 0.5 * x @ (B + B.T) @ x / 2     # H = (B + B^T) / 2
    r = gc.check_hvp(quad, lambda x, v: B @ v, X, grad_f=lambda x: (B + B.T) @ x / 2)
    assert not r.passed and r.symmetry_error > 1e-3


# ------------------------------------------------------------- a user's layer (VJP)
def dense_forward(x, w, b):
    return ln.linear_forward(x, w, b)


def test_metacore_linear_layer_passes_as_a_vjp():
    rng = np.random.default_rng(0)
    xs = (rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 5)),
          rng.standard_normal((2, 5)))
    r = gc.check_vjp(ln.linear_forward, ln.linear_backward, xs)
    assert r.passed and r.max_rel_error <= 1e-9 and r.n_checked == 24 + 40 + 10, r


def test_injected_sign_error_in_a_users_backward_fails():
    def forward(x, w):
        return np.tanh(x @ w)

    def backward(dy, x, w):                          # called as backward(dy, *inputs)
        dz = dy * (1.0 - np.tanh(x @ w) ** 2)
        return dz @ w.T, -(x.T @ dz)                 # injected sign error in dw
    rng = np.random.default_rng(1)
    xs = (rng.standard_normal((4, 3)), rng.standard_normal((3, 2)))
    r = gc.check_vjp(forward, backward, xs)
    assert not r.passed and r.max_rel_error > 0.4
    assert r.worst_index[0] == 1                     # the worst entry is in w, input 1
    with pytest.raises(gc.GradcheckError):
        gc.check_vjp(forward, backward, xs, raise_on_fail=True)

    def right(dy, x, w):
        dz = dy * (1.0 - np.tanh(x @ w) ** 2)
        return dz @ w.T, x.T @ dz
    assert gc.check_vjp(forward, right, xs, raise_on_fail=True).max_rel_error <= 1e-8


def test_transposed_weight_gradient_fails():
    def backward(dy, x, w):                          # square w: dw = dz^T x instead of x^T dz
        return dy @ w.T, dy.T @ x
    rng = np.random.default_rng(2)
    xs = (rng.standard_normal((3, 3)), rng.standard_normal((3, 3)))
    assert not gc.check_vjp(lambda x, w: x @ w, backward, xs).passed


def test_subset_of_coordinates_is_seeded():
    big = np.random.default_rng(5).standard_normal(200)
    g = lambda x: np.sin(x).sum()
    dg = lambda x: np.cos(x)
    r1 = gc.check_grad(g, dg, big, n_coords=10, seed=7)
    r2 = gc.check_grad(g, dg, big, n_coords=10, seed=7)
    assert r1 == r2 and r1.n_checked == 10 and r1.passed


def test_float32_and_non_arrays_are_refused_clearly():
    with pytest.raises(TypeError, match="must be float64, got dtype float32"):
        gc.check_grad(f, grad_f, X.astype(np.float32))
    with pytest.raises(TypeError, match="float64"):
        gc.check_vjp(np.tanh, lambda dy, x: dy, np.arange(3))
    with pytest.raises(TypeError, match="numpy"):
        gc.check_grad(f, grad_f, [1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        gc.check_grad(f, lambda x: grad_f(x)[:3], X)
    with pytest.raises(ValueError, match="scalar"):
        gc.check_grad(lambda x: x, grad_f, X)


def test_input_is_not_modified():
    x = X.copy()
    gc.check_grad(f, grad_f, x)
    gc.check_hvp(f, hvp_f, x)
    assert np.array_equal(x, X)


# ------------------------------------------------------------- the README example
def _readme_example():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Check your own derivation", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_verbatim(capsys):
    code = _readme_example()
    assert "check_vjp" in code and len(code.strip().splitlines()) <= 16
    exec(compile(code, "README.md", "exec"), {})
    assert "vjp check PASSED" in capsys.readouterr().out


def test_readme_example_catches_a_sign_error():
    code = _readme_example().replace("x.T @ dz", "-(x.T @ dz)")
    assert "-(x.T @ dz)" in code
    with pytest.raises(AssertionError):
        exec(compile(code, "README.md", "exec"), {})
