"""Non-finite losses and gradients are never returned silently: the fused MAML kernel's
float32 k = 5, alpha = 0.1 overflow (float64 finite), the NumPy MAML / Reptile paths, Model
passes, the 'warn' policy and its environment variable, and the trainer, which stops at the
bad step and keeps the last good checkpoint."""
import json
import warnings

import numpy as np
import pytest

import metacore
from metacore import nonfinite
from metacore.algorithms.maml import fomaml_gradient, maml_gradient
from metacore.algorithms.reptile import reptile_direction
from metacore.checkpoint import load_checkpoint
from metacore.models import sinusoid_mlp
from metacore.training import Trainer, make_config

MODEL = sinusoid_mlp()


@pytest.fixture(autouse=True)
def _default_policy():
    old = metacore.nonfinite.set_policy("raise")
    yield
    metacore.nonfinite.set_policy(old)


def diverging_case(dtype):
    """A sinusoid meta-batch (4 tasks, 5 support and 5 query points) from a poor theta
    (init + 0.3 noise): 5 inner steps at alpha = 0.1 diverge; the query loss reaches ~1e73,
    finite in float64, past float32's 3.4e38 (the case of issue 18)."""
    rng = np.random.default_rng(4)
    theta = MODEL.init_params(rng, np.float64) + 0.3 * rng.standard_normal(MODEL.num_params)
    T, N, M = 4, 5, 5
    sx, qx = rng.uniform(-5, 5, (T, N, 1)), rng.uniform(-5, 5, (T, M, 1))
    amp, ph = rng.uniform(0.1, 5, T)[:, None, None], rng.uniform(0, np.pi, T)[:, None, None]
    sy, qy = amp * np.sin(sx - ph), amp * np.sin(qx - ph)
    return [np.ascontiguousarray(a.astype(dtype)) for a in (theta, sx, sy, qx, qy)]


CAUSE = r"float32 overflow: try float64 or a smaller alpha"


def test_fused_kernel_float32_k5_alpha01_raises_naming_op_dtype_and_cause():
    pytest.importorskip("numba")
    from metacore.algorithms.mlp_maml import mlp_maml_gradient
    loss64, grad64 = mlp_maml_gradient(MODEL, *diverging_case(np.float64), alpha=0.1, steps=5)
    assert np.isfinite(loss64).all() and np.isfinite(grad64).all()
    assert loss64.max() > 1e38                       # finite only because it is float64
    with pytest.raises(FloatingPointError,
                       match=r"mlp_maml_gradient: non-finite query loss.*in float32.*" + CAUSE):
        mlp_maml_gradient(MODEL, *diverging_case(np.float32), alpha=0.1, steps=5)
    # first order and Reptile go through the same boundary
    with pytest.raises(FloatingPointError, match="mlp_maml_gradient.*float32"):
        mlp_maml_gradient(MODEL, *diverging_case(np.float32), alpha=0.1, steps=5,
                          first_order=True)


def test_fused_kernel_warn_policy_returns_the_values_with_a_warning():
    pytest.importorskip("numba")
    from metacore.algorithms.mlp_maml import mlp_maml_gradient
    with nonfinite.policy("warn"):
        with pytest.warns(nonfinite.NonFiniteWarning, match="float32 overflow"):
            loss, grad = mlp_maml_gradient(MODEL, *diverging_case(np.float32), alpha=0.1,
                                           steps=5)
    assert not np.isfinite(loss).all() and not np.isfinite(grad).all()
    assert metacore.nonfinite.get_policy() == "raise"          # restored after the block


def test_finite_results_pass_silently():
    pytest.importorskip("numba")
    from metacore.algorithms.mlp_maml import mlp_maml_gradient
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grad = mlp_maml_gradient(MODEL, *diverging_case(np.float32), alpha=0.001,
                                       steps=1)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()


@pytest.mark.parametrize("first_order", [False, True])
def test_numpy_maml_gradient_raises(first_order):
    theta, sx, sy, qx, qy = diverging_case(np.float32)
    op = "fomaml_gradient" if first_order else "maml_gradient"
    with pytest.raises(FloatingPointError, match=op + r": non-finite .*float32.*" + CAUSE):
        maml_gradient(MODEL, theta, sx, sy, qx, qy, 0.1, 5, first_order=first_order)
    r = maml_gradient(MODEL, *diverging_case(np.float64), 0.1, 5, first_order=first_order)
    assert np.isfinite(r.grad).all()
    if first_order:
        with pytest.raises(FloatingPointError, match="fomaml_gradient"):
            fomaml_gradient(MODEL, theta, sx, sy, qx, qy, 0.1, 5)


def test_reptile_direction_raises():
    theta, sx, sy, _, _ = diverging_case(np.float32)
    with pytest.raises(FloatingPointError, match=r"reptile_direction: non-finite .*float32"):
        reptile_direction(MODEL, theta, sx, sy, 0.5, 8)


@pytest.mark.parametrize("op", ["loss", "loss_and_grad", "hvp"])
def test_model_passes_raise_on_overflow(op):
    rng = np.random.default_rng(0)
    theta = (MODEL.init_params(rng, np.float32) * 1e15)[None]    # (1, P): finite, too large
    x = rng.uniform(-5, 5, (1, 5, 1)).astype(np.float32)
    y = np.zeros((1, 5, 1), np.float32)
    args = (theta, x, y) + ((np.ones_like(theta),) if op == "hvp" else ())
    with pytest.raises(FloatingPointError,
                       match=rf"Model sinusoid_mlp\.{op}: non-finite loss.*float32.*"
                             r"float32 overflow: try float64"):
        getattr(MODEL, op)(*args)
    out = getattr(MODEL, op)(*[a.astype(np.float64) for a in args])   # fine in float64
    assert all(np.isfinite(o).all() for o in (out if isinstance(out, tuple) else (out,)))


def test_environment_variable_sets_the_policy(monkeypatch):
    from metacore.kernels import _nonfinite as impl
    monkeypatch.setitem(impl._state, "policy", None)
    monkeypatch.setenv("METACORE_NONFINITE", "warn")
    assert nonfinite.get_policy() == "warn"
    monkeypatch.setitem(impl._state, "policy", None)
    monkeypatch.setenv("METACORE_NONFINITE", "ignore")
    with pytest.raises(ValueError, match="METACORE_NONFINITE"):
        nonfinite.get_policy()
    with pytest.raises(ValueError, match="policy must be one of"):
        metacore.nonfinite.set_policy("ignore")


def test_all_finite_is_exact():
    f32 = np.float32
    assert nonfinite.all_finite(np.array([3e38, 3e38], f32))     # the sum overflows, not them
    assert not nonfinite.all_finite(np.array([1.0, np.nan], f32))
    assert not nonfinite.all_finite(np.array([np.inf, -np.inf]))
    assert not nonfinite.all_finite(np.array([[1.0], [np.inf]]))
    assert nonfinite.all_finite(np.zeros(0))


# ---------------------------------------------------------------------------- trainer
def _cfg(tmp_path, **over):
    base = dict(iterations=8, eval_every=100, eval_tasks=4, log_every=1, ckpt_every=2,
                seed=2, meta_batch=3)
    base.update(over)
    return make_config("maml", "sinusoid", tmp_path, **base)


def test_trainer_stops_at_the_bad_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                         monkeypatch):
    trainer = Trainer(_cfg(tmp_path), progress=False)
    real, calls = trainer.method.gradient, []

    def gradient(params, batch):                     # step 5 (1-based) goes non-finite
        grad, metrics = real(params, batch)
        calls.append(1)
        return (grad * np.nan if len(calls) == 5 else grad), metrics
    monkeypatch.setattr(trainer.method, "gradient", gradient)
    with pytest.raises(FloatingPointError,
                       match=r"non-finite meta-gradient at step 5 .*checkpoint.npz at step 4"):
        trainer.train()
    arrays, meta = load_checkpoint(tmp_path / "checkpoint.npz")
    assert meta["step"] == 4 and np.isfinite(arrays["params"]).all()
    assert np.array_equal(arrays["params"], trainer.params)      # the bad update not applied
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert recs[-1]["kind"] == "stopped" and recs[-1]["step"] == 5
    resumed = Trainer(_cfg(tmp_path), resume=True, progress=False)  # the run continues
    assert resumed.step == 4
    resumed.train()
    assert resumed.step == 8


def test_trainer_stops_on_a_real_float32_divergence(tmp_path):
    """A huge outer rate blows the parameters up; the op's FloatingPointError becomes the
    trainer's report, with the step and the last checkpoint."""
    cfg = _cfg(tmp_path, dtype="float32", outer_opt="sgd", outer_lr=1e12, ckpt_every=1)
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(FloatingPointError, match=r"train: non-finite meta-gradient at step "
                                                 r"(\d+) \(maml, float32\).*at step") as info:
        trainer.train()
    import re
    bad = int(re.search(r"at step (\d+) \(maml", str(info.value)).group(1))
    assert trainer.step == bad - 1 >= 1
    _, meta = load_checkpoint(tmp_path / "checkpoint.npz")
    assert meta["step"] == trainer.step
    assert "Cause: " in str(info.value)


def test_algorithm_entry_points_raise():
    """The episode-gradient entry points of the other methods share the boundary check."""
    from metacore.algorithms import ProtoNet
    from metacore.algorithms.mann import MANN
    from metacore.models import conv4_protonet
    rng = np.random.default_rng(0)
    pn = ProtoNet(conv4_protonet(image_shape=(6, 6, 1), channels=2, depth=2),
                  backend="reference")
    p = pn.init_params(rng, np.float32)
    sy = np.tile(np.arange(3), (1, 2))
    sx, qx = rng.random((1, 6, 6, 6, 1), np.float32), rng.random((1, 3, 6, 6, 1), np.float32)
    qy = np.arange(3)[None]
    loss, grad, _ = pn.episode_loss_and_grad(p, sx, sy, qx, qy)
    assert np.isfinite(grad).all()
    big = p.copy()                    # the last BN scale 1e20: embeddings ~1e20, finite;
    last = [n for n in pn.layout.names if "gamma" in n][-1]   # squared distances overflow
    big[pn.layout.slice(last)] *= np.float32(1e20)
    # the fused loss kernel (kernels/distance.py) is the first to see the overflow
    with pytest.raises(FloatingPointError, match=r"(ProtoNet\.episode_loss_and_grad|"
                                                 r"protonet_loss): non-finite .*float32 "
                                                 r"overflow"):
        pn.episode_loss_and_grad(big, sx, sy, qx, qy)
    model = MANN(d_in=6, n_way=3, hidden=4, heads=2, slots=5, width=3, gamma=0.9)
    theta = model.init_params(rng, np.float32)
    x, y = rng.standard_normal((5, 2, 6)).astype(np.float32), rng.integers(0, 3, (5, 2))
    with nonfinite.policy("warn"):
        with pytest.warns(nonfinite.NonFiniteWarning, match=r"MANN\.loss_grad"):
            model.loss_grad(theta * np.float32(1e30), x, y, "reference")
