"""Where the time of one Conv-4 second-order MAML step goes (issue 17 item 2).

    taskset -c 1 python -m bench.profile_conv4 [--T 4] [--calls 10] [--rounds 5] [--out FILE]

The step: metacore.algorithms.maml.maml_gradient on conv4_maml, 5-way 1-shot, 15 queries per
class, T tasks, k = 1, alpha = 0.4, float32, real Omniglot episodes (bench/peers/workloads.py's
inputs), one thread. With k = 1 it runs, for all T tasks at once:
  support forward + backward at theta_0 (the inner step), query forward + backward at theta_1,
  and the HVP at theta_0 (support forward again, R-forward, then one sweep carrying backward
  and R-backward).

How: every layer instance's forward / backward / rforward / rbackward is wrapped with a timer
(time.thread_time: this thread's CPU time, so that other processes on a shared core do not
land in the timers), and inside the conv layers the GEMMs (np.matmul, counted in FLOPs from the
operand shapes: 2 m k n each), the im2col / col2im copies (the Numba kernels and the NumPy
fallback) and the zero padding are timed separately, the 1-channel image layer's direct
kernels (no im2col) as its "GEMM"; the fused BatchNorm + ReLU of Model.forward / backward
counts as the batch norm's forward / backward (the ReLU rows keep their R-passes);
"other" is the rest of the layer's time (checks, chunk bookkeeping, bias, db). Timers cost
about a microsecond each: the total with timers is printed beside the plain step's median
(plain and instrumented calls are interleaved, `rounds` rounds of `calls` calls each).

GFLOP/s of a pass = its GEMM FLOPs / the pass's whole time; GEMM GFLOP/s = the same FLOPs /
the GEMM time alone. The peak is this core's FMA throughput measured by
bench/peers/roofline.py in this process (12 independent 256-bit FMA chains).
"""
import argparse
import collections
import os
import time

import numpy as np

# CPU time of this thread: on a core shared with other processes the wall time would count
# their time slices inside whichever timer is open
CLOCK = time.thread_time

PASSES = ("forward", "backward", "rforward", "rbackward")
PASS_NAMES = {"forward": "forward", "backward": "backward", "rforward": "R-forward",
              "rbackward": "R-backward"}


class _Prof:
    def __init__(self):
        self.stack = []
        self.t = collections.defaultdict(float)       # (layer, pass, part) -> seconds
        self.flops = collections.defaultdict(float)   # (layer, pass) -> GEMM FLOPs
        self.on = False

    def ctx(self):
        return self.stack[-1] if self.stack else ("(outside layers)", "-")


P = _Prof()


def _wrap_method(layer, label, name, key=None):
    """Time layer.name under (label, key or name)."""
    fn = getattr(layer, name)
    key = key or name

    def timed(*a, **k):
        if not P.on:
            return fn(*a, **k)
        P.stack.append((label, key))
        t0 = CLOCK()
        try:
            return fn(*a, **k)
        finally:
            P.t[(label, key, "total")] += CLOCK() - t0
            P.stack.pop()
    setattr(layer, name, timed)


def _wrap_part(mod, attr, part, flops=None):
    fn = getattr(mod, attr)

    def timed(*a, **k):
        if not P.on:
            return fn(*a, **k)
        label, pas = P.ctx()
        t0 = CLOCK()
        out = fn(*a, **k)
        P.t[(label, pas, part)] += CLOCK() - t0
        if flops is not None:
            P.flops[(label, pas)] += flops(*a)
        return out
    setattr(mod, attr, timed)
    return fn


class _NumpyProxy:
    """The numpy module with matmul timed (installed as a layer module's `np`)."""

    def __init__(self):
        self._mm = _timed_matmul

    def __getattr__(self, name):
        if name == "matmul":
            return self._mm
        return getattr(np, name)


def _mm_flops(a, b, *_, **__):
    a, b = np.asarray(a), np.asarray(b)
    batch = int(np.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))) if a.ndim > 2 or b.ndim > 2 else 1
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


def _timed_matmul(a, b, *args, **kw):
    if not P.on:
        return np.matmul(a, b, *args, **kw)
    label, pas = P.ctx()
    t0 = CLOCK()
    out = np.matmul(a, b, *args, **kw)
    P.t[(label, pas, "gemm")] += CLOCK() - t0
    P.flops[(label, pas)] += _mm_flops(a, b)
    return out


def instrument(model):
    """Wrap every layer's passes and the conv/linear internals (once per process)."""
    from metacore.kernels import convnet_numba as KN
    from metacore.layers import conv2d as cv
    from metacore.layers import linear as ln
    from metacore.network import BatchNorm, Conv2d, Linear, ReLU
    counts = collections.Counter()
    labels = []
    for layer in model.layers:
        kind = type(layer).__name__
        counts[kind] += 1
        short = {"Conv2d": "conv", "BatchNorm": "bn", "ReLU": "relu", "Linear": "linear",
                 "MeanPool": "meanpool"}.get(kind, kind.lower())
        label = f"{short}{counts[kind]}" if isinstance(layer, (Conv2d, BatchNorm, ReLU)) else short
        labels.append(label)
        for name in PASSES:
            _wrap_method(layer, label, name)
        if isinstance(layer, BatchNorm):        # the fused BatchNorm + ReLU of Model.forward
            _wrap_method(layer, label, "forward_relu", "forward")     # and .backward: counted
            _wrap_method(layer, label, "backward_relu", "backward")   # as the BN's passes
    cv.np = _NumpyProxy()
    ln.np = _NumpyProxy()
    _wrap_part(KN, "im2col", "im2col")
    # the direct kernels of the 1-channel layer do the GEMM's arithmetic (and its packing):
    # counted as "gemm", with the FLOPs of the GEMM they replace, 2 (B Ho Wo) (K K C) F
    _wrap_part(KN, "conv_direct_forward", "gemm",
               lambda x, w, b, *r: 2.0 * r[-1].shape[0] * r[-1].shape[1] * w.shape[1] * w.shape[2])
    _wrap_part(KN, "conv_direct_dw", "gemm",
               lambda x, dy, *r: 2.0 * dy.shape[0] * dy.shape[1] * dy.shape[2] * r[-2].shape[1])
    _wrap_part(KN, "col2im", "col2im")
    _wrap_part(cv, "_im2col", "im2col")
    _wrap_part(cv, "_col2im", "col2im")
    _wrap_part(cv, "_pad", "pad")
    return labels


def conv_pass_flops(model, T, rows):
    """Analytic GEMM FLOPs per conv layer and pass for `rows` images per task (the check on
    the counted ones): forward 2 M KKC F; backward dw 2 M KKC F, dx the same but the first
    layer; R-forward one term (first layer, R{x} = 0) or two; R-backward dw 1 or 2 terms, dx
    2 terms but the first layer. M = T rows Ho Wo."""
    from metacore.network import Conv2d
    out, shape, l = {}, model.in_shape, 0
    for layer in model.layers:
        o = layer.out_shape(shape)
        if isinstance(layer, Conv2d):
            l += 1
            f = 2.0 * T * rows * o[0] * o[1] * 9 * layer.c_in * layer.c_out
            first = l == 1
            out[f"conv{l}"] = {"forward": f, "backward": f * (1 if first else 2),
                               "rforward": f * (1 if first else 2),
                               "rbackward": f * (1 if first else 4)}
        shape = o
    return out


def fma_peak_cpu(n=2_000_000, repeats=7):
    """bench/peers/roofline.py's FMA peak (12 independent 256-bit float32 FMA chains), timed
    by this thread's CPU time: GFLOP/s of one core."""
    from bench.peers import roofline
    old = os.environ.get("METACORE_BENCH_CLOCK")
    os.environ["METACORE_BENCH_CLOCK"] = "cpu"
    try:
        return roofline.fma_peak(np.float32, n, repeats)
    finally:
        if old is None:
            del os.environ["METACORE_BENCH_CLOCK"]
        else:
            os.environ["METACORE_BENCH_CLOCK"] = old


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.profile_conv4")
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from bench.peers import workloads as W
    from metacore.algorithms.maml import maml_gradient
    from metacore.models import conv4_maml

    cfg = dict(T=args.T, k=1, n_way=5, shots=1, queries=15, alpha=0.4)
    inputs = W.make_conv4(cfg)
    model = conv4_maml(n_way=5)
    a = {n: v for n, v in inputs.items()}

    def step():
        return maml_gradient(model, a["theta"], a["sx"], a["sy"], a["qx"], a["qy"], 0.4,
                             steps=1)

    ref = step()
    labels = instrument(model)
    P.on = True
    got = step()                                   # warm-up of the instrumented path
    P.on = False
    assert np.array_equal(ref.grad, got.grad), "instrumentation changed the result"
    P.t.clear()
    P.flops.clear()
    plain, prof = [], []
    for _ in range(args.rounds):                    # interleaved rounds
        for _ in range(args.calls):
            t0 = CLOCK()
            step()
            plain.append(CLOCK() - t0)
        P.on = True
        for _ in range(args.calls):
            t0 = CLOCK()
            step()
            prof.append(CLOCK() - t0)
        P.on = False
    n = args.rounds * args.calls
    peak = fma_peak_cpu()
    t_plain, t_prof = float(np.median(plain)), float(np.median(prof))
    t_step = float(np.mean(prof))       # the per-layer sums below are means: shares of this

    # ---- tables
    L = []
    L.append(f"Conv-4 second-order MAML step, T = {args.T}, 5-way 1-shot, 15 queries, k = 1, "
             f"float32, 1 thread. Plain step: median {t_plain * 1e3:.1f} ms (min "
             f"{min(plain) * 1e3:.1f} ms); instrumented: median {t_prof * 1e3:.1f} ms "
             f"(timer overhead {100 * (t_prof / t_plain - 1):+.1f} %); "
             f"{args.rounds} interleaved rounds of {args.calls} calls each; CPU time of the "
             f"thread (time.thread_time). Per-step times "
             f"below are the instrumented totals / {n} calls. FMA peak of this core, measured "
             f"in the same process: {peak:.1f} GFLOP/s float32.")
    L.append("")
    L.append("Per layer and pass (ms per step; GFLOP/s = the pass's GEMM FLOPs / its whole "
             "time):")
    L.append("")
    L.append("| layer | forward | backward | R-forward | R-backward | total | share | "
             "GEMM GFLOP | GFLOP/s | % of peak |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    grand = sum(v for (l, p, part), v in P.t.items() if part == "total") / n
    rows_part = collections.defaultdict(float)
    for label in labels:
        cells, tot, fl = [], 0.0, 0.0
        for p in PASSES:
            v = P.t.get((label, p, "total"), 0.0) / n
            tot += v
            fl += P.flops.get((label, p), 0.0) / n
            cells.append(f"{v * 1e3:.2f}")
        for part in ("gemm", "im2col", "col2im", "pad"):
            rows_part[part] += sum(P.t.get((label, p, part), 0.0) for p in PASSES) / n
        L.append(f"| {label} | " + " | ".join(cells) + f" | {tot * 1e3:.2f} | "
                 f"{100 * tot / t_step:.1f} % | {fl / 1e9:.3f} | "
                 + (f"{fl / tot / 1e9:.1f} | {100 * fl / tot / 1e9 / peak:.0f} % |" if fl
                    else "- | - |"))
    outside = t_step - grand
    L.append(f"| outside the layers (loss, inner update, HVP bookkeeping, joins) | | | | | "
             f"{outside * 1e3:.2f} | {100 * outside / t_step:.1f} % | | | |")
    L.append("")
    L.append("Conv layers split by what runs inside them (ms per step, all four passes):")
    L.append("")
    L.append("| layer | pass | total | GEMM | im2col | col2im | pad | other | GEMM GFLOP | "
             "GEMM GFLOP/s | pass GFLOP/s | % of peak (pass) | analytic GFLOP |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    sup = conv_pass_flops(model, args.T, 5)
    qry = conv_pass_flops(model, args.T, 75)
    conv_tot = {"total": 0.0, "gemm": 0.0, "im2col": 0.0, "col2im": 0.0, "pad": 0.0}
    conv_flops = 0.0
    for label in labels:
        if not label.startswith("conv"):
            continue
        for p in PASSES:
            tot = P.t.get((label, p, "total"), 0.0) / n
            parts = {q: P.t.get((label, p, q), 0.0) / n for q in ("gemm", "im2col", "col2im",
                                                                    "pad")}
            fl = P.flops.get((label, p), 0.0) / n
            for q in conv_tot:
                conv_tot[q] += tot if q == "total" else parts[q]
            conv_flops += fl
            other = tot - sum(parts.values())
            # forward runs 3 times per step (support at theta_0, query, support again in
            # the HVP), backward 3 times (support, query, in the HVP), R-passes once (support)
            s, q_ = sup[label][p], qry[label][p]
            analytic = 2 * s + q_ if p in ("forward", "backward") else s
            L.append(f"| {label} | {PASS_NAMES[p]} | {tot * 1e3:.2f} | {parts['gemm'] * 1e3:.2f} | "
                     f"{parts['im2col'] * 1e3:.2f} | {parts['col2im'] * 1e3:.2f} | "
                     f"{parts['pad'] * 1e3:.2f} | {other * 1e3:.2f} | {fl / 1e9:.3f} | "
                     f"{fl / max(parts['gemm'], 1e-12) / 1e9:.1f} | {fl / max(tot, 1e-12) / 1e9:.1f} | "
                     f"{100 * fl / max(tot, 1e-12) / 1e9 / peak:.0f} % | {analytic / 1e9:.3f} |")
    L.append("")
    L.append("Where the time goes (ms per step, share of the instrumented step's mean):")
    L.append("")
    L.append("| what | ms | share |")
    L.append("|---|---|---|")
    bn = sum(P.t.get((l, p, "total"), 0.0) for l in labels if l.startswith("bn")
             for p in PASSES) / n
    relu = sum(P.t.get((l, p, "total"), 0.0) for l in labels if l.startswith("relu")
               for p in PASSES) / n
    rest_layers = grand - conv_tot["total"] - bn - relu
    conv_other = conv_tot["total"] - conv_tot["gemm"] - conv_tot["im2col"] - \
        conv_tot["col2im"] - conv_tot["pad"]
    for what, v in [("conv GEMMs (layer 1: the direct kernels)", conv_tot["gemm"]), ("conv im2col (packing)", conv_tot["im2col"]),
                    ("conv col2im (adjoint of packing)", conv_tot["col2im"]),
                    ("conv zero padding (NumPy path, layer 1)", conv_tot["pad"]),
                    ("conv other (checks, bias, db, chunk copies)", conv_other),
                    ("batch norm (4 passes)", bn), ("ReLU (4 passes)", relu),
                    ("mean pool + linear head", rest_layers),
                    ("outside the layers (loss, updates, parameter split/join)", outside)]:
        L.append(f"| {what} | {v * 1e3:.2f} | {100 * v / t_step:.1f} % |")
    L.append(f"| **step (instrumented, mean)** | {t_step * 1e3:.2f} | 100 % |")
    L.append("")
    L.append(f"Conv GEMM FLOPs per step {conv_flops / 1e9:.3f} GFLOP: over the GEMM time "
             f"{conv_flops / conv_tot['gemm'] / 1e9:.1f} GFLOP/s "
             f"({100 * conv_flops / conv_tot['gemm'] / 1e9 / peak:.0f} % of peak), over the "
             f"whole step {conv_flops / t_step / 1e9:.1f} GFLOP/s "
             f"({100 * conv_flops / t_step / 1e9 / peak:.0f} % of peak).")
    text = "\n".join(L)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"<!-- generated by python -m bench.profile_conv4 "
                    f"{' '.join(argv or [])} -->\n" + text + "\n")


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
