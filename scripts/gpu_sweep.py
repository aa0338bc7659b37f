#!/usr/bin/env python
"""Device-vs-reference agreement sweep: every device kernel, both device backends, every
dtype they accept (float32, float64), over ugly shapes, against metacore.reference in float64.

Run:   python scripts/gpu_sweep.py              (a machine with an NVIDIA GPU)
       python scripts/gpu_sweep.py --simulator  (no GPU: numba-cuda only, under Numba's CUDA
                                                 simulator, small shapes; minutes on 1 core)
Exit status: 0 every check passed; 1 a check failed (its lines say which); 2 no usable
device backend here (the reason is printed), so nothing was checked.

Shape letters: distances T tasks, Q queries, N supports, D features; LRUA T steps,
B episodes, H heads, S slots, W slot width.

What is checked, through the public entry points with backend='numba-cuda' / 'cupy' and
NumPy inputs (the device-array path is tests/test_cuda_gpu.py's):
  distances  pairwise_{sqeuclidean,l1,cosine} and their _backward, protonet_loss (3 metrics,
             a non-unit scale and an upstream gloss): odd sizes, Q = N = D = 1, D = 1, tile
             edges, and large Q x N (3001 x 2999), whose reference is taken on 48 sampled
             query rows (forward, dq) and 48 sampled support columns (ds): each sampled
             entry depends only on its row or column, so the subset is exact.
  LRUA       lrua_forward / lrua_backward (whole episode) and the step pair
             lrua_step_forward / lrua_step_backward: the paper's size (T, B, H, S, W) =
             (50, 16, 4, 128, 40), W = 1, H = S, S = 1, sizes crossing the 128-thread
             stride, a large batch.
Bounds (the test suite's, tests/_cuda_helpers.py):
  distances  |a - r| <= mag eps(dtype) c elementwise, mag the sum of |terms| behind each
             output, c the rounding steps per output plus a margin (steps());
             protonet_loss: check_protonet's stated loose bound; pred exact in float64.
  LRUA       max|a - r| <= eps(dtype) 4 T (S + W + H) max|r| per array (T = 1 for the step
             pair); w_lu exactly. Where that fails, the same output from the Numba CPU
             backend in float64 measures how far rounding alone moves it (ill-conditioned
             outputs: with W = 1 the cosine path of dL/dk is identically zero but its
             rounding error grows as 1 / |k|, and a key near 0 makes it exceed the bound in
             float64 too), and the check passes within 4 x that disagreement scaled by
             eps(dtype) / eps(float64); the report lists every such pass.
The report gives, per op, backend and dtype, the worst error as a fraction of its bound
over the shapes (<= 1 passes), and every failure in full.
"""
import argparse
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("numba-cuda", "cupy")
NSAMPLE = 48

# (T, Q, N, D)
DSHAPES = [(1, 1, 1, 1), (3, 37, 41, 67), (2, 1, 17, 1), (2, 16, 16, 16), (1, 129, 5, 1),
           (4, 75, 5, 64), (1, 3001, 2999, 33)]
# the simulator runs every CUDA thread as a Python thread: small shapes that still cross
# its 4 x 4 tiles and 8-thread blocks, and a Q x N past the sampling threshold (2 NSAMPLE)
DSHAPES_SIM = [(1, 1, 1, 1), (2, 5, 6, 7), (2, 1, 5, 1), (1, 9, 3, 1), (1, 97, 5, 2)]
# (T, B, H, S, W)
LSHAPES = [(50, 16, 4, 128, 40), (7, 3, 3, 131, 1), (3, 1, 1, 1, 1), (5, 2, 5, 5, 129),
           (4, 97, 2, 17, 3)]
LSHAPES_SIM = [(3, 2, 3, 9, 5), (2, 1, 1, 1, 1), (2, 2, 2, 2, 3), (3, 1, 2, 5, 1)]


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--simulator", action="store_true",
                    help="run numba-cuda under Numba's CUDA simulator on small shapes (no GPU)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help="comma-separated device backends to check (default: both)")
    ap.add_argument("--only", choices=("distances", "lrua"),
                    help="check only one kernel family")
    return ap.parse_args()


def main():
    args = parse()
    if args.simulator and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        # numba reads the variable once, at its first import: start afresh with it set
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import numpy as np

    import metacore  # noqa: F401  (aliases kernels/ and reference/ from a checkout)
    from metacore.kernels import distance as KD
    from metacore.kernels import lrua as KL

    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    wanted = [b for b in args.backends.split(",") if b]
    usable, why = [], []
    for name in wanted:
        if name not in BACKENDS:
            print(f"gpu_sweep: unknown backend {name!r}; choose from {BACKENDS}")
            return 2
        if simulated and name == "cupy":
            why.append("cupy: not under the simulator (CuPy needs a real GPU; "
                       "tests/test_cuda_cu_on_cpu.py runs its CUDA C on the CPU)")
            continue
        try:
            KD._backend("gpu_sweep", name)
            KL._backend("gpu_sweep", name)
            usable.append(name)
        except ImportError as err:
            why.append(str(err))
    print(header(usable, simulated), flush=True)
    for w in why:
        print(f"  skipped backend: {w}")
    if not usable:
        print("SKIP gpu_sweep: no usable device backend here, nothing was checked "
              "(run with --simulator on a machine without a GPU)")
        return 2
    sweep = Sweep(np, usable, simulated)
    print("progress (each shape: every op, dtype and backend; the first includes compiling):",
          flush=True)
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, _stop)      # `timeout` (gpu_check.sh): report what ran
    try:
        if args.only in (None, "distances"):
            sweep.distances(DSHAPES_SIM if simulated else DSHAPES)
        if args.only in (None, "lrua"):
            sweep.lrua(LSHAPES_SIM if simulated else LSHAPES)
    except Stopped:
        print("gpu_sweep: STOPPED by SIGTERM (a time limit): the report covers only the "
              "shapes above", flush=True)
        sweep.report(time.perf_counter() - t0, stopped=True)
        return 1
    return sweep.report(time.perf_counter() - t0)


class Stopped(BaseException):
    """Raised by SIGTERM, so that a sweep cut short still reports what it checked."""


def _stop(signum, frame):
    raise Stopped()


def header(usable, simulated):
    lines = ["gpu_sweep: device kernels against metacore.reference (float64)"]
    if simulated:
        lines.append("  device: Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1), NOT a GPU")
        return "\n".join(lines)
    try:
        import cupy as cp
        props = cp.cuda.runtime.getDeviceProperties(0)
        rt, drv = cp.cuda.runtime.runtimeGetVersion(), cp.cuda.runtime.driverGetVersion()
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        lines.append(f"  device: {name}, compute capability {props['major']}.{props['minor']},"
                     f" {props['totalGlobalMem'] / 2**30:.1f} GiB; CUDA runtime {rt // 1000}."
                     f"{rt % 1000 // 10}, driver {drv // 1000}.{drv % 1000 // 10}; "
                     f"cupy {cp.__version__}")
    except Exception as err:                    # no CuPy or no device: say so and go on
        lines.append(f"  device (through CuPy): unknown ({type(err).__name__}: {err})")
    try:
        import numba
        from numba import cuda
        if cuda.is_available():
            dev = cuda.get_current_device()
            name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
            lines.append(f"  numba {numba.__version__} sees: {name}, cc "
                         f"{dev.compute_capability}")
    except Exception as err:
        lines.append(f"  numba.cuda: {type(err).__name__}: {err}")
    lines.append(f"  backends: {', '.join(usable) or 'none'}")
    return "\n".join(lines)


class Second:
    """The LRUA ops of one case on the Numba CPU backend in float64, run at most once each
    and only when asked (Sweep.normwise's rounding floor)."""

    def __init__(self, KL, case):
        self.KL, self.case, self.out = KL, case, {}

    def get(self, op, i):
        def fetch():
            if op not in self.out:
                dreads, a64, g64, s64, gamma = self.case
                fn = getattr(self.KL, "lrua_" + op)
                if op == "forward":
                    self.out[op] = fn(*a64, gamma, backend="numba")
                elif op == "backward":
                    self.out[op] = fn(dreads, *a64, gamma, backend="numba")
                elif op == "step_forward":
                    self.out[op] = fn(*s64, gamma, backend="numba")
                else:
                    self.out[op] = fn(*g64, *s64, gamma, backend="numba")
            return self.out[op][i]
        return fetch


class Sweep:
    def __init__(self, np, backends, simulated):
        self.np, self.backends, self.simulated = np, backends, simulated
        self.worst = {}                 # (op, backend, dtype) -> (ratio, shape)
        self.failures = []
        self.floored = []               # passes only within the float64 rounding floor
        self.checks = 0

    # ------------------------------------------------------------ bookkeeping
    def record(self, op, backend, dtype, shape, ratio, detail=""):
        np = self.np
        key = (op, backend, np.dtype(dtype).name)
        self.checks += 1
        ratio = float(ratio)
        if not ratio <= 1.0:                                  # NaN fails too
            self.failures.append(f"FAIL {op} {backend} {np.dtype(dtype).name} {shape}: "
                                 f"error {ratio:.3g} x its bound {detail}")
        if key not in self.worst or not ratio <= self.worst[key][0]:
            self.worst[key] = (ratio, shape)

    def elementwise(self, op, backend, dtype, shape, a, ref, mag, c):
        """max over entries of |a - ref| / (mag eps c); a ratio <= 1 passes."""
        np = self.np
        a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
        if a.shape != ref.shape:
            self.record(op, backend, dtype, shape, np.inf, f"shape {a.shape} vs {ref.shape}")
            return
        if not a.size:
            self.record(op, backend, dtype, shape, 0.0)
            return
        bound = np.maximum(np.broadcast_to(mag, ref.shape) * np.finfo(dtype).eps * c,
                           np.finfo(np.float64).tiny)
        r = np.abs(a - ref) / bound
        r = np.where(np.isnan(r), np.inf, r)
        i = np.unravel_index(np.argmax(r), r.shape)
        self.record(op, backend, dtype, shape, r[i],
                    f"(at {tuple(int(j) for j in i)}: got {a[i]!r}, ref {ref[i]!r})")

    def normwise(self, op, backend, dtype, shape, a, ref, c, second=None):
        """max|a - ref| / (eps c max|ref|) (tests/_cuda_helpers.lassert's bound).

        second: None, or a callable giving the same output from a second float64
        implementation (the Numba CPU backend), asked only when the bound above fails. Its
        disagreement with the reference is how far rounding alone moves this output (an
        ill-conditioned one: e.g. W = 1, where the cosine path of dL/dk vanishes
        identically but its rounding error grows as 1 / |k|), so the check then also
        passes within 4 x that disagreement, scaled to the dtype by eps(dtype) / eps(f64);
        such passes are listed in the report."""
        np = self.np
        a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
        if a.shape != ref.shape:
            self.record(op, backend, dtype, shape, np.inf, f"shape {a.shape} vs {ref.shape}")
            return
        bound = np.finfo(dtype).eps * c * max(np.abs(ref).max(), np.finfo(dtype).tiny)
        err = np.abs(a - ref).max() if a.size else 0.0
        detail = f"(max error {err:.3g}, bound {bound:.3g})"
        if not err <= bound and np.isfinite(err) and second is not None:
            noise = float(np.abs(np.asarray(second(), np.float64) - ref).max())
            floor = 4 * noise * np.finfo(dtype).eps / np.finfo(np.float64).eps
            if err <= floor:
                self.floored.append(
                    f"  {op} {backend} {np.dtype(dtype).name} {shape}: error {err:.3g} > "
                    f"bound {bound:.3g}, within 4 x the float64 Numba CPU - reference "
                    f"disagreement ({noise:.3g}) scaled to the dtype: {floor:.3g}")
                bound = floor
                detail += f" (rounding floor {floor:.3g})"
        self.record(op, backend, dtype, shape, err / bound if np.isfinite(err) else np.inf,
                    detail)

    def exact(self, op, backend, dtype, shape, a, ref):
        np = self.np
        same = np.array_equal(np.asarray(a), np.asarray(ref))
        self.record(op, backend, dtype, shape, 0.0 if same else np.inf,
                    "" if same else "(differs)")

    def guarded(self, op, backend, dtype, shape, fn):
        """Run one check; an exception is a failure with its message, not a crash."""
        try:
            fn()
        except Exception as err:
            self.record(op, backend, dtype, shape, self.np.inf,
                        f"raised {type(err).__name__}: {str(err)[:300]}")

    # ------------------------------------------------------------ distances
    def distances(self, shapes):
        np = self.np
        from _cuda_helpers import check_protonet, ddata, magnitudes, steps

        from metacore.kernels import distance as KD
        from metacore.reference import distance as RD
        for shape in shapes:
            T, Q, N, D = shape
            t0 = time.perf_counter()
            rows = np.arange(Q) if Q <= 2 * NSAMPLE else np.sort(
                np.random.default_rng(7).choice(Q, NSAMPLE, replace=False))
            cols = np.arange(N) if N <= 2 * NSAMPLE else np.sort(
                np.random.default_rng(8).choice(N, NSAMPLE, replace=False))
            for dtype in (np.float32, np.float64):
                q, s, g = ddata(shape, dtype, seed=sum(shape))
                q64, s64, g64 = (x.astype(np.float64) for x in (q, s, g))
                qr, gr = q64[:, rows], g64[:, rows]                  # sampled query rows
                sc, gc = s64[:, cols], g64[:, :, cols]               # sampled support columns
                for op in ("sqeuclidean", "l1", "cosine"):
                    c_out, c_dq, c_ds = steps(op, shape)
                    fwd = getattr(RD, "pairwise_" + op)(qr, s64)     # (T, rows, N)
                    m_out = magnitudes(op, gr, qr, s64)[0]
                    rdq = getattr(RD, "pairwise_" + op + "_backward")(gr, qr, s64)[0]
                    m_dq = magnitudes(op, gr, qr, s64)[1]
                    rds = getattr(RD, "pairwise_" + op + "_backward")(gc, q64, sc)[1]
                    m_ds = magnitudes(op, gc, q64, sc)[2]
                    for backend in self.backends:
                        def run(op=op, backend=backend, fwd=fwd, rdq=rdq, rds=rds,
                                m_out=m_out, m_dq=m_dq, m_ds=m_ds, c_out=c_out, c_dq=c_dq,
                                c_ds=c_ds, q=q, s=s, g=g, dtype=dtype):
                            out = getattr(KD, "pairwise_" + op)(q, s, backend=backend)
                            assert out.dtype == dtype, f"dtype {out.dtype}"
                            self.elementwise("pairwise_" + op, backend, dtype, shape,
                                             out[:, rows], fwd, m_out, c_out)
                            dq, ds = getattr(KD, "pairwise_" + op + "_backward")(
                                g, q, s, backend=backend)
                            self.elementwise("pairwise_" + op + "_backward dq", backend,
                                             dtype, shape, dq[:, rows], rdq, m_dq, c_dq)
                            self.elementwise("pairwise_" + op + "_backward ds", backend,
                                             dtype, shape, ds[:, cols], rds, m_ds, c_ds)
                        self.guarded("pairwise_" + op, backend, dtype, shape, run)
                if Q * N * D > 4_000_000 or not (Q and N):
                    continue                    # the loss needs every pair: no large shape
                rng = np.random.default_rng(9)
                y = rng.integers(0, N, size=(T, Q))
                gloss = rng.standard_normal(T).astype(dtype)
                for metric in ("sqeuclidean", "l1", "cosine"):
                    ref = RD.protonet_loss(q64, s64, y, gloss=gloss.astype(np.float64),
                                           metric=metric, scale=0.7)
                    for backend in self.backends:
                        op = f"protonet_loss {metric}"

                        def run(metric=metric, backend=backend, ref=ref, op=op, q=q, s=s,
                                gloss=gloss, dtype=dtype):
                            got = KD.protonet_loss(q, s, y, gloss=gloss, metric=metric,
                                                   scale=0.7, backend=backend)
                            check_protonet(got, ref, q, s, gloss, 0.7, dtype)
                            self.record(op, backend, dtype, shape, 0.0)
                        self.guarded(op, backend, dtype, shape, run)
            print(f"  distances (T, Q, N, D) = {shape}: {time.perf_counter() - t0:.1f} s",
                  flush=True)

    # ------------------------------------------------------------ LRUA
    def lrua(self, shapes):
        np = self.np
        from _cuda_helpers import ldata

        from metacore.kernels import lrua as KL
        from metacore.reference import lrua as RL
        gamma = 0.95
        for shape in shapes:
            T, B, H, S, W = shape
            t0 = time.perf_counter()
            for dtype in (np.float32, np.float64):
                for per_step in (False, True):
                    *args, dreads = ldata(shape, dtype, sum(shape), per_step)
                    a64 = [x.astype(np.float64) for x in args]
                    fref = RL.lrua_forward(*a64, gamma)
                    bref = RL.lrua_backward(dreads.astype(np.float64), *a64, gamma)
                    # the step pair at step 0 of the same episode, with incoming gradients
                    rng = np.random.default_rng(sum(shape) + 1)
                    step = [args[0][0], args[1][0] if per_step else args[1], *args[2:]]
                    grads = [dreads[0], rng.standard_normal((B, S, W)).astype(dtype),
                             rng.standard_normal((B, H, S)).astype(dtype)]
                    s64 = [x.astype(np.float64) for x in step]
                    g64 = [x.astype(np.float64) for x in grads]
                    sfref = RL.lrua_step_forward(*s64, gamma)
                    sbref = RL.lrua_step_backward(*g64, *s64, gamma)
                    second = Second(KL, (dreads.astype(np.float64), a64, g64, s64, gamma))
                    tag = shape + (("alpha (T, B, H)",) if per_step else ("alpha (H,)",))
                    c, cs = 4 * T * (S + W + H), 4 * (S + W + H)
                    for backend in self.backends:
                        def run(backend=backend, args=args, dreads=dreads, fref=fref,
                                bref=bref, dtype=dtype, tag=tag, c=c, second=second):
                            got = KL.lrua_forward(*args, gamma, backend=backend)
                            for i, (name, a, r) in enumerate(zip(
                                    ("reads", "w_r", "w_w", "w_u", "w_lu", "memory"), got,
                                    fref)):
                                if name == "w_lu":
                                    self.exact("lrua_forward w_lu", backend, dtype, tag, a, r)
                                else:
                                    self.normwise("lrua_forward " + name, backend, dtype,
                                                  tag, a, r, c, second.get("forward", i))
                            got = KL.lrua_backward(dreads, *args, gamma, backend=backend)
                            for i, (name, a, r) in enumerate(zip(
                                    ("dkeys", "dalpha", "dmemory0", "dread0"), got, bref)):
                                self.normwise("lrua_backward " + name, backend, dtype, tag,
                                              a, r, c, second.get("backward", i))

                        def run_step(backend=backend, step=step, grads=grads, sfref=sfref,
                                     sbref=sbref, dtype=dtype, tag=tag, cs=cs, second=second):
                            got = KL.lrua_step_forward(*step, gamma, backend=backend)
                            for i, (name, a, r) in enumerate(zip(
                                    ("read", "memory", "w_r", "w_w", "w_u"), got, sfref)):
                                self.normwise("lrua_step_forward " + name, backend, dtype,
                                              tag, a, r, cs, second.get("step_forward", i))
                            got = KL.lrua_step_backward(*grads, *step, gamma, backend=backend)
                            for i, (name, a, r) in enumerate(zip(
                                    ("dkey", "dalpha", "dmemory_prev", "dw_r_prev"), got,
                                    sbref)):
                                self.normwise("lrua_step_backward " + name, backend, dtype,
                                              tag, a, r, cs, second.get("step_backward", i))
                        self.guarded("lrua_forward/backward", backend, dtype, tag, run)
                        self.guarded("lrua_step_forward/backward", backend, dtype, tag,
                                     run_step)
            print(f"  LRUA (T, B, H, S, W) = {shape}: {time.perf_counter() - t0:.1f} s",
                  flush=True)

    # ------------------------------------------------------------ report
    def report(self, seconds, stopped=False):
        np = self.np
        dts = ("float32", "float64")
        cols = [(b, d) for b in self.backends for d in dts]
        ops = sorted({k[0] for k in self.worst}, key=lambda o: (not o.startswith("pair"),
                                                                 not o.startswith("proto"), o))
        print(f"\nworst error / bound over the shapes (<= 1 passes); {self.checks} checks, "
              f"{seconds:.0f} s")
        width = max(len(o) for o in ops) if ops else 10
        print("  " + "op".ljust(width) + "".join(f"  {b + ' ' + d[-2:]:>14}" for b, d in cols))
        for op in ops:
            cells = []
            for b, d in cols:
                w = self.worst.get((op, b, d))
                cells.append(f"  {'-' if w is None else f'{w[0]:.3f}':>14}")
            print("  " + op.ljust(width) + "".join(cells))
        if self.floored:
            print(f"{len(self.floored)} checks passed only within the float64 rounding floor "
                  f"(ill-conditioned outputs; see Sweep.normwise):")
            for line in self.floored:
                print(line)
        for line in self.failures:
            print(line)
        ok = not self.failures and not stopped
        verdict = "INCOMPLETE (stopped)" if stopped else "PASS" if ok else "FAIL"
        print(f"gpu_sweep: {verdict}: {self.checks - len(self.failures)} of "
              f"{self.checks} checks within their bounds"
              + (" (simulator, not a GPU)" if self.simulated else ""))
        del np
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
