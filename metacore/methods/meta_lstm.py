"""The LSTM meta-learner of Ravi & Larochelle (2017) through the trainer, on Omniglot
(metacore.algorithms.meta_lstm holds the math).

    metalstm   the learner (conv4_maml with batch norm) is trained on each episode's support
               set by `inner_steps` updates of the meta-learner, whose cell state is the
               learner's parameters; the meta-loss is the query loss after the last update.

Paper settings (Ravi & Larochelle 2017, Section 4 and the authors' code, twitter-research/
meta-learning-lstm, config/lstm/train-omniglot-1shot-5class.lua): first layer 20 units,
preprocessing p = 10, Adam with rate 1e-3, gradient norm clipped at 0.25, one episode per
meta-update, 15 query images per class, 15 updates for 1-shot and 5 for 5-shot (the paper
computes each update on the whole support set; the authors' Omniglot config lists 15 and 5
"epochs"). The learner is the paper's 32-filter 4-block conv net, here in MAML's stride-2 form
(metacore.models.conv4_maml, channels=32). Batch norm: batch statistics of the support set
during the updates and of the query set for the meta-loss, at meta-training and meta-test
alike; no running averages are kept (the paper's Section 3.4).

Shape letters: T episodes, N support images, M query images, P learner parameters,
Q meta-parameters.
"""
import math

import numpy as np

from metacore.algorithms.meta_lstm import MetaLSTM, _accuracy
from metacore.errors import UserError
from metacore.methods import MethodBase
from metacore.methods.maml_family import OmniglotSource
from metacore.network import LOSSES
from metacore.stats import mean_ci

NAMES = ("metalstm",)
TASKS = ("omniglot",)

DEFAULTS = {
    "omniglot": dict(shots=1, queries=15, n_way=5, meta_batch=1, inner_steps=None, hidden=20,
                     channels=32, preproc_p=10.0, clip_norm=0.25, second_order=False,
                     outer_opt="adam", outer_lr=1e-3, iterations=50000, eval_every=500,
                     eval_tasks=20, log_every=50, ckpt_every=100),
}

EVAL_CHUNK = 10          # test episodes adapted at once (memory: ~ chunk * P * 8 numbers)


def _positive_int(cfg, key):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"make_config: {key} must be a positive int, got {v!r}")


def check_config(cfg):
    if cfg["inner_steps"] is None:
        cfg["inner_steps"] = 15 if cfg["shots"] == 1 else 5
    for key in ("shots", "queries", "n_way", "meta_batch", "inner_steps", "hidden",
                "channels", "eval_tasks"):
        _positive_int(cfg, key)
    for key, low in (("preproc_p", 0.0), ("clip_norm", 0.0)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < low or (key == "preproc_p" and v == 0):
            raise UserError(f"make_config: {key} must be a finite number "
                            f"{'> 0' if key == 'preproc_p' else '>= 0 (0: no clipping)'}, "
                            f"got {v!r}")
        cfg[key] = float(v)
    if not isinstance(cfg["second_order"], bool):
        raise UserError(f"make_config: second_order must be true or false, got "
                        f"{cfg['second_order']!r}")
    if cfg["shots"] + cfg["queries"] > 20:
        raise UserError(f"make_config: shots + queries must be <= 20 (Omniglot's drawings "
                        f"per character), got {cfg['shots']} + {cfg['queries']}")


def build(cfg):
    from metacore.models import conv4_maml
    model = conv4_maml(n_way=cfg["n_way"], channels=cfg["channels"])
    return model, MetaLSTM(model, hidden=cfg["hidden"], p=cfg["preproc_p"])


def query_scores(model, theta, qx, qy, transductive=True):
    """theta (T, P) -> query loss (T,), accuracy (T,). transductive: the M queries of a task
    normalised together (batch statistics of the query set, the paper's test protocol);
    False: one query image at a time."""
    T, M = qx.shape[:2]
    if not transductive:
        theta = np.repeat(theta, M, axis=0)                            # (T*M, P)
        qx = qx.reshape((T * M, 1) + qx.shape[2:])                     # (T*M, 1, H, W, C)
        qy = qy.reshape(T * M, 1)
    out, _ = model.forward(theta, qx, _checked=True)                   # (., ., O)
    loss = LOSSES[model.loss_name][0](out, qy)[0].reshape(T, -1).mean(axis=1)
    return loss, _accuracy(out, qy).reshape(T, -1).mean(axis=1)


def eval_options(cfg):
    """`metacore eval` options of the LSTM meta-learner."""
    return ("tasks", "way", "shots", "steps", "bn", "inner_lr")


class Method(MethodBase):
    """One meta-update per episode batch (meta_batch episodes, 1 in the paper); validation on
    eval_tasks fixed validation episodes."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model, self.ml = build(cfg)
        self.source = OmniglotSource(cfg, "train")
        self.val_batch = OmniglotSource(cfg, "val", seed=cfg["seed"] + 1).sample(
            cfg["eval_tasks"])

    def init_params(self, rng):
        return self.ml.init_params(rng, self.dtype)

    def sample(self):
        return self.source.sample(self.cfg["meta_batch"])

    def gradient(self, params, batch):
        """The paper's meta-gradient (or the exact one with second_order), its norm clipped
        to clip_norm as in the authors' code; metrics before clipping."""
        r = self.ml.meta_gradient(params, *batch, self.cfg["inner_steps"],
                                  second_order=self.cfg["second_order"])
        grad = r["grad"]
        norm = float(np.sqrt(np.vdot(grad, grad)))
        clip = self.cfg["clip_norm"]
        if clip > 0 and norm > clip:
            grad = grad * (clip / norm)
        v = self.ml.views(params)
        return grad, {"loss": float(r["query_loss"].mean()),
                      "query_accuracy": float(r["query_accuracy"].mean()),
                      "support_loss": float(r["support_loss"].mean()),
                      "grad_norm": norm,
                      "forget_bias": float(v["bF"][0]), "input_bias": float(v["bI"][0])}

    def _adapt_scores(self, params, batch, steps, gates=None, transductive=True):
        """-> loss (T,), accuracy (T,) after `steps` updates, EVAL_CHUNK episodes at once."""
        sx, sy, qx, qy = batch
        losses, accs = [], []
        for a in range(0, sx.shape[0], EVAL_CHUNK):
            b = slice(a, a + EVAL_CHUNK)
            theta = self.ml.adapt(params, sx[b], sy[b], steps, gates=gates)   # (T, P)
            loss, acc = query_scores(self.model, theta, qx[b], qy[b], transductive)
            losses.append(loss)
            accs.append(acc)
        return np.concatenate(losses), np.concatenate(accs)

    def evaluate_val(self, params):
        loss, acc = self._adapt_scores(params, self.val_batch, self.cfg["inner_steps"])
        return {"val_loss": float(loss.mean()), "val_accuracy": float(acc.mean())}

    def state(self):
        return {"source_rng": self.source.state()}

    def load_state(self, s):
        self.source.set_state(s["source_rng"])

    def evaluate(self, params, opts):
        """`metacore eval`: accuracy on fresh test episodes (MAML split's 423 test characters
        with rotations, 15 queries per class), mean and 95% interval over episodes.

        opts (None: default): tasks (600), shots (the run's), way (the run's; the learner's
        head is N-way, so no other value), steps (the run's inner_steps), seed (2017),
        bn ('transductive' = 'batch', the paper's; 'non-transductive': one query at a time),
        inner_lr (given: plain SGD at that rate from the learned c0, gates fixed at
        f = 1, i = inner_lr, an ablation of the learned update rule)."""
        cfg = self.cfg
        op = "metalstm evaluate"
        n = 600 if opts.get("tasks") is None else opts["tasks"]
        shots = cfg["shots"] if opts.get("shots") is None else opts["shots"]
        way = cfg["n_way"] if opts.get("way") is None else opts["way"]
        steps = cfg["inner_steps"] if opts.get("steps") is None else opts["steps"]
        seed = 2017 if opts.get("seed") is None else opts["seed"]
        bn = opts.get("bn") or "transductive"
        for key, v, low in (("tasks", n, 2), ("shots", shots, 1), ("steps", steps, 0),
                            ("seed", seed, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(f"{op}: {key} must be an int >= {low}, got {v!r}")
        if way != cfg["n_way"]:
            raise UserError(f"{op}: way must be the run's n_way = {cfg['n_way']} (the "
                            f"learner's head is {cfg['n_way']}-way), got {way}")
        if bn not in ("transductive", "batch", "non-transductive"):
            raise UserError(f"{op}: bn must be 'transductive' (= 'batch') or "
                            f"'non-transductive'; the meta-learner keeps no running "
                            f"statistics, got {bn!r}")
        if shots + cfg["queries"] > 20:
            raise UserError(f"{op}: shots + queries = {shots} + {cfg['queries']} exceeds "
                            f"Omniglot's 20 drawings per character")
        gates, rule = None, "meta-lstm"
        lr = opts.get("inner_lr")
        if lr is not None:
            if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
                raise UserError(f"{op}: inner_lr must be a finite number >= 0, got {lr!r}")
            gates, rule = (1.0, float(lr)), f"sgd lr={lr}"
        test = OmniglotSource(dict(cfg, shots=shots), "test", seed=seed)
        batch = test.sample(n)
        loss, acc = self._adapt_scores(params, batch, steps, gates,
                                       transductive=bn != "non-transductive")
        am, ac = mean_ci(acc)
        lm, lc = mean_ci(loss)
        return {"algorithm": cfg["algorithm"], "task": cfg["task"], "way": way, "shots": shots,
                "queries": cfg["queries"], "steps": steps, "episodes": n, "seed": seed,
                "bn": "non-transductive" if bn == "non-transductive" else "transductive",
                "update": rule, "accuracy_mean": am, "accuracy_ci95": ac, "loss_mean": lm,
                "loss_ci95": lc}

    def format_result(self, r):
        return (f"{r['algorithm']} {r['task']} {r['way']}-way {r['shots']}-shot, "
                f"{r['episodes']} test episodes x {r['way'] * r['queries']} queries, "
                f"{r['steps']} updates ({r['update']}), {r['bn']} BN: accuracy "
                f"{100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_ci95']:.2f} %, "
                f"query loss {r['loss_mean']:.4f} +- {r['loss_ci95']:.4f}")
