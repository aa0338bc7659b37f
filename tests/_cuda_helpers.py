"""Helpers shared by the kernel tests (tests/test_distance.py, tests/test_lrua.py, and the CUDA
ones: tests/cuda_sim_cases.py, run under the simulator, and tests/test_cuda_cu_on_cpu.py):
data, and the per-dtype bounds. Not a test module (no test_ prefix); imported from the tests folder,
which pytest puts on sys.path."""
import numpy as np

from metacore.reference import distance as RD


def assert_close(name, a, ref, mag, dtype, c, atol=0.0):
    """|a - ref| <= atol + mag * eps(dtype) * c elementwise; prints the first mismatches."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert a.shape == ref.shape, f"{name}: shape {a.shape} vs reference {ref.shape}"
    bound = atol + np.broadcast_to(mag, ref.shape) * np.finfo(dtype).eps * c
    bad = ~(np.abs(a - ref) <= bound)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        lines = [f"  at {tuple(i)}: got {a[tuple(i)]!r}, ref {ref[tuple(i)]!r}, "
                 f"bound {bound[tuple(i)]:.3g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} entries out of bounds\n"
                             + "\n".join(lines))


def magnitudes(op, g, q, s):
    """Sum of |terms| behind each output: -> mag_out (T, Q, N), mag_dq (T, Q, D),
    mag_ds (T, N, D), in float64 (tests/test_distance.py's bound)."""
    g, q, s = (np.asarray(x, dtype=np.float64) for x in (g, q, s))
    diff = q[:, :, None, :] - s[:, None, :, :]            # (T, Q, N, D)
    ag = np.abs(g)[..., None]                             # (T, Q, N, 1)
    if op == "sqeuclidean":
        t = 2 * ag * np.abs(diff)
        return (diff ** 2).sum(-1), t.sum(2), t.sum(1)
    if op == "l1":
        t = np.broadcast_to(ag, diff.shape)
        return np.abs(diff).sum(-1), t.sum(2), t.sum(1)
    qn = np.maximum(np.sqrt((q * q).sum(-1)), RD.EPS)     # (T, Q)
    sn = np.maximum(np.sqrt((s * s).sum(-1)), RD.EPS)     # (T, N)
    inv = 1 / (qn[:, :, None] * sn[:, None, :])           # (T, Q, N)
    mag_out = (np.abs(q)[:, :, None, :] * np.abs(s)[:, None, :, :]).sum(-1) * inv
    gi = ag[..., 0] * inv
    gc = ag[..., 0] * mag_out
    mag_dq = (gi[..., None] * np.abs(s)[:, None]).sum(2) + (gc.sum(2) / qn)[..., None] \
        * np.abs(q) / qn[..., None]
    mag_ds = (gi[..., None] * np.abs(q)[:, :, None]).sum(1) + (gc.sum(1) / sn)[..., None] \
        * np.abs(s) / sn[..., None]
    return mag_out, mag_dq, mag_ds


def steps(op, shape):
    """Rounding steps per output (forward, dq, ds) plus a margin of 8."""
    T, Q, N, D = shape
    extra = 2 * D if op == "cosine" else 0
    return D + 8 + extra, N + D + 8 + extra, Q + D + 8 + extra


def ddata(shape, dtype, seed):
    T, Q, N, D = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, Q, D)).astype(dtype)      # (T, Q, D)
    s = rng.standard_normal((T, N, D)).astype(dtype)      # (T, N, D)
    g = rng.standard_normal((T, Q, N)).astype(dtype)      # (T, Q, N)
    return q, s, g


def ldata(shape, dtype, seed, per_step):
    """shape (T, B, H, S, W) -> keys, alpha, memory0, read0, usage0, dreads; usage0 a
    permutation of 0, 0.3, ... (distinct), read0 rows on the simplex."""
    T, B, H, S, W = shape
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((T, B, H, W))                           # (T, B, H, W)
    alpha = rng.standard_normal((T, B, H) if per_step else (H,))       # (H,) or (T, B, H)
    memory0 = rng.standard_normal((B, S, W))                           # (B, S, W)
    e = np.exp(rng.standard_normal((B, H, S)))
    read0 = e / e.sum(axis=-1, keepdims=True)                          # (B, H, S)
    usage0 = 0.3 * np.stack([rng.permutation(S) for _ in range(B)])    # (B, S)
    dreads = rng.standard_normal((T, B, H, W))                         # (T, B, H, W)
    return [x.astype(dtype) for x in (keys, alpha, memory0, read0, usage0, dreads)]


def lassert(name, a, ref, dtype, c):
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert a.shape == ref.shape, f"{name}: shape {a.shape} vs reference {ref.shape}"
    bound = np.finfo(dtype).eps * c * max(np.abs(ref).max(), np.finfo(dtype).tiny)
    err = np.abs(a - ref).max() if a.size else 0.0
    assert err <= bound, f"{name}: max error {err:.3g} above the bound {bound:.3g}"


def check_protonet(got, ref, q, s, gloss, scale, dtype):
    """ProtoNet loss outputs (loss, dq, ds, pred) against the float64 reference's.

    Bound, a stated loose one for a chain of reductions: eps(dtype) * 8 (N + D + Q + 8)
    times the magnitude, which is scale * D (max|q| + max|s|)^2 + log N + 1 for the loss
    (logits of D-term sums, then a logsumexp), and max|gloss| scale 2 (max|q| + max|s|)
    (N + Q) for the gradients (|dlogits| <= scale |gloss| / Q per entry, summed over the
    partners). pred must match exactly in float64."""
    loss, dq, ds, pred = got
    rl, rdq, rds, rpred = ref
    T, Q, D = q.shape
    N = s.shape[1]
    assert loss.dtype == dq.dtype == ds.dtype == dtype and pred.dtype == np.int64
    eps, tol = np.finfo(dtype).eps, 8 * (N + D + Q + 8)
    amp = float(np.abs(q).max() + np.abs(s).max())
    lmag = scale * amp ** 2 * D + np.log(N) + 1
    np.testing.assert_array_less(np.abs(loss - rl), lmag * eps * tol + 1e-300)
    gmag = float(np.abs(gloss).max()) * scale * 2 * amp * (N + Q)
    np.testing.assert_array_less(np.abs(dq - rdq), gmag * eps * tol + 1e-300)
    np.testing.assert_array_less(np.abs(ds - rds), gmag * eps * tol + 1e-300)
    if dtype == np.float64:
        np.testing.assert_array_equal(pred, rpred)
