"""The metric-based family through the trainer (`metacore train NAME --task omniglot`):
Prototypical, Matching, Relation and Siamese networks on Omniglot, the Vinyals et al. 2016
character split (1028 train / 172 val / 423 test characters, metacore.data.omniglot), each
quarter turn of a character its own class.

    protonet  Snell et al. 2017 (metacore.algorithms.protonet)
    matching  Vinyals et al. 2016, with Full Context Embeddings by default (.matching)
    relation  Sung et al. 2018 (.relation)
    siamese   Koch et al. 2015, verification pairs (.siamese)

One step = one training episode (or, for siamese, one batch of verification pairs), its loss
gradient from the algorithm's hand-written backward. ProtoNets may take a meta-batch of
episodes per step instead (--meta-batch T: the mean loss over T episodes, each normalised by
its own batch statistics); that is what `--distributed` splits across MPI ranks, since one
episode cannot be split exactly (batch norm couples all of its images). Batch norm: training
normalises each episode with its own batch statistics and moves the running statistics toward them
(momentum `bn_momentum`); the running statistics are the method's buffers, so they are in
every checkpoint and a resumed run is bit-identical.

Evaluation (`metacore eval RUN`): the Vinyals test characters, >= 1000 episodes per setting
(--tasks), 5-way and 20-way x 1-shot and 5-shot (--way / --shots restrict; a Relation Net
at its training shot only, unless --shots says otherwise), and Lake et al.'s
20 one-shot runs (20-way, within one alphabet, no rotation; included whenever 20-way 1-shot
is), mean accuracy with a 95% confidence interval (1.96 std / sqrt(n)). Batch norm at test:
the running statistics by default ("non-transductive": every image is embedded alone, so no
query's prediction depends on another query); --bn transductive uses each episode's batch
statistics, for comparison only. The output states the mode.

Shape letters: T tasks, N classes, K shots, S = N*K support and M query images per task,
P parameters.
"""
import numpy as np

from metacore.checkpoint import rng_state, set_rng_state
from metacore.errors import UserError
from metacore.methods import MethodBase

NAMES = ("protonet", "matching", "relation", "siamese")
TASKS = ("omniglot",)

# Settings shared by the four; None means "the algorithm's paper value" (PAPER below),
# resolved in check_config. The trainer's own keys (COMMON) need concrete values here:
# iterations 20000 is this project's budget choice for every method (the papers train to a
# validation criterion or do not give a total); the outer optimizer is Adam 1e-3 for all
# (ProtoNets and Relation Nets: their papers; Matching Nets and the Siamese twin: our choice,
# see PAPER). lr_halve_every = 0 here means "the paper's schedule" unless halve_every says
# otherwise (see check_config).
DEFAULTS = {
    "omniglot": dict(
        iterations=20000, log_every=100, ckpt_every=500, eval_every=1000,
        outer_opt="adam", outer_lr=1e-3, lr_halve_every=0,
        n_way=None,          # training classes per episode
        shots=1,             # training K; ProtoNets: "shot = test shot", one model per K
        meta_batch=1,        # episodes per step (the papers' 1); > 1 for protonet only
        queries=None,        # training queries per class
        pairs=None,          # siamese: verification pairs per step
        distort=None,        # siamese: Koch et al.'s random affine distortions of the pairs
        fce=None,            # matching: Full Context Embeddings
        read_steps=None,     # matching: K of the attention LSTM
        similarity=None,     # matching: support_cosine | cosine | scaled_cosine
        cosine_scale=None,   # matching: the scale of scaled_cosine (learn_scale: its start)
        learn_scale=None,    # matching: scaled_cosine's scale a learned parameter
        halve_every=None,    # outer-rate halving period (None: the paper's); 0: constant
        channels=64,         # embedding width (tests use tiny ones)
        bn_momentum=0.1,     # running <- 0.9 running + 0.1 batch (PyTorch's default)
        val_way=5, val_episodes=100,   # periodic validation: Vinyals val characters, 15 q.
    ),
}

# The papers' settings for Omniglot, per algorithm.
PAPER = {
    # Snell et al. 2017, sec. 3.1: 60-way training episodes, 5 queries per class, the
    # training shot equal to the test shot; Adam 1e-3, halved every 2000 episodes.
    "protonet": dict(n_way=60, queries=5, halve_every=2000),
    # Vinyals et al. 2016: the paper's Omniglot setting is 5-way 1-shot episodes, FCE as
    # brief/issue request. The paper is silent on the optimizer, the query count and the
    # number K of attention read steps: Adam 1e-3 constant, 5 queries per class and K = 5
    # are our choices.
    # The attention's similarity: f.g/|g| (support side normalised), as the public
    # reimplementations have it (zergylord/oneshot issue 2, AntreasAntoniou/MatchingNetworks
    # issues 15 and 21); the text's symmetric cosine caps a 5-way
    # 1-shot softmax at ~0.65 (metacore.algorithms.matching, docs/RESULTS_METRIC.md).
    # cosine_scale 10 (scaled_cosine only) is our choice.
    # FCE off on Omniglot: Vinyals et al.'s Omniglot table has no FCE rows (FCE enters with
    # miniImageNet), and at 800 episodes no-FCE led by 2.9 points (RESULTS_METRIC.md).
    "matching": dict(n_way=5, queries=5, fce=False, read_steps=5, halve_every=0,
                     similarity="support_cosine", cosine_scale=10.0, learn_scale=False),
    # Sung et al. 2018, sec. 4.1: 5-way, 19 queries per class for 1-shot and 15 for 5-shot;
    # Adam 1e-3 halved every 100,000 episodes.
    "relation": dict(n_way=5, queries={1: 19, 5: 15}, halve_every=100000),
    # Koch et al. 2015, sec. 3.2: minibatches of 128 pairs (half same-class here). The
    # paper's SGD with momentum, per-layer rates and L2 penalties are replaced by Adam 1e-3
    # constant (see metacore.algorithms.siamese for the other deviations).
    # Koch et al. 2015: the training pairs get random affine distortions (the ranges:
    # metacore.algorithms.siamese.DISTORT_RANGES).
    "siamese": dict(pairs=128, halve_every=0, distort=True),
}

# Where each default that is a paper setting comes from, per algorithm (`metacore train NAME
# --show-config` prints these; every other default is labelled as metacore's own). Only the
# settings the paper (or its authors' code) fixes are listed: the iteration budget, the
# validation schedule, bn_momentum and the choices stated in PAPER above are ours.
_SNELL = "Snell et al. 2017, sec. 3.1 (Omniglot)"
_VINYALS = "Vinyals et al. 2016"
_SUNG = "Sung et al. 2018"
_KOCH = "Koch et al. 2015"
SOURCES = {
    "protonet": {
        "n_way": _SNELL + ": training episodes of 60 classes",
        "queries": _SNELL + ": 5 query points per class",
        "shots": _SNELL + ": the training shot matched to the test shot (1-shot model)",
        "outer_opt": _SNELL + ": trained with Adam",
        "outer_lr": _SNELL + ": initial learning rate 1e-3",
        "halve_every": _SNELL + ": learning rate cut in half every 2000 episodes",
        "lr_halve_every": _SNELL + ": learning rate cut in half every 2000 episodes",
        "channels": _SNELL + ": four blocks of 64-filter 3x3 conv, BN, ReLU, 2x2 max-pool",
    },
    "matching": {
        "n_way": _VINYALS + ", sec. 2.2: training episodes match the test task (5-way, "
                            "Table 1's 5-way 1-shot Omniglot column)",
        "shots": _VINYALS + ", sec. 2.2: training episodes match the test task (1-shot)",
        "channels": _VINYALS + ", sec. 4.1: modules of 3x3 conv with 64 filters, BN, ReLU, "
                               "2x2 max-pool",
        "fce": _VINYALS + ", Table 1: the Omniglot rows are without Full Context Embeddings "
                          "(FCE is introduced for miniImageNet); --set fce=true for FCE",
        "similarity": "reimplementation, not the paper's text: c = f.g/|g| (support side "
                      "normalised; zergylord/oneshot issue 2, AntreasAntoniou/"
                      "MatchingNetworks issues 15 and 21); " + _VINYALS + ", sec. 2.1.1's "
                      "cosine is similarity=cosine",
    },
    "relation": {
        "n_way": _SUNG + ", sec. 4.1: 5-way training episodes for the 5-way results",
        "queries": _SUNG + ", sec. 4.1: 19 query images per class at 5-way 1-shot, 15 at "
                           "5-way 5-shot",
        "shots": _SUNG + ", sec. 4.1: the training shot matched to the test shot",
        "outer_opt": _SUNG + ", sec. 4: Adam",
        "outer_lr": _SUNG + ", sec. 4: initial learning rate 1e-3",
        "halve_every": _SUNG + ", sec. 4: learning rate annealed by half every 100,000 "
                               "episodes",
        "lr_halve_every": _SUNG + ", sec. 4: learning rate annealed by half every 100,000 "
                                  "episodes",
        "channels": _SUNG + ", sec. 3.4 / Fig. 2: 64-filter 3x3 conv blocks",
    },
    "siamese": {
        "pairs": _KOCH + ", sec. 3.2: minibatches of 128",
        "distort": _KOCH + ", sec. 4.1 (per issue 16): the training set augmented with small "
                           "affine distortions, each of 7 components with probability 0.5",
    },
}


def sources(algorithm, task):
    """{setting: where its default comes from} for `--show-config` (SOURCES above)."""
    return dict(SOURCES[algorithm]) if task in TASKS else {}


# Test-time queries per class: 15 for 5-way (as in the ProtoNet and Relation Net
# evaluations), 5 for 20-way (keeps 20-way episodes at 100 queries; our choice).
EVAL_QUERIES = {5: 15, 20: 5}
EVAL_WAYS, EVAL_SHOTS, EVAL_EPISODES = (5, 20), (1, 5), 1000
BN_OPTS = {None: "running", "running": "running", "non-transductive": "running",
           "batch": "batch", "transductive": "batch"}
BN_TEXT = {"running": "non-transductive (BN running statistics; each image embedded alone)",
           "batch": "transductive (BN statistics of each test episode's images)"}


def _pos_int(cfg, key, lo=1):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise UserError(f"make_config: {key} must be an int >= {lo}, got {v!r}")


# The episode settings each algorithm reads; a value given for another one is ignored, with
# a warning (ignored_settings)
MATCHING_KEYS = ("fce", "read_steps", "similarity", "cosine_scale", "learn_scale")
EPISODE_KEYS = ("n_way", "queries", "pairs", "distort") + MATCHING_KEYS
USES = {"protonet": ("n_way", "queries"), "matching": ("n_way", "queries") + MATCHING_KEYS,
        "relation": ("n_way", "queries"), "siamese": ("pairs", "distort")}


def ignored_settings(cfg):
    """Messages for the settings given to cfg's algorithm that it does not read."""
    algo = cfg["algorithm"]
    return [f"{key} does not apply to {algo} and is ignored (of {', '.join(EPISODE_KEYS)} "
            f"it uses {', '.join(USES[algo])})"
            for key in EPISODE_KEYS
            if cfg[key] is not None and key not in USES[algo]]


def check_config(cfg):
    """Resolve the paper defaults (None) for cfg['algorithm'] and check every setting."""
    algo, paper = cfg["algorithm"], PAPER[cfg["algorithm"]]
    _pos_int(cfg, "shots")
    _pos_int(cfg, "meta_batch")
    if cfg["meta_batch"] != 1 and algo != "protonet":
        raise UserError(f"make_config: meta_batch {cfg['meta_batch']}: episodes per step > 1 "
                        f"are implemented for protonet only, not {algo}")
    for key in EPISODE_KEYS:
        if cfg[key] is None and key in paper:
            v = paper[key]
            cfg[key] = v[cfg["shots"]] if isinstance(v, dict) and cfg["shots"] in v else v
        if cfg[key] is None and key == "queries" and algo == "relation":
            cfg[key] = 15                  # the paper gives 19 (1-shot) and 15 (5-shot) only
    # the halving period: --set halve_every=H wins; else --lr-halve-every; else the paper's
    if cfg["halve_every"] is None:
        cfg["halve_every"] = cfg["lr_halve_every"] or paper["halve_every"]
    elif cfg["lr_halve_every"] not in (0, cfg["halve_every"]):
        raise UserError(f"make_config: lr_halve_every {cfg['lr_halve_every']} and "
                        f"halve_every {cfg['halve_every']} disagree; give one of them")
    _pos_int(cfg, "halve_every", 0)
    cfg["lr_halve_every"] = cfg["halve_every"]
    for key in ("channels", "val_way", "val_episodes"):
        _pos_int(cfg, key)
    if algo == "siamese":
        _pos_int(cfg, "pairs", 2)
        if not isinstance(cfg["distort"], bool):
            raise UserError(f"make_config: distort must be true or false, got "
                            f"{cfg['distort']!r}")
    else:
        _pos_int(cfg, "n_way", 2)
        _pos_int(cfg, "queries")
        _fits_omniglot(cfg, "n_way", cfg["n_way"], "train", cfg["shots"] + cfg["queries"],
                       "shots + queries")
    _fits_omniglot(cfg, "val_way", cfg["val_way"], "val", cfg["shots"] + 15,
                   "shots + the 15 validation queries")
    if algo == "matching":
        if not isinstance(cfg["fce"], bool):
            raise UserError(f"make_config: fce must be true or false, got {cfg['fce']!r}")
        _pos_int(cfg, "read_steps")
        from metacore.algorithms.matching import SIMILARITIES
        if cfg["similarity"] not in SIMILARITIES:
            raise UserError(f"make_config: similarity must be one of {', '.join(SIMILARITIES)}, "
                            f"got {cfg['similarity']!r}")
        v = cfg["cosine_scale"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) \
                or v <= 0:
            raise UserError(f"make_config: cosine_scale must be a number > 0, got {v!r}")
        cfg["cosine_scale"] = float(v)
        if not isinstance(cfg["learn_scale"], bool):
            raise UserError(f"make_config: learn_scale must be true or false, got "
                            f"{cfg['learn_scale']!r}")
        if cfg["learn_scale"] and cfg["similarity"] != "scaled_cosine":
            raise UserError(f"make_config: learn_scale applies to similarity=scaled_cosine "
                            f"only, got similarity={cfg['similarity']}")
    m = cfg["bn_momentum"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1:
        raise UserError(f"make_config: bn_momentum must be a number in (0, 1], got {m!r}")
    cfg["bn_momentum"] = float(m)


def _fits_omniglot(cfg, key, way, part, drawings, what):
    """way classes of the Vinyals `part` (x 4 rotations) and `drawings` per character."""
    from metacore.data.omniglot import N_DRAWINGS, SPLIT_SIZES
    pool = 4 * SPLIT_SIZES["vinyals"][part]
    if way > pool:
        raise UserError(f"make_config: {key} = {way} exceeds the {pool} classes of the "
                        f"Omniglot {part} characters ({pool // 4} x 4 rotations)")
    if drawings > N_DRAWINGS:
        raise UserError(f"make_config: {what} = {drawings} exceeds Omniglot's {N_DRAWINGS} "
                        f"drawings per character")


def eval_options(cfg):
    """The `metacore eval` options of these methods (no adaptation steps or inner rate)."""
    return ("tasks", "way", "shots", "bn")


_OMNIGLOT = {}


def omniglot(dtype):
    """The 28x28 Omniglot (ink28 version) with Lake's runs, loaded once per process."""
    key = np.dtype(dtype).name
    if key not in _OMNIGLOT:
        from metacore.data.omniglot import load_omniglot
        _OMNIGLOT[key] = load_omniglot(dtype=key)
    return _OMNIGLOT[key]


def build_algorithm(cfg):
    """-> (algorithm object, [Models whose BN running statistics are buffers, by prefix])."""
    from metacore.models import conv4_protonet
    algo, c = cfg["algorithm"], cfg["channels"]
    if algo == "protonet":
        from metacore.algorithms.protonet import ProtoNet
        alg = ProtoNet(conv4_protonet(channels=c))
        return alg, [("embed", alg.model)]
    if algo == "matching":
        from metacore.algorithms.matching import MatchingNet
        # a run saved before the similarity settings existed was trained with the cosine
        alg = MatchingNet(conv4_protonet(channels=c), fce=cfg["fce"],
                          read_steps=cfg["read_steps"],
                          similarity=cfg.get("similarity") or "cosine",
                          cosine_scale=cfg.get("cosine_scale") or 10.0,
                          learn_scale=bool(cfg.get("learn_scale")))
        return alg, [("embed", alg.model)]
    if algo == "relation":
        from metacore.algorithms.relation import RelationNet
        from metacore.models.metric_heads import relation_embedding, relation_module
        emb = relation_embedding(channels=c)
        alg = RelationNet(emb, relation_module(emb.out_shape, channels=c))
        return alg, [("embed", alg.embed), ("relation", alg.relation)]
    from metacore.algorithms.siamese import SiameseNet
    alg = SiameseNet(conv4_protonet(channels=c))
    return alg, [("embed", alg.embed)]


class Method(MethodBase):
    """One training episode per step (siamese: one batch of `pairs` verification pairs)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        from metacore.algorithms.siamese import PairSampler
        from metacore.data.omniglot import EpisodeSampler, split_characters
        self.alg, self.bn_models = build_algorithm(cfg)
        self.data = omniglot(self.dtype)
        chars = split_characters(self.data, "vinyals", "train")
        # the episode stream has its own seed (seed + 1), apart from the initialiser's rng
        if cfg["algorithm"] == "siamese":
            # a run saved before `distort` existed was trained without distortions
            self.sampler = PairSampler(self.data.images, chars, rotate=True,
                                       seed=cfg["seed"] + 1, dtype=self.dtype,
                                       distort=cfg.get("distort") is True)
        else:
            self.sampler = EpisodeSampler(self.data.images, chars, cfg["n_way"], cfg["shots"],
                                          cfg["queries"], rotate=True, seed=cfg["seed"] + 1,
                                          dtype=self.dtype)
        self._val = None

    # ------------------------------------------------------------------ training
    def init_params(self, rng):
        return self.alg.init_params(rng, self.dtype)

    def sample(self):
        if self.cfg["algorithm"] == "siamese":
            b = self.sampler.sample(1, self.cfg["pairs"])
            return b.x1, b.x2, b.same
        e = self.sampler.sample(self.cfg["meta_batch"])
        return e.support_x, e.support_y, e.query_x, e.query_y

    def _check_distributed(self):
        if self.cfg["algorithm"] != "protonet":
            raise UserError(f"{self.cfg['algorithm']} does not support --distributed (one "
                            f"episode or pair batch per step, coupled by batch norm; only "
                            f"protonet takes a meta-batch of episodes)")

    def batch_size(self, batch):
        self._check_distributed()
        return batch[0].shape[0]

    def shard(self, batch, lo, hi):
        """Episodes [lo, hi): each keeps its own BN batch statistics, so the block's mean
        gradient is exactly its share of the meta-batch's (metacore.distributed)."""
        self._check_distributed()
        return tuple(a[lo:hi] for a in batch)

    def gradient(self, params, batch):
        m = self.cfg["bn_momentum"]
        for _, model in self.bn_models:
            model.set_bn_mode("batch")
        if self.cfg["algorithm"] == "matching":
            sx, sy, qx, qy = batch
            loss, grad, acc = self.alg.episode_loss_and_grad(
                params, sx, sy, qx, qy, int(sy.max()) + 1, update_bn_stats=True, momentum=m)
        else:
            loss, grad, acc = self.alg.episode_loss_and_grad(
                params, *batch, update_running_stats=True, momentum=m)
        return grad, {"loss": loss, "accuracy": acc}

    def buffers(self):
        out = {}
        for prefix, model in self.bn_models:
            out.update({f"{prefix}.{k}": v for k, v in model.buffers().items()})
        return out

    def load_buffers(self, arrays):
        want = set(self.buffers())
        if set(arrays) != want:
            raise ValueError(f"{self.cfg['algorithm']}: checkpoint buffers {sorted(arrays)}, "
                             f"expected {sorted(want)}")
        for prefix, model in self.bn_models:
            n = len(prefix) + 1
            model.load_buffers({k[n:]: v for k, v in arrays.items()
                                if k.startswith(prefix + ".")})

    def state(self):
        return {"rng": rng_state(self.rng), "sampler_rng": rng_state(self.sampler.rng)}

    def load_state(self, s):
        set_rng_state(self.rng, s["rng"])
        set_rng_state(self.sampler.rng, s["sampler_rng"])

    # ------------------------------------------------------------------ evaluation
    def predict(self, params, support_x, support_y, query_x, bn="running"):
        """-> (T, M) predicted labels; bn 'running' (no query sees another) or 'batch'."""
        if self.cfg["algorithm"] == "matching":
            return self.alg.predict(params, support_x, support_y, query_x,
                                    int(support_y.max()) + 1, bn=bn)[1]
        return self.alg.predict(params, support_x, support_y, query_x, bn=bn)

    def _chunk(self, way, shots, queries):
        """Tasks per forward pass: about 4000 images (relation: pairs) at a time."""
        per_task = way * (shots + queries)
        if self.cfg["algorithm"] == "relation":
            per_task = max(per_task, way * queries * way)    # the relation module's pairs
        return max(1, 4000 // per_task)

    def episodes_accuracy(self, params, part, way, shots, queries, n, seed, bn):
        """Accuracy over n episodes of the Vinyals `part` characters -> evaluate_episodes'
        dict (accuracy, ci95, per_task, n_episodes)."""
        from metacore.algorithms.protonet import evaluate_episodes
        from metacore.data.omniglot import EpisodeSampler, split_characters
        sampler = EpisodeSampler(self.data.images, split_characters(self.data, "vinyals", part),
                                 way, shots, queries, rotate=True, seed=seed, dtype=self.dtype)
        return evaluate_episodes(self.predict, params, sampler, n,
                                 self._chunk(way, shots, queries), bn)

    def evaluate_val(self, params):
        """Accuracy on val_episodes fixed validation episodes (val_way-way, the training
        shot, 15 queries per class), BN running statistics."""
        c = self.cfg
        r = self.episodes_accuracy(params, "val", c["val_way"], c["shots"], 15,
                                   c["val_episodes"], c["seed"] + 2, "running")
        return {"val_accuracy": r["accuracy"]}

    def evaluate(self, params, opts):
        """The test protocol of the module docstring; opts from `metacore eval` (None: the
        default): tasks (episodes per setting, >= 1000 by default), way, shots, seed, bn."""
        from metacore.algorithms.siamese import lake_accuracy
        opts = dict(opts or {})
        bn = opts.get("bn")
        if bn not in BN_OPTS:
            raise UserError(f"{self.cfg['algorithm']} eval: bn must be one of "
                            f"{sorted(k for k in BN_OPTS if k)}, got {bn!r}")
        bn = BN_OPTS[bn]
        # None means "not given"; 0 is refused below, never read as "the default"
        n = EVAL_EPISODES if opts.get("tasks") is None else opts["tasks"]
        ways = EVAL_WAYS if opts.get("way") is None else (opts["way"],)
        shots = self._default_shots() if opts.get("shots") is None else (opts["shots"],)
        seed = opts.get("seed")
        seed = 2017 if seed is None else seed
        for name, vals, low in (("way", ways, 2), ("shots", shots, 1)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in vals):
                raise UserError(f"eval: {name} must be an int >= {low}, got {vals}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise UserError(f"eval: tasks must be >= 2 (an int) for a confidence interval, "
                            f"got {n!r}")
        for way in ways:
            for k in shots:
                q = EVAL_QUERIES.get(way, 5)
                if way > 4 * 423 or k + q > 20:
                    raise UserError(f"eval: {way}-way {k}-shot episodes with {q} queries per "
                                    f"class do not fit the 423 test characters x 4 rotations "
                                    f"and 20 drawings per character")
        result = {"algorithm": self.cfg["algorithm"], "bn": bn, "bn_text": BN_TEXT[bn],
                  "split": "vinyals test (423 characters x 4 rotations)", "settings": {}}
        if self.cfg["algorithm"] == "relation" and any(k != self.cfg["shots"] for k in shots):
            result["note"] = (f"this Relation Net was trained at {self.cfg['shots']}-shot; its "
                              f"class map sums the K support maps, so other shots are outside "
                              f"what its relation module saw (Sung et al. train one model per "
                              f"shot)")
        for way in ways:
            for k in shots:
                q = EVAL_QUERIES.get(way, 5)
                r = self.episodes_accuracy(params, "test", way, k, q, n,
                                           seed + 100 * way + k, bn)
                result["settings"][f"{way}way_{k}shot"] = dict(
                    way=way, shots=k, queries=q, episodes=n, accuracy=r["accuracy"],
                    ci95=r["ci95"])
        if 20 in ways and 1 in shots:
            r = lake_accuracy(self.predict, params, self.data, bn=bn)
            result["lake"] = dict(runs=int(r["per_run"].size), way=20, shots=1,
                                  accuracy=r["accuracy"], ci95=r["ci95"])
        return result

    def _default_shots(self):
        """The shots evaluated when --shots is not given: both (1, 5), except for Relation
        Nets, whose class map is the sum of the K support maps, so a model is evaluated at
        the shot it was trained with (Sung et al. 2018, sec. 4.1, train one model per shot)."""
        if self.cfg["algorithm"] == "relation":
            return (self.cfg["shots"],)
        return EVAL_SHOTS

    def json_result(self, result):
        """One object per setting (and one for Lake's runs), accuracy and ci95 in percent."""
        common = {"method": result["algorithm"], "bn": result["bn"],
                  "bn_text": result["bn_text"], "split": result["split"]}
        out = [dict(common, protocol="episodes", way=s["way"], shots=s["shots"],
                    queries=s["queries"], tasks=s["episodes"],
                    accuracy=100 * s["accuracy"], ci95=100 * s["ci95"])
               for s in result["settings"].values()]
        if "lake" in result:
            s = result["lake"]
            out.append(dict(common, protocol="lake_20_runs_within_alphabet", way=s["way"],
                            shots=s["shots"], tasks=s["runs"], accuracy=100 * s["accuracy"],
                            ci95=100 * s["ci95"]))
        return out[0] if len(out) == 1 else out

    def format_result(self, result):
        lines = [f"{result['algorithm']} on Omniglot, {result['split']}; BN: {result['bn_text']}"]
        for name, s in result["settings"].items():
            lines.append(f"  {s['way']:>2}-way {s['shots']}-shot ({s['queries']} queries/class, "
                         f"{s['episodes']} episodes): {100 * s['accuracy']:.2f} "
                         f"+- {100 * s['ci95']:.2f} %")
        if "lake" in result:
            s = result["lake"]
            lines.append(f"  Lake's {s['runs']} runs, 20-way 1-shot within alphabet: "
                         f"{100 * s['accuracy']:.2f} +- {100 * s['ci95']:.2f} %")
        if "note" in result:
            lines.append(f"  note: {result['note']}")
        return "\n".join(lines)


__all__ = ["NAMES", "TASKS", "DEFAULTS", "PAPER", "SOURCES", "Method", "check_config",
           "sources"]
