"""Prototypical Networks (Snell, Swersky & Zemel 2017, "Prototypical Networks for Few-shot
Learning", NeurIPS), with the gradient written by hand.

For one task with support set S = {(x_i, y_i)} and embedding f_phi (Conv-4, 64-d):
    c_k = (1 / |S_k|) sum_{(x_i, y_i) in S_k} f_phi(x_i)                    (eq. 1)
    p_phi(y = k | x) = exp(-d(f_phi(x), c_k)) / sum_k' exp(-d(f_phi(x), c_k'))   (eq. 2)
    J(phi) = -(1/|Q|) sum_{(x, y) in Q} log p_phi(y | x),   d = squared Euclidean.
Backward: metacore.kernels.distance.protonet_loss gives dJ/dq (query embeddings) and dJ/dc
(prototypes); the mean is linear, so dJ/df(x_i) = dJ/dc_{y_i} / |S_{y_i}|; both flow back
through the one shared embedding. Training episodes follow the paper: 60 classes, 5 queries
per class, the shot equal to the test shot.

Batch norm. Training: the support and query images of a task go through the embedding as
one batch (batch statistics of that task, as the authors' code embeds them together); the
running statistics are updated on request. Evaluation (bn="running", the default): the
running statistics, so each image is embedded alone and no query sees the others (the
"transductive" batch-statistics mode is available as bn="batch", for comparison only).

Shape letters: T tasks, N classes, S = N*K support and M = N*Q query images per task,
H x W x C images, D embedding size, P parameters.
"""
import numpy as np

from metacore.nonfinite import check_loss_grad
from metacore.stats import mean_ci
from metacore.kernels import distance
from metacore.models import conv4_protonet
from metacore.params import tile_tasks
from metacore.validate import check_float_array, check_int_array

BN_MODES = ("running", "batch")


def check_episode(op, params, num_params, support_x, support_y, query_x=None, query_y=None,
                  in_shape=None):
    """Validate one batch of episodes; returns N (classes per task).
    params (P,); support_x (T, S, H, W, C), support_y (T, S) labels 0..N-1, each class present;
    query_x (T, M, H, W, C), query_y (T, M) in 0..N-1 (query_y optional)."""
    check_float_array(op, "params", params, shape=(num_params,))
    shape = (None, None) + (tuple(in_shape) if in_shape is not None else (None,) * 3)
    check_float_array(op, "support_x", support_x, shape=shape, dtype=params.dtype)
    T, S = support_x.shape[:2]
    if T < 1:
        raise ValueError(f"{op}: support_x has no tasks (shape {support_x.shape}); a batch "
                         f"needs T >= 1 episodes")
    if S < 1:
        raise ValueError(f"{op}: support_x has no images (shape {support_x.shape})")
    check_int_array(op, "support_y", support_y, shape=(T, S), low=0)
    N = int(support_y.max()) + 1
    counts = np.stack([np.bincount(row, minlength=N) for row in support_y])   # (T, N)
    if (counts == 0).any():
        t, k = np.argwhere(counts == 0)[0]
        raise ValueError(f"{op}: support_y of task {t} has no example of class {k}; labels "
                         f"must be 0..N-1 with every class present (N = {N})")
    if query_x is not None:
        check_float_array(op, "query_x", query_x, shape=(T, None) + support_x.shape[2:],
                          dtype=params.dtype)
        if query_y is not None:
            check_int_array(op, "query_y", query_y, shape=query_x.shape[:2], low=0, high=N)
    return N


def class_mean_matrix(support_y, N, dtype):
    """A: (T, N, S) with A[t, k, i] = 1/|S_k| where support_y[t, i] = k, else 0, so that the
    prototypes are A @ f(support) and d f(support) = A^T @ d prototypes."""
    onehot = (support_y[:, None, :] == np.arange(N)[None, :, None]).astype(dtype)   # (T, N, S)
    return onehot / onehot.sum(axis=2, keepdims=True)


class ProtoNet:
    """Prototypical Networks over one flat parameter vector: the embedding's (default: the
    paper's Conv-4, metacore.models.conv4_protonet)."""

    def __init__(self, model=None, backend="auto"):
        self.model = model if model is not None else conv4_protonet()
        if self.model.loss_name is not None or len(self.model.out_shape) != 1:
            raise ValueError(f"ProtoNet: the embedding must have no loss and a vector output, "
                             f"got {self.model!r}")
        self.layout = self.model.layout
        self.num_params = self.model.num_params
        self.backend = backend

    def init_params(self, rng, dtype=np.float32):
        return self.model.init_params(rng, dtype)

    # ------------------------------------------------------------------ embedding
    def _embed(self, params, x, bn):
        """x: (T, B, H, W, C) -> f(x): (T, B, D), caches. bn='batch': statistics of each
        task's B images; 'running': the buffers, so each image's embedding is its own."""
        if bn not in BN_MODES:
            raise ValueError(f"ProtoNet: bn must be one of {BN_MODES}, got {bn!r}")
        self.model.set_bn_mode(bn)
        T = x.shape[0]
        return self.model.forward(tile_tasks(params, T), x)

    # ------------------------------------------------------------------ training
    def episode_loss_and_grad(self, params, support_x, support_y, query_x, query_y,
                              update_running_stats=False, momentum=0.1):
        """The loss J averaged over the T tasks, its gradient and the query accuracy.

        params (P,); support_x (T, S, H, W, C), support_y (T, S); query_x (T, M, H, W, C),
        query_y (T, M). Batch norm uses each task's own batch (support and query together).
        update_running_stats: also move the BN running statistics toward this batch's.
        -> loss (float), grad (P,) (of the mean loss), accuracy (float, over all queries)."""
        op = "ProtoNet.episode_loss_and_grad"
        N = check_episode(op, params, self.num_params, support_x, support_y, query_x, query_y,
                          self.model.in_shape)
        T, S = support_x.shape[:2]
        x = np.concatenate([support_x, query_x], axis=1)            # (T, S+M, H, W, C)
        emb, caches = self._embed(params, x, "batch")                # (T, S+M, D)
        if update_running_stats:
            self.model.update_running_stats(caches, momentum)
        A = class_mean_matrix(support_y, N, params.dtype)            # (T, N, S)
        protos = A @ emb[:, :S]                                      # (T, N, D)
        q = np.ascontiguousarray(emb[:, S:])                         # (T, M, D)
        gloss = np.full(T, 1.0 / T, dtype=params.dtype)              # d mean / d loss_t
        loss, dq, dprotos, pred = distance.protonet_loss(q, protos, query_y, gloss=gloss,
                                                         backend=self.backend)
        demb = np.concatenate([A.transpose(0, 2, 1) @ dprotos, dq], axis=1)   # (T, S+M, D)
        grad = self.model.backward(demb, caches, T).sum(axis=0)      # (P,)
        check_loss_grad("ProtoNet.episode_loss_and_grad", loss, grad)
        return float(loss.mean()), grad, float((pred == query_y).mean())

    # ------------------------------------------------------------------ evaluation
    def logits(self, params, support_x, support_y, query_x, bn="running"):
        """-> logits (T, M, N) = -||f(query) - c_k||^2, prototypes (T, N, D).
        bn='running' (default): no image's embedding depends on another's."""
        N = check_episode("ProtoNet.logits", params, self.num_params, support_x, support_y,
                          query_x, None, self.model.in_shape)
        S = support_x.shape[1]
        x = np.concatenate([support_x, query_x], axis=1)
        emb, _ = self._embed(params, x, bn)                          # (T, S+M, D)
        protos = class_mean_matrix(support_y, N, params.dtype) @ emb[:, :S]
        q = np.ascontiguousarray(emb[:, S:])
        return -distance.pairwise_sqeuclidean(q, protos, backend=self.backend), protos

    def predict(self, params, support_x, support_y, query_x, bn="running"):
        """-> predicted labels (T, M) int64: the nearest prototype."""
        return self.logits(params, support_x, support_y, query_x, bn)[0].argmax(axis=-1)

    def evaluate(self, params, sampler, n_episodes=1000, chunk=50, bn="running"):
        """Accuracy over n_episodes tasks drawn from sampler (an EpisodeSampler), chunk tasks
        at a time. -> {"accuracy": mean, "ci95": 1.96 std / sqrt(n), "per_task": (n,)}."""
        return evaluate_episodes(self.predict, params, sampler, n_episodes, chunk, bn)


def evaluate_episodes(predict, params, sampler, n_episodes, chunk, bn):
    """Shared evaluation loop: per-task accuracy of predict(params, sx, sy, qx, bn) on
    n_episodes tasks, with the 95% confidence interval of the mean."""
    if n_episodes < 1 or chunk < 1:
        raise ValueError(f"evaluate: n_episodes and chunk must be >= 1, got {n_episodes}, "
                         f"{chunk}")
    accs, left = [], n_episodes
    while left > 0:
        ep = sampler.sample(min(chunk, left))
        pred = predict(params, ep.support_x.astype(params.dtype), ep.support_y,
                       ep.query_x.astype(params.dtype), bn=bn)
        accs.append((pred == ep.query_y).mean(axis=1))
        left -= ep.support_x.shape[0]
    per_task = np.concatenate(accs)
    mean, ci = mean_ci(per_task)
    return {"accuracy": mean, "ci95": ci, "per_task": per_task, "n_episodes": n_episodes}
