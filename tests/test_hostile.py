"""Hostile input, table-driven: every case names the exact exception type (API) or the
one-line message (CLI) it expects.

API cases call the library directly and check `type(error) is TYPE` and a fragment of its
message. CLI cases run `metacore.cli.main` in this process (a subprocess costs about a
second of start-up each) and check exit status 2, a stderr of exactly one line
`metacore <command>: error: ...` containing the fragment, no traceback, and a time bound
(SIGALRM), so that no bad input hangs. A handful run as real subprocesses with a timeout,
for the process-level behaviour: exit status, --debug and METACORE_DEBUG=1.

Shape letters: T tasks, Q queries, N prototypes / points, D features, P parameters.
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from metacore import checkpoint as C
from metacore.algorithms.maml import adapt, maml_gradient, meta_objective
from metacore.algorithms.reptile import reptile_direction
from metacore.errors import RunDirError, RunExistsError, UserError
from metacore.evaluation import adapt_and_score, evaluate
from metacore.kernels import distance as K
from metacore.losses.softmax_ce import softmax_ce_forward
from metacore.models import sinusoid_mlp
from metacore.stats import mean_ci
from metacore.training import Trainer, load_run, make_config, read_config

from _run_helpers import ROOT, child_env

CheckpointError = C.CheckpointError
CLI_BOUND_S = 60             # no CLI call on bad input may take longer (tiny runs here)

# ---------------------------------------------------------------------------- fixtures
RUN_SETS = dict(iterations=2, eval_every=2, log_every=1, ckpt_every=2, seed=1)
TINY_PROTO = dict(channels=8, n_way=3, queries=2, val_way=3, val_episodes=3)


def _train(out, algo, task, **over):
    with Trainer(make_config(algo, task, out, **dict(RUN_SETS, **over)), progress=False) as t:
        t.train()
    return str(out)


def _damaged(base, src, name, damage):
    """A copy of run `src` named `name` with damage(dir) applied."""
    dst = os.path.join(base, name)
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def _rewrite_params(run, fn):
    path = os.path.join(run, "checkpoint.npz")
    arrays, meta = C.load_checkpoint(path)
    arrays["params"] = fn(arrays["params"])
    C.save_checkpoint(path, arrays, meta)


def _truncate(run):
    path = os.path.join(run, "checkpoint.npz")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _flip(run):
    path = os.path.join(run, "checkpoint.npz")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def _write(run, name, text):
    with open(os.path.join(run, name), "w") as f:
        f.write(text)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("hostile"))
    r = {"base": base}
    r["sin"] = _train(os.path.join(base, "sin"), "maml", "sinusoid", eval_tasks=2)
    r["msgd"] = _train(os.path.join(base, "msgd"), "metasgd", "sinusoid", eval_tasks=2)
    r["proto"] = _train(os.path.join(base, "proto"), "protonet", "omniglot", **TINY_PROTO)
    sin = r["sin"]
    r["nockpt"] = _damaged(base, sin, "nockpt",
                           lambda d: os.remove(os.path.join(d, "checkpoint.npz")))
    r["badjson"] = _damaged(base, sin, "badjson", lambda d: _write(d, "config.json", "{"))
    r["listjson"] = _damaged(base, sin, "listjson", lambda d: _write(d, "config.json", "[]"))
    r["trunc"] = _damaged(base, sin, "trunc", _truncate)
    r["emptyck"] = _damaged(base, sin, "emptyck", lambda d: _write(d, "checkpoint.npz", ""))
    r["flip"] = _damaged(base, sin, "flip", _flip)
    r["nanp"] = _damaged(base, sin, "nanp", lambda d: _rewrite_params(
        d, lambda p: np.where(np.arange(p.size) == 3, np.nan, p).astype(p.dtype)))
    r["shortp"] = _damaged(base, sin, "shortp", lambda d: _rewrite_params(d, lambda p: p[:3]))
    r["pickled"] = _damaged(base, sin, "pickled", lambda d: np.savez(
        os.path.join(d, "checkpoint.npz"), x=np.array([{"a": 1}], dtype=object)))
    r["empty"] = os.path.join(base, "empty")
    os.makedirs(r["empty"])
    r["afile"] = os.path.join(base, "afile")
    _write(base, "afile", "not a directory")
    r["fresh"] = os.path.join(base, "fresh")          # never created by a refused command
    r["digest"] = _digest_tree(sin)
    return r


def _digest_tree(path):
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# ---------------------------------------------------------------------------- API cases
rng = np.random.default_rng(0)
MODEL = sinusoid_mlp(hidden=(3,))
P = MODEL.num_params
THETA = MODEL.init_params(rng, np.float64)
X = rng.standard_normal((2, 4, 1))          # (T, N, 1)
Y = rng.standard_normal((2, 4, 1))
X0 = np.zeros((0, 4, 1))                    # no tasks


def _pair(T=2, Q=3, N=4, D=5, dtype=np.float64):
    g = np.random.default_rng(1)
    return (g.standard_normal((T, Q, D)).astype(dtype),
            g.standard_normal((T, N, D)).astype(dtype))


def _labels(T=2, Q=3, N=4):
    return np.random.default_rng(2).integers(0, N, (T, Q))


def _proto(**kw):
    q, s = _pair(**{k: kw.pop(k) for k in ("T", "Q", "N", "D") if k in kw})
    y = kw.pop("y") if "y" in kw else _labels(q.shape[0], q.shape[1], s.shape[1])
    return K.protonet_loss(q, s, y, **kw)


def _mc(algo, task="sinusoid", **over):
    return lambda r: make_config(algo, task, "unused_out", **over)


def _logits(values, dtype=np.float32):
    return np.array([[values]], dtype)                  # (1, 1, K)


def _trainer(out, resume=False, **over):
    over = dict(RUN_SETS, eval_tasks=2, **over)
    return lambda: Trainer(make_config("maml", "sinusoid", out, **over),
                           resume=resume, progress=False)


def _sampler(n_way, k_shot, q_query):
    from metacore.data.omniglot import EpisodeSampler
    images = np.zeros((3, 20, 4, 4), np.float32)         # (C characters, D drawings, H, W)
    return EpisodeSampler(images, np.arange(3), n_way, k_shot, q_query, seed=0)


def _protonet_episode(T):
    from metacore.algorithms.protonet import ProtoNet
    from metacore.models import conv4_protonet
    net = ProtoNet(conv4_protonet(channels=2))
    params = net.init_params(np.random.default_rng(0), np.float64)
    sx, qx = np.zeros((T, 2, 28, 28, 1)), np.zeros((T, 2, 28, 28, 1))
    sy = qy = np.tile(np.arange(2), (T, 1))
    return lambda: net.episode_loss_and_grad(params, sx, sy, qx, qy)


NEG_ALPHA = np.full(P, 0.01)
NEG_ALPHA[2] = -0.5

# (id, thunk taking the runs fixture, exact exception type, message fragment)
API = [
    # make_config: settings
    ("protonet n_way 5000", _mc("protonet", "omniglot", n_way=5000), UserError,
     "n_way = 5000 exceeds the 4112 classes"),
    ("protonet val_way 1000", _mc("protonet", "omniglot", val_way=1000), UserError,
     "val_way = 1000 exceeds the 688 classes"),
    ("protonet shots 10 (val queries)", _mc("protonet", "omniglot", shots=10), UserError,
     "shots + the 15 validation queries = 25 exceeds"),
    ("protonet queries 30", _mc("protonet", "omniglot", queries=30), UserError,
     "shots + queries = 31 exceeds Omniglot's 20"),
    ("maml omniglot n_way 500", _mc("maml", "omniglot", n_way=500), UserError,
     "n_way = 500 exceeds the 400 classes"),
    ("maml omniglot shots 15", _mc("maml", "omniglot", shots=15), UserError,
     "shots + queries = 30 exceeds"),
    ("maml sinusoid n_way 2", _mc("maml", n_way=2), UserError,
     "n_way does not apply to sinusoid regression"),
    ("metasgd inner_lr -0.1", _mc("metasgd", inner_lr=-0.1), UserError,
     "inner_lr must be a finite number >= 0"),
    ("maml inner_lr nan", _mc("maml", inner_lr=float("nan")), UserError,
     "inner_lr must be a finite number >= 0"),
    ("outer_lr inf", _mc("maml", outer_lr=float("inf")), UserError,
     "outer_lr must be a finite number >= 0"),
    ("iterations -1", _mc("maml", iterations=-1), UserError, "iterations must be a positive int"),
    ("iterations True", _mc("maml", iterations=True), UserError,
     "iterations must be a positive int"),
    ("log_every 0", _mc("maml", log_every=0), UserError, "log_every must be a positive int"),
    ("seed -1", _mc("maml", seed=-1), UserError, "seed must be an int >= 0"),
    ("dtype float16", _mc("maml", dtype="float16"), UserError, "dtype must be 'float32'"),
    ("outer_opt lbfgs", _mc("maml", outer_opt="lbfgs"), UserError,
     "outer_opt must be one of"),
    ("unknown setting", _mc("maml", warp=3), UserError, "unknown settings ['warp']"),
    ("protonet inner_lr", _mc("protonet", "omniglot", inner_lr=0.1), UserError,
     "unknown settings ['inner_lr'] for protonet"),
    ("unknown algorithm", _mc("mamll"), UserError, "algorithm must be one of"),
    ("unknown task", _mc("maml", "mnist"), UserError, "task must be one of"),
    ("shots 0", _mc("maml", shots=0), UserError, "shots must be a positive int"),
    ("workers 0", _mc("maml", workers=0), UserError, "workers must be a positive int"),
    ("matching meta_batch 2", _mc("matching", "omniglot", meta_batch=2), UserError,
     "implemented for protonet only"),
    ("mann instances 25", _mc("mann", "omniglot", instances=25), UserError,
     "instances must be <= 20"),
    ("bn_momentum 0", _mc("protonet", "omniglot", bn_momentum=0), UserError,
     "bn_momentum must be a number in (0, 1]"),
    # the run directory and its files
    ("trainer resume without a run", lambda r: _trainer(r["fresh"], resume=True)(),
     RunDirError, "no run to resume"),
    ("trainer resume 'maybe'", lambda r: _trainer(r["fresh"], resume="maybe")(), ValueError,
     "resume must be False, True or 'auto'"),
    ("trainer out is a file", lambda r: _trainer(r["afile"])(), RunDirError,
     "exists and is not a directory"),
    ("trainer out under a file", lambda r: _trainer(os.path.join(r["afile"], "x"))(),
     RunDirError, "is a file, not a directory"),
    ("trainer over a run", lambda r: _trainer(r["sin"])(), RunExistsError,
     "checkpoint.npz exists; pass --resume"),
    ("trainer resume, settings differ", lambda r: _trainer(r["sin"], True, inner_lr=0.5)(),
     UserError, "the settings ['inner_lr'] differ from the checkpoint's"),
    ("trainer resume, no checkpoint", lambda r: _trainer(r["nockpt"], True)(), RunDirError,
     "holds config.json and metrics.jsonl of a run but no checkpoint.npz"),
    ("trainer new run, no checkpoint", lambda r: _trainer(r["nockpt"])(), RunDirError,
     "no checkpoint.npz to continue from"),
    ("trainer resume, truncated checkpoint", lambda r: _trainer(r["trunc"], True)(),
     CheckpointError, "corrupt or truncated"),
    ("trainer resume, NaN params", lambda r: _trainer(r["nanp"], True)(), CheckpointError,
     "params hold 1 non-finite value(s)"),
    ("trainer resume, short params", lambda r: _trainer(r["shortp"], True)(), CheckpointError,
     "params (3,) float32, expected"),
    ("read_config missing", lambda r: read_config(r["fresh"]), FileNotFoundError,
     "no such run directory"),
    ("read_config a file", lambda r: read_config(r["afile"]), RunDirError,
     "is not a run directory"),
    ("read_config no config", lambda r: read_config(r["empty"]), RunDirError, "no run in"),
    ("read_config bad JSON", lambda r: read_config(r["badjson"]), RunDirError,
     "config.json is not valid JSON"),
    ("read_config a list", lambda r: read_config(r["listjson"]), RunDirError,
     "is not a run configuration"),
    ("load_run no checkpoint", lambda r: load_run(r["nockpt"]), RunDirError,
     "no checkpoint in"),
    ("load_run truncated", lambda r: load_run(r["trunc"]), CheckpointError,
     "corrupt or truncated"),
    ("load_run empty file", lambda r: load_run(r["emptyck"]), CheckpointError,
     "not a metacore checkpoint"),
    ("load_run flipped byte", lambda r: load_run(r["flip"]), CheckpointError,
     "flip/checkpoint.npz"),
    ("load_run pickled npz", lambda r: load_run(r["pickled"]), CheckpointError,
     "not a metacore checkpoint"),
    ("load_run NaN params", lambda r: load_run(r["nanp"]), CheckpointError,
     "nanp/checkpoint.npz: params hold 1 non-finite"),
    ("load_run short params", lambda r: load_run(r["shortp"]), CheckpointError,
     "shortp/checkpoint.npz: params (3,)"),
    ("load_checkpoint missing", lambda r: C.load_checkpoint(os.path.join(r["empty"], "x")),
     FileNotFoundError, "No such file"),
    ("save_checkpoint object array",
     lambda r: C.save_checkpoint(os.path.join(r["empty"], "c.npz"),
                                 {"a": np.array([None], object)}, {}),
     TypeError, "cannot be stored without pickle"),
    ("save_checkpoint NaN meta",
     lambda r: C.save_checkpoint(os.path.join(r["empty"], "c.npz"), {}, {"x": float("nan")}),
     ValueError, "not valid JSON"),
    ("rng_from_state even inc",
     lambda r: C.rng_from_state({"bit_generator": "PCG64", "state": 1, "inc": 2,
                                 "has_uint32": 0, "uinteger": 0}), ValueError,
     "inc must be odd"),
    # evaluation
    ("evaluate n_tasks 0", lambda r: evaluate(r["sin"], n_tasks=0), UserError,
     "n_tasks must be an int >= 2"),
    ("evaluate n_tasks 1", lambda r: evaluate(r["sin"], n_tasks=1), UserError,
     "n_tasks must be an int >= 2"),
    ("evaluate max_steps -1", lambda r: evaluate(r["sin"], max_steps=-1), UserError,
     "max_steps must be an int >= 0"),
    ("evaluate shots 0", lambda r: evaluate(r["sin"], shots=0), UserError,
     "shots must be an int >= 1"),
    ("evaluate query_points 0", lambda r: evaluate(r["sin"], query_points=0), UserError,
     "query_points must be an int >= 1"),
    ("evaluate inner_lr nan", lambda r: evaluate(r["sin"], inner_lr=float("nan")), UserError,
     "inner_lr must be a finite number >= 0"),
    ("evaluate inner_lr 1e30 diverges",
     lambda r: evaluate(r["sin"], n_tasks=2, max_steps=1, inner_lr=1e30), FloatingPointError,
     "non-finite"),
    ("evaluate a missing run", lambda r: evaluate(r["fresh"]), FileNotFoundError,
     "no such run directory"),
    ("adapt_and_score max_steps -1",
     lambda r: adapt_and_score(MODEL, THETA, 0.1, (X, Y, X, Y), -1), ValueError,
     "max_steps must be an int >= 0"),
    ("adapt_and_score alpha nan",
     lambda r: adapt_and_score(MODEL, THETA, float("nan"), (X, Y, X, Y), 1), ValueError,
     "alpha must be finite and >= 0"),
    ("adapt_and_score batch of 3",
     lambda r: adapt_and_score(MODEL, THETA, 0.1, (X, Y, X), 1), TypeError,
     "batch must be (support_x, support_y, query_x, query_y)"),
    # metric methods' evaluate (opts as the CLI passes them)
    ("protonet evaluate tasks 0", lambda r: _proto_eval(r, tasks=0), UserError,
     "tasks must be >= 2 (an int) for a confidence interval, got 0"),
    ("protonet evaluate way 0", lambda r: _proto_eval(r, way=0), UserError,
     "way must be an int >= 2"),
    ("protonet evaluate way 1", lambda r: _proto_eval(r, way=1), UserError,
     "way must be an int >= 2"),
    ("protonet evaluate shots 0", lambda r: _proto_eval(r, shots=0), UserError,
     "shots must be an int >= 1"),
    ("protonet evaluate 5-way 6-shot", lambda r: _proto_eval(r, way=5, shots=6), UserError,
     "5-way 6-shot episodes with 15 queries per class do not fit"),
    ("protonet evaluate bn weird", lambda r: _proto_eval(r, bn="weird"), UserError,
     "bn must be one of"),
    ("protonet episode with 0 tasks", lambda r: _protonet_episode(0)(), ValueError,
     "support_x has no tasks"),
    ("EpisodeSampler n_way 20 > 12 classes", lambda r: _sampler(20, 1, 1), UserError,
     "n_way = 20 exceeds the class pool of 12"),
    ("EpisodeSampler k_shot + q_query 21", lambda r: _sampler(2, 10, 11), UserError,
     "k_shot + q_query = 21 exceeds the 20 drawings"),
    ("EpisodeSampler n_way 0", lambda r: _sampler(0, 1, 1), UserError,
     "n_way must be >= 1"),
    # ProtoNet loss and distances
    ("protonet_loss scale -1", lambda r: _proto(scale=-1.0), ValueError,
     "scale must be a finite number > 0"),
    ("protonet_loss scale 0", lambda r: _proto(scale=0), ValueError,
     "scale must be a finite number > 0"),
    ("protonet_loss scale nan", lambda r: _proto(scale=float("nan")), ValueError,
     "scale must be a finite number > 0"),
    ("protonet_loss scale True", lambda r: _proto(scale=True), ValueError,
     "scale must be a finite number > 0"),
    ("protonet_loss scale '1'", lambda r: _proto(scale="1"), ValueError,
     "scale must be a finite number > 0"),
    ("protonet_loss 0 tasks", lambda r: _proto(T=0), ValueError,
     "and at least one task, got q of shape (0, 3, 5)"),
    ("protonet_loss 0 queries", lambda r: _proto(Q=0), ValueError,
     "needs at least one query and one prototype per task"),
    ("protonet_loss 0 prototypes", lambda r: _proto(N=0, y=np.zeros((2, 3), np.int64)),
     ValueError, "one query and one prototype per task"),
    ("protonet_loss cosine D 0", lambda r: _proto(D=0, metric="cosine"), ValueError,
     "cosine similarity needs D >= 1"),
    ("protonet_loss metric manhattan", lambda r: _proto(metric="manhattan"), ValueError,
     "unknown metric 'manhattan'"),
    ("protonet_loss labels out of range", lambda r: _proto(y=np.full((2, 3), 4)), ValueError,
     "must be < 4"),
    ("protonet_loss float labels", lambda r: _proto(y=np.zeros((2, 3))), TypeError,
     "integer dtype"),
    ("protonet_loss NaN q",
     lambda r: K.protonet_loss(np.full((1, 2, 3), np.nan), np.zeros((1, 2, 3)),
                               np.zeros((1, 2), np.int64)), ValueError, "non-finite"),
    ("protonet_loss gloss shape",
     lambda r: _proto(gloss=np.ones(3)), ValueError, "gloss must have shape (2), got (3,)"),
    ("pairwise_cosine D 0", lambda r: K.pairwise_cosine(*_pair(D=0)), ValueError,
     "cosine similarity needs D >= 1"),
    ("pairwise_cosine_backward D 0",
     lambda r: K.pairwise_cosine_backward(np.zeros((2, 3, 4)), *_pair(D=0)), ValueError,
     "cosine similarity needs D >= 1"),
    ("pairwise_sqeuclidean D mismatch",
     lambda r: K.pairwise_sqeuclidean(_pair()[0], _pair(D=4)[1]), ValueError,
     "s must have shape (2, *, 5)"),
    ("pairwise_sqeuclidean 2-D q",
     lambda r: K.pairwise_sqeuclidean(np.zeros((3, 5)), _pair()[1]), ValueError,
     "must have 3 dimensions"),
    ("pairwise_l1 int q",
     lambda r: K.pairwise_l1(np.zeros((2, 3, 5), np.int64), _pair()[1]), TypeError,
     "float32 or float64"),
    ("pairwise_l1 mixed dtypes",
     lambda r: K.pairwise_l1(_pair()[0].astype(np.float32), _pair()[1]), TypeError,
     "has dtype float64, expected float32"),
    # softmax cross-entropy: a non-finite loss is refused
    ("softmax_ce float32 3e38", lambda r: softmax_ce_forward(_logits([3e38, -3e38]),
                                                            np.array([[1]])),
     FloatingPointError, "softmax_ce: the loss of 1 of 1 task(s) is non-finite"),
    ("softmax_ce +inf logit", lambda r: softmax_ce_forward(_logits([np.inf, 0.0]),
                                                          np.array([[1]])),
     FloatingPointError, "non-finite"),
    ("softmax_ce NaN logit", lambda r: softmax_ce_forward(_logits([np.nan, 0.0]),
                                                         np.array([[0]])),
     FloatingPointError, "non-finite"),
    ("softmax_ce label out of range", lambda r: softmax_ce_forward(_logits([1.0, 0.0]),
                                                                  np.array([[2]])),
     ValueError, "must be < 2"),
    ("softmax_ce float labels", lambda r: softmax_ce_forward(_logits([1.0, 0.0]),
                                                            np.array([[0.0]])),
     TypeError, "integer dtype"),
    # statistics
    ("mean_ci empty", lambda r: mean_ci(np.array([])), ValueError, "values is empty"),
    ("mean_ci NaN", lambda r: mean_ci(np.array([1.0, np.nan])), FloatingPointError,
     "1 of 2 values are non-finite"),
    ("mean_ci inf", lambda r: mean_ci([1.0, np.inf, 2.0]), FloatingPointError,
     "1 of 3 values are non-finite"),
    ("mean_ci 2-D", lambda r: mean_ci(np.ones((3, 2))), ValueError,
     "values must be 1-D, got shape (3, 2)"),
    ("mean_ci scalar", lambda r: mean_ci(1.0), ValueError, "values must be 1-D, got shape ()"),
    # MAML / Meta-SGD inputs
    ("maml_gradient negative Meta-SGD rates",
     lambda r: maml_gradient(MODEL, THETA, X, Y, X, Y, NEG_ALPHA), ValueError,
     "alpha has 1 negative rate(s) (min -0.5)"),
    ("adapt negative Meta-SGD rates", lambda r: adapt(MODEL, THETA, X, Y, NEG_ALPHA, 1),
     ValueError, "alpha has 1 negative rate(s)"),
    ("meta_objective negative Meta-SGD rates",
     lambda r: meta_objective(MODEL, THETA, X, Y, X, Y, NEG_ALPHA, 1), ValueError,
     "alpha has 1 negative rate(s)"),
    ("maml_gradient negative scalar alpha",
     lambda r: maml_gradient(MODEL, THETA, X, Y, X, Y, -0.1), ValueError,
     "alpha must be finite and >= 0"),
    ("maml_gradient alpha wrong shape",
     lambda r: maml_gradient(MODEL, THETA, X, Y, X, Y, np.ones(P + 1)), ValueError,
     f"alpha must have shape ({P})"),
    ("maml_gradient NaN alpha vector",
     lambda r: maml_gradient(MODEL, THETA, X, Y, X, Y, np.full(P, np.nan)), ValueError,
     "non-finite"),
    ("maml_gradient steps 0",
     lambda r: maml_gradient(MODEL, THETA, X, Y, X, Y, 0.1, steps=0), ValueError,
     "steps must be an int >= 1"),
    ("maml_gradient 0 tasks", lambda r: maml_gradient(MODEL, THETA, X0, X0, X0, X0, 0.1),
     ValueError, "maml_gradient: x has no tasks"),
    ("adapt 0 tasks", lambda r: adapt(MODEL, THETA, X0, X0, 0.1, 1), ValueError,
     "adapt: x has no tasks"),
    ("reptile_direction 0 tasks", lambda r: reptile_direction(MODEL, THETA, X0, X0, 0.1, 1),
     ValueError, "reptile_direction: x has no tasks"),
    ("adapt_and_score 0 tasks", lambda r: adapt_and_score(MODEL, THETA, 0.1, (X0,) * 4, 1),
     ValueError, "with T >= 1 tasks, got (0, 4, 1)"),
    ("Model.loss 0 tasks", lambda r: MODEL.loss(np.zeros((0, P)), X0, X0), ValueError,
     "mse: y must be (T, N, ...) with T >= 1 tasks"),
    ("maml_gradient theta wrong shape",
     lambda r: maml_gradient(MODEL, THETA[:-1], X, Y, X, Y, 0.1), ValueError,
     f"theta must have shape ({P})"),
]


def _proto_eval(r, **opts):
    _, method, params, _ = load_run(r["proto"])
    full = dict(tasks=None, way=None, shots=None, seed=None, bn=None)
    full.update(opts)
    return method.evaluate(params, full)


@pytest.mark.parametrize("case", API, ids=[c[0] for c in API])
def test_api_hostile_input(case, runs):
    _, fn, exc, fragment = case
    with pytest.raises(Exception) as info:
        fn(runs)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert fragment in str(info.value), str(info.value)


# ---------------------------------------------------------------------------- CLI cases
TRAIN_SIN = "train maml --task sinusoid --no-progress --out"
TRAIN_TINY = "--iterations 2 --eval-every 2 --eval-tasks 2 --log-every 1 --ckpt-every 2 --seed 1"

# (id, argv with {run} placeholders, message fragment); every case: exit 2, one line
CLI = [
    # train: the run directory
    ("train --out a file", f"{TRAIN_SIN} {{afile}}", "exists and is not a directory"),
    ("train --out under a file", f"{TRAIN_SIN} {{afile}}/run", "is a file, not a directory"),
    ("train over a run", f"{TRAIN_SIN} {{sin}} {TRAIN_TINY}",
     "checkpoint.npz exists; pass --resume to continue it"),
    ("train --resume without a run", f"{TRAIN_SIN} {{fresh}} --resume",
     "no run to resume in"),
    ("train --resume on an empty dir", f"{TRAIN_SIN} {{empty}} --resume",
     "no run to resume in"),
    ("train --resume and --resume-or-start", f"{TRAIN_SIN} {{sin}} --resume --resume-or-start",
     "give --resume or --resume-or-start, not both"),
    ("train --resume, settings differ", f"{TRAIN_SIN} {{sin}} --resume --inner-lr 0.5",
     "the settings ['inner_lr'] differ from the checkpoint's"),
    ("train --resume, other algorithm", "train fomaml --task sinusoid --out {sin} --resume",
     "holds a maml run on sinusoid, not fomaml on sinusoid"),
    ("train --resume, no checkpoint", f"{TRAIN_SIN} {{nockpt}} --resume",
     "no checkpoint.npz to continue from"),
    ("train --resume-or-start, no checkpoint", f"{TRAIN_SIN} {{nockpt}} --resume-or-start",
     "no checkpoint.npz to continue from"),
    ("train again, no checkpoint", f"{TRAIN_SIN} {{nockpt}}",
     "no checkpoint.npz to continue from"),
    ("train --resume, truncated checkpoint", f"{TRAIN_SIN} {{trunc}} --resume",
     "corrupt or truncated"),
    ("train --resume, flipped byte", f"{TRAIN_SIN} {{flip}} --resume", "flip/checkpoint.npz"),
    ("train --resume, empty checkpoint", f"{TRAIN_SIN} {{emptyck}} --resume",
     "not a metacore checkpoint"),
    ("train --resume, NaN params", f"{TRAIN_SIN} {{nanp}} --resume",
     "params hold 1 non-finite value(s)"),
    ("train --resume, bad config.json", f"{TRAIN_SIN} {{badjson}} --resume",
     "config.json is not valid JSON"),
    # train: settings
    ("train --n-way 2 on sinusoid", f"{TRAIN_SIN} {{fresh}} --n-way 2",
     "n_way does not apply to sinusoid regression"),
    ("train protonet --inner-lr", "train protonet --task omniglot --out {fresh} --inner-lr 0.1",
     "unknown settings ['inner_lr'] for protonet"),
    ("train protonet --n-way 5000", "train protonet --task omniglot --out {fresh} --n-way 5000",
     "n_way = 5000 exceeds the 4112 classes"),
    ("train maml omniglot --shots 15", "train maml --task omniglot --out {fresh} --shots 15",
     "shots + queries = 30 exceeds"),
    ("train --set without =", f"{TRAIN_SIN} {{fresh}} --set warp",
     "--set wants KEY=VALUE, got 'warp'"),
    ("train --set unknown", f"{TRAIN_SIN} {{fresh}} --set warp=3", "unknown settings ['warp']"),
    ("train --iterations -5", f"{TRAIN_SIN} {{fresh}} --iterations -5",
     "iterations must be a positive int"),
    ("train --outer-lr nan", f"{TRAIN_SIN} {{fresh}} --outer-lr nan",
     "outer_lr must be a finite number >= 0"),
    ("train --inner-lr -1", f"{TRAIN_SIN} {{fresh}} --inner-lr -1",
     "inner_lr must be a finite number >= 0"),
    ("train --meta-batch 0", f"{TRAIN_SIN} {{fresh}} --meta-batch 0",
     "meta_batch must be a positive int"),
    ("train --blas-threads 0", f"{TRAIN_SIN} {{fresh}} --blas-threads 0",
     "--blas-threads must be >= 1"),
    ("train maml on quadratic", "train maml --task quadratic --out {fresh}",
     "task must be one of ('sinusoid', 'omniglot')"),
    # eval: the run directory
    ("eval a missing directory", "eval {fresh}", "no such run directory: "),
    ("eval a file", "eval {afile}", "is not a run directory"),
    ("eval an empty directory", "eval {empty}", "no run in"),
    ("eval bad config.json", "eval {badjson}", "config.json is not valid JSON"),
    ("eval config.json a list", "eval {listjson}", "is not a run configuration"),
    ("eval without checkpoint", "eval {nockpt}", "no checkpoint in"),
    ("eval truncated checkpoint", "eval {trunc} --tasks 2", "corrupt or truncated"),
    ("eval empty checkpoint", "eval {emptyck} --tasks 2", "not a metacore checkpoint"),
    ("eval flipped byte", "eval {flip} --tasks 2", "flip/checkpoint.npz"),
    ("eval pickled checkpoint", "eval {pickled} --tasks 2", "not a metacore checkpoint"),
    ("eval NaN params", "eval {nanp} --tasks 2", "params hold 1 non-finite value(s)"),
    ("eval short params", "eval {shortp} --tasks 2", "params (3,) float32, expected"),
    # eval: options out of range
    ("eval --tasks 0", "eval {sin} --tasks 0", "--tasks must be >= 2"),
    ("eval --tasks 1", "eval {sin} --tasks 1", "--tasks must be >= 2"),
    ("eval --shots 0", "eval {sin} --shots 0", "--shots must be >= 1"),
    ("eval --steps -1", "eval {sin} --steps -1", "--steps must be >= 0"),
    ("eval --inner-lr nan", "eval {sin} --inner-lr nan", "--inner-lr must be a finite number"),
    ("eval --inner-lr -1", "eval {sin} --inner-lr -1", "--inner-lr must be a finite number"),
    ("eval --query-points 0", "eval {sin} --query-points 0", "--query-points must be >= 1"),
    ("eval --seed -1", "eval {sin} --seed -1", "--seed must be >= 0"),
    ("eval --blas-threads 0", "eval {sin} --blas-threads 0", "--blas-threads must be >= 1"),
    ("eval --inner-lr 1e30 diverges", "eval {sin} --tasks 2 --steps 1 --inner-lr 1e30",
     "non-finite"),
    ("eval --compare without =", "eval {sin} --tasks 2 --compare pre",
     "--compare wants LABEL=RUN"),
    ("eval --json into a missing folder", "eval {sin} --tasks 2 --steps 0 --json {fresh}/e.json",
     "No such file or directory: "),
    # eval: options the run's method does not use
    ("eval --way 3 on sinusoid", "eval {sin} --way 3", "--way does not apply to a maml run"),
    ("eval --bn on sinusoid", "eval {sin} --bn transductive", "--bn does not apply"),
    ("eval metasgd --inner-lr", "eval {msgd} --inner-lr 0.1",
     "--inner-lr does not apply to a metasgd run"),
    ("eval protonet --steps", "eval {proto} --steps 5",
     "--steps does not apply to a protonet run on omniglot; the options that do: --tasks, "
     "--way, --shots, --bn, --seed, --json"),
    ("eval protonet --inner-lr", "eval {proto} --inner-lr 0.1", "--inner-lr does not apply"),
    ("eval protonet --inner-lr nan", "eval {proto} --inner-lr nan",
     "--inner-lr must be a finite number"),
    ("eval protonet --steps --inner-lr", "eval {proto} --steps 3 --inner-lr 0.1",
     "--steps, --inner-lr do not apply"),
    ("eval protonet --query-points", "eval {proto} --query-points 5",
     "--query-points does not apply"),
    ("eval protonet --plot-dir", "eval {proto} --plot-dir {fresh}", "--plot-dir does not apply"),
    ("eval protonet --way 0", "eval {proto} --way 0", "--way must be >= 2"),
    ("eval protonet --way 1", "eval {proto} --way 1", "--way must be >= 2"),
    ("eval protonet --shots 0", "eval {proto} --shots 0", "--shots must be >= 1"),
    ("eval protonet --tasks 0", "eval {proto} --tasks 0", "--tasks must be >= 2"),
    ("eval protonet 5-way 6-shot", "eval {proto} --tasks 2 --way 5 --shots 6",
     "5-way 6-shot episodes with 15 queries per class do not fit"),
    # check
    ("check an unknown derivation", "check nosuchlayer",
     "unknown derivation(s) ['nosuchlayer']; choose a group"),
]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"the command ran longer than {CLI_BOUND_S} s")


def run_main(argv, capsys):
    """-> (exit status, stdout, stderr) of metacore.cli.main(argv), bounded in time."""
    from metacore.cli import main
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CLI_BOUND_S)
    try:
        try:
            rc = main(argv)
        except SystemExit as e:                   # argparse's own errors
            rc = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    return rc, out, err


def _argv(template, r):
    return template.format(**r).split()


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_cli_hostile_input(case, runs, capsys, monkeypatch):
    name, template, fragment = case
    monkeypatch.delenv("METACORE_DEBUG", raising=False)
    argv = _argv(template, runs)
    rc, out, err = run_main(argv, capsys)
    command = argv[0]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"metacore {command}: error: "), err
    assert fragment in lines[0], err
    assert not os.path.exists(runs["fresh"]), "a refused command created its --out"


# argparse's own refusals keep its convention (usage, then the error line, exit 2)
ARGPARSE = [
    ("train --steps", f"{TRAIN_SIN} {{fresh}} --steps 3",
     "metacore: error: unrecognized arguments: --steps 3"),
    ("train --iterations x", f"{TRAIN_SIN} {{fresh}} --iterations x",
     "metacore train: error: argument --iterations: invalid int value: 'x'"),
    ("eval --bn weird", "eval {sin} --bn weird",
     "metacore eval: error: argument --bn: invalid choice: 'weird'"),
    ("train unknown method", "train warp --task sinusoid --out {fresh}",
     "metacore train: error: argument algorithm: invalid choice: 'warp'"),
]


@pytest.mark.parametrize("case", ARGPARSE, ids=[c[0] for c in ARGPARSE])
def test_cli_argparse_refusals(case, runs, capsys):
    _, template, line = case
    rc, _, err = run_main(_argv(template, runs), capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.splitlines()[0].startswith("usage: metacore"), err
    assert err.splitlines()[-1].startswith(line), err


def test_ignored_settings_warn_in_one_line(runs, capsys):
    """Harmless input (a setting the method does not read) is a one-line warning, not an
    error; here the run directory refuses next, so nothing trains."""
    from metacore.errors import IgnoredSettingWarning
    with pytest.warns(IgnoredSettingWarning, match="inner_steps does not apply to pretrain"):
        make_config("pretrain", "sinusoid", "x", inner_steps=5)
    with pytest.warns(IgnoredSettingWarning, match="pairs does not apply to protonet"):
        make_config("protonet", "omniglot", "x", pairs=4)
    rc, _, err = run_main(["train", "pretrain", "--task", "sinusoid", "--out", runs["afile"],
                           "--inner-steps", "5", "--set", "workers=2"], capsys)
    assert rc == 2 and err.splitlines() == [
        "metacore train: warning: make_config: workers does not apply to pretrain and is "
        "ignored",
        "metacore train: warning: make_config: inner_steps does not apply to pretrain and is "
        "ignored",
        f"metacore train: error: {runs['afile']} exists and is not a directory; --out must "
        f"be a directory"], err


def test_debug_shows_the_traceback_and_the_same_line(runs, capsys, monkeypatch):
    monkeypatch.delenv("METACORE_DEBUG", raising=False)
    for argv in (["--debug", "eval", runs["badjson"]], ["eval", runs["badjson"], "--debug"]):
        rc, _, err = run_main(argv, capsys)
        assert rc == 2 and err.startswith("Traceback (most recent call last):"), err
        assert "json.decoder.JSONDecodeError" in err                  # the chained cause
        assert err.splitlines()[-1].startswith("metacore eval: error: ") and \
            "config.json is not valid JSON" in err.splitlines()[-1]
    monkeypatch.setenv("METACORE_DEBUG", "1")
    rc, _, err = run_main(["eval", runs["badjson"]], capsys)
    assert rc == 2 and "Traceback" in err
    monkeypatch.setenv("METACORE_DEBUG", "0")
    rc, _, err = run_main(["eval", runs["badjson"]], capsys)
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("exc", [ValueError("operands could not be broadcast"),
                                 KeyError("params"), TypeError("unsupported operand"),
                                 IndexError("index 3 is out of bounds"),
                                 RuntimeError("injected")])
def test_internal_errors_are_bugs_with_a_traceback(exc, runs, capsys, monkeypatch):
    """A plain ValueError (not a UserError) is a bug: NumPy raises those for broadcasting."""
    import metacore.cli as cli

    def broken(args):
        raise exc
    monkeypatch.setattr(cli, "_eval", broken)
    monkeypatch.delenv("METACORE_DEBUG", raising=False)
    rc, _, err = run_main(["eval", runs["sin"]], capsys)
    assert rc == 1, err
    assert err.startswith("Traceback (most recent call last):"), err
    assert err.splitlines()[-1] == (f"metacore eval: internal error ({type(exc).__name__}): "
                                    f"this is a bug in metacore; please report it with the "
                                    f"traceback above")


def test_interrupt_is_one_line_exit_130(runs, capsys, monkeypatch):
    import metacore.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_eval", interrupted)
    monkeypatch.delenv("METACORE_DEBUG", raising=False)
    rc, _, err = run_main(["eval", runs["sin"]], capsys)
    assert (rc, err) == (130, "metacore eval: interrupted\n")


def test_refused_commands_left_the_runs_untouched(runs):
    assert _digest_tree(runs["sin"]) == runs["digest"]
    assert sorted(os.listdir(runs["empty"])) == []
    assert not os.path.exists(runs["fresh"])


# ---------------------------------------------------------------------------- subprocesses
SUBPROCESS = [
    ("eval a missing directory", ["eval", "{fresh}"], {}, "no such run directory"),
    ("protonet eval --tasks 0 (was a hang)", ["eval", "{proto}", "--tasks", "0"], {},
     "--tasks must be >= 2"),
    ("train --out a file", ["train", "maml", "--task", "sinusoid", "--out", "{afile}"], {},
     "exists and is not a directory"),
    ("eval a truncated checkpoint", ["eval", "{trunc}", "--tasks", "2"], {},
     "corrupt or truncated"),
    ("eval with METACORE_DEBUG=1", ["eval", "{badjson}"], {"METACORE_DEBUG": "1"},
     "config.json is not valid JSON"),
]


@pytest.mark.parametrize("case", SUBPROCESS, ids=[c[0] for c in SUBPROCESS])
def test_cli_subprocess_one_line_exit_2(case, runs):
    _, argv, env, fragment = case
    argv = [a.format(**runs) for a in argv]
    full_env = child_env(one_thread=True)
    full_env.pop("METACORE_DEBUG", None)
    full_env.update(env)
    r = subprocess.run([sys.executable, "-m", "metacore"] + argv, env=full_env, cwd=ROOT,
                       capture_output=True, text=True, timeout=CLI_BOUND_S)
    assert r.returncode == 2, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith(f"metacore {argv[0]}: error: ") and fragment in last, r.stderr
    if env.get("METACORE_DEBUG"):
        assert r.stderr.startswith("Traceback (most recent call last):"), r.stderr
    else:
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


def test_case_tables():
    """100+ cases, each id once (a duplicated id would hide a case from the report)."""
    assert len(API) + len(CLI) + len(ARGPARSE) + len(SUBPROCESS) >= 100
    for table in (API, CLI, ARGPARSE, SUBPROCESS):
        assert len({c[0] for c in table}) == len(table)
