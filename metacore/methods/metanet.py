"""Meta Networks (Munkhdalai & Yu 2017) through the trainer: Omniglot N-way K-shot, Vinyals
et al.'s 1028 / 172 / 423 character split with rotations (metacore.data.omniglot, "ink28"
images), one episode per step as in the authors' code (meta_batch averages several).

The model and its exact outer gradient: metacore.algorithms.metanet. There is no batch
normalisation, so every query is classified from the support set and itself alone (no
transduction, no running statistics to keep).

Shape letters: T episodes per step, N = n_way * shots supports, L = n_way * queries queries,
P parameters.
"""
import math

import numpy as np

from metacore.algorithms.metanet import MetaNet
from metacore.checkpoint import rng_state, set_rng_state
from metacore.errors import UserError
from metacore.methods import MethodBase
from metacore.stats import mean_ci

NAMES = ("metanet",)
TASKS = ("omniglot",)

# Every default and where it comes from (SOURCES, printed by `metacore train metanet --task
# omniglot --out X --show-config`). The authors' code is Munkhdalai's Chainer implementation
# (bitbucket.org/tsendeemts/metanet: train_omniglot.py, MetaNetFull.py, utilsf.py,
# generators.py). A source starting with "metacore:" is a setting the paper and the authors'
# code do not fix (or fix differently), with the reason for the value.
AUTHORS = "Munkhdalai's Chainer code (tsendeemts/metanet)"
SCRIPT = AUTHORS + " train_omniglot.py"
MODEL = AUTHORS + " MetaNetFull.py"

DEFAULTS = {
    "omniglot": dict(n_way=5, shots=1, queries=10, meta_batch=1, channels=64, depth=4,
                     key_dim=64, hidden=64, lstm_hidden=20, mlp_hidden=20, steps=5,
                     preproc_k=7.0, second_order=False, query_loss="sum", clip_norm=10.0,
                     outer_opt="adam", outer_lr=1e-3, iterations=40000, eval_every=500,
                     eval_tasks=100, log_every=50, ckpt_every=100, backend="auto"),
}

SOURCES = {"omniglot": {
    "n_way": SCRIPT + ": n_outputs_train = n_outputs_test = 5; the paper's 5-way one-shot "
             "Omniglot figure, 98.95 %",
    "shots": SCRIPT + ": nb_samples_per_class = 1 (one-shot)",
    "queries": SCRIPT + ": nb_samples_per_class_train = nb_samples_per_class_test = 10 "
               "(query images per class, training and test)",
    "meta_batch": SCRIPT + ": batch_size = 1; MetaNetFull.train() updates after each episode",
    "channels": MODEL + ": Block(64, 3), 64 filters of 3x3 (pad 1, no bias) per conv layer",
    "depth": "metacore: 4 conv blocks, not the paper's and MetaNetFull.py's 5 (block1_1.."
             "block1_5, key_1..key_5). Chainer's max_pooling_2d rounds up (cover_all): 28 -> 14 "
             "-> 7 -> 4 -> 2 -> 1; metacore's pool rounds down and reaches 1x1 after 4 "
             "(28 -> 14 -> 7 -> 3 -> 1), the same 64 features into fc1",
    "key_dim": MODEL + ": key_fc1 = Linear(64, 64); the key is its layer-augmented output",
    "hidden": MODEL + ": fc1 = Linear(64, 64)",
    "lstm_hidden": MODEL + ": meta_lstm_l1 = LSTM(2, 20) with read-out Linear(20, 1)",
    "mlp_hidden": MODEL + ": m_l1 = Linear(2, 20), m_ll1 = Linear(20, 20), read-out "
                  "Linear(20, 1), ReLU between",
    "steps": MODEL + ": embed_key() takes the support set in IT = 5 chunks",
    "preproc_k": MODEL + ": logAndSign(meta_in, k=7), Andrychowicz et al. 2016's "
                 "preprocessing",
    "second_order": MODEL + ": the .grad arrays go through cuda.to_cpu and NumPy logAndSign "
                    "into new Variables, so the outer gradient does not flow through the "
                    "meta-information (first order)",
    "query_loss": MODEL + ": x_loss += softmax_cross_entropy(y, lbl) per query (a sum, as "
                  "L_task in the paper's Algorithm 1)",
    "clip_norm": MODEL + ": GradientClipping(10), the global L2 norm",
    "outer_opt": MODEL + ": optimizers.Adam(alpha=0.001, beta1=0.9, beta2=0.999, eps=1e-08)",
    "outer_lr": MODEL + ": Adam alpha=0.001",
    "dtype": MODEL + ": float32 arrays (np.float32), Chainer's default",
    "iterations": "metacore: not stated in the paper; train_omniglot.py loops n_epoch = "
                  "100000 epochs of n_eposide_tr = 100 episodes (10^7 updates) with no "
                  "stopping rule. 40,000 episodes is this project's budget (MAML's Omniglot "
                  "iteration count); resume a run to go further",
    "eval_every": "metacore: not stated in the paper (train_omniglot.py prints 10 test "
                  "episodes after every 100 training episodes); a validation point every "
                  "500 episodes on the validation characters",
    "eval_tasks": "metacore: not stated in the paper; 100 fixed validation episodes",
    "log_every": "metacore: logging only",
    "ckpt_every": "metacore: checkpoints only",
    "seed": "metacore: not stated in the paper",
    "lr_halve_every": "metacore: 0, no schedule; MetaNetFull.py keeps Adam's alpha constant",
    "outer_lr_final": "metacore: none, no schedule; MetaNetFull.py keeps Adam's alpha "
                      "constant",
    "backend": "metacore: the distance kernels' dispatch (results equal up to rounding)",
}}

_INT_KEYS = ("n_way", "shots", "queries", "meta_batch", "channels", "depth", "key_dim",
             "hidden", "lstm_hidden", "mlp_hidden", "eval_tasks")


def check_config(cfg):
    for key in _INT_KEYS:
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"make_config: {key} must be a positive int, got {v!r}")
    s = cfg["steps"]
    if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1
                          or (cfg["n_way"] * cfg["shots"]) % s):
        raise UserError(f"make_config: steps must be None or a positive divisor of "
                        f"n_way * shots = {cfg['n_way'] * cfg['shots']}, got {s!r}")
    if cfg["query_loss"] not in ("sum", "mean"):
        raise UserError(f"make_config: query_loss must be 'sum' or 'mean', "
                        f"got {cfg['query_loss']!r}")
    if not isinstance(cfg["second_order"], bool):
        raise UserError(f"make_config: second_order must be true or false, "
                        f"got {cfg['second_order']!r}")
    for key in ("preproc_k", "clip_norm"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0 or (key == "preproc_k" and v == 0):
            raise UserError(f"make_config: {key} must be a finite number > 0 (clip_norm: "
                            f">= 0, 0 = no clipping), got {v!r}")
        cfg[key] = float(v)
    if cfg["backend"] not in ("auto", "reference", "numba"):
        raise UserError(f"make_config: backend must be 'auto', 'reference' or 'numba', "
                        f"got {cfg['backend']!r}")


def build_net(cfg):
    return MetaNet(cfg["n_way"], (28, 28, 1), cfg["channels"], cfg["depth"], cfg["key_dim"],
                   cfg["hidden"], cfg["lstm_hidden"], cfg["mlp_hidden"], cfg["steps"],
                   cfg["preproc_k"], cfg["backend"])


_DATA = {}


def omniglot_sampler(cfg, part, seed, way=None, shots=None, queries=None):
    """An EpisodeSampler over the Vinyals split `part`, with rotations."""
    from metacore.data.omniglot import EpisodeSampler, load_omniglot, split_characters
    dtype = np.dtype(cfg["dtype"])
    if dtype not in _DATA:
        _DATA[dtype] = load_omniglot(version="ink28", dtype=dtype)
    data = _DATA[dtype]
    return EpisodeSampler(data.images, split_characters(data, "vinyals", part),
                          way or cfg["n_way"], shots or cfg["shots"], queries or cfg["queries"],
                          rotate=True, seed=seed, dtype=dtype)


def eval_options(cfg):
    """`metacore eval` options of Meta Networks (no inner gradient steps, no batch norm)."""
    return ("tasks", "way", "shots")


class Method(MethodBase):
    """One step = meta_batch episodes from the training characters; validation on a fixed
    set of eval_tasks episodes from the validation characters. The gradient is that of the
    query loss summed over an episode's queries (query_loss="sum", the authors') or of its
    mean, averaged over the meta_batch episodes, then clipped to norm clip_norm; the logged
    "loss" is always the mean query cross-entropy, "grad_norm" the norm before clipping."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.net = build_net(cfg)
        self.sampler = omniglot_sampler(cfg, "train", cfg["seed"])
        self.val = omniglot_sampler(cfg, "val", cfg["seed"] + 1).sample(cfg["eval_tasks"])

    def init_params(self, rng):
        return self.net.init_params(rng, self.dtype)

    def sample(self):
        """Supports in a random order per episode (the sampler groups them by label), as the
        authors' generator shuffles them: the order decides which supports share a chunk of
        the embedding loss and the order the LSTM d reads the chunks in."""
        ep = self.sampler.sample(self.cfg["meta_batch"])
        T, N = ep.support_y.shape
        perm = np.argsort(self.sampler.rng.random((T, N)), axis=1)        # (T, N)
        sx = np.take_along_axis(ep.support_x, perm.reshape(T, N, 1, 1, 1), axis=1)
        sy = np.take_along_axis(ep.support_y, perm, axis=1)
        return sx, sy, ep.query_x, ep.query_y

    def gradient(self, params, batch):
        sx, sy, qx, qy = batch
        T = sx.shape[0]
        grad = np.zeros_like(params)
        loss = acc = 0.0
        for t in range(T):
            lt, gt, z, _ = self.net.loss_and_grad(params, sx[t], sy[t], qx[t], qy[t],
                                                  self.cfg["second_order"])
            if self.cfg["query_loss"] == "sum":          # the authors' objective: the sum
                gt *= qy.shape[1]                        # over queries (loss_and_grad: mean)
            grad += gt
            loss += lt
            acc += float((z.argmax(axis=-1) == qy[t]).mean())
        grad /= T
        norm = float(np.sqrt((grad.astype(np.float64) ** 2).sum()))
        c = self.cfg["clip_norm"]
        if c > 0 and norm > c:                   # Chainer's GradientClipping(10), as the
            grad *= c / norm                     # authors' code: rescale the global norm
        return grad, {"loss": loss / T, "accuracy": acc / T, "grad_norm": norm}

    def _accuracies(self, params, sx, sy, qx, qy):
        """-> per-episode query accuracy (T,) and mean query loss (T,)."""
        accs, losses = [], []
        for t in range(sx.shape[0]):
            z = self.net.predict(params, sx[t].astype(params.dtype), sy[t],
                                 qx[t].astype(params.dtype))                   # (L, K)
            zs = z - z.max(axis=-1, keepdims=True)
            logp = zs - np.log(np.exp(zs).sum(axis=-1, keepdims=True))
            losses.append(-float(logp[np.arange(len(qy[t])), qy[t]].mean()))
            accs.append(float((z.argmax(axis=-1) == qy[t]).mean()))
        return np.array(accs), np.array(losses)

    def evaluate_val(self, params):
        v = self.val
        accs, losses = self._accuracies(params, v.support_x, v.support_y, v.query_x, v.query_y)
        return {"val_accuracy": float(accs.mean()), "val_loss": float(losses.mean())}

    def evaluate(self, params, opts):
        """Test episodes from the 423 Vinyals test characters (with rotations): opts tasks
        (default 1000), way (default n_way), shots (default shots), seed (default 0); queries
        per class as in training. -> accuracy, its 95% interval, per-episode accuracies."""
        # opts["steps"] is ignored (the CLI refuses --steps): Meta Networks has no inner
        # gradient steps to count
        if opts.get("inner_lr") is not None:
            raise UserError("metanet eval: --inner-lr does not apply (Meta Networks has no "
                            "inner gradient steps)")
        if opts.get("bn") is not None:
            raise UserError(f"metanet eval: --bn does not apply (the model has no batch "
                            f"normalisation), got {opts['bn']!r}")
        n = 1000 if opts.get("tasks") is None else opts["tasks"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise UserError(f"metanet eval: tasks must be >= 2, got {n}")
        way = self.cfg["n_way"] if opts.get("way") is None else opts["way"]
        if way != self.cfg["n_way"]:
            raise UserError(f"metanet eval: the model's output layer has {self.cfg['n_way']} "
                            f"classes; way {way} needs a model trained for it")
        shots = self.cfg["shots"] if opts.get("shots") is None else opts["shots"]
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1 \
                or shots + self.cfg["queries"] > 20:
            raise UserError(f"metanet eval: shots must be an int >= 1 with shots + "
                            f"{self.cfg['queries']} queries <= 20 drawings, got {shots!r}")
        seed = 0 if opts.get("seed") is None else int(opts["seed"])
        sampler = omniglot_sampler(self.cfg, "test", seed, way, shots)
        accs = []
        for _ in range(n):
            ep = sampler.sample(1)
            a, _ = self._accuracies(params, ep.support_x, ep.support_y, ep.query_x, ep.query_y)
            accs.append(a[0])
        accs = np.array(accs)
        mean, ci = mean_ci(accs)
        return {"accuracy": mean, "ci95": ci, "episodes": n, "way": way, "shots": shots,
                "queries_per_class": self.cfg["queries"], "seed": seed,
                "per_episode": accs.tolist()}

    def format_result(self, result):
        return (f"Meta Networks, Omniglot {result['way']}-way {result['shots']}-shot, "
                f"{result['episodes']} test episodes ({result['queries_per_class']} queries per "
                f"class, seed {result['seed']}): accuracy {100 * result['accuracy']:.2f} +- "
                f"{100 * result['ci95']:.2f} % (95% interval)")

    def state(self):
        return {"sampler_rng": rng_state(self.sampler.rng)}

    def load_state(self, s):
        set_rng_state(self.sampler.rng, s["sampler_rng"])
