"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales 2018, "Learning to Compare:
Relation Network for Few-Shot Learning", CVPR), with the gradient written by hand.

For a query x_j and class i with support images x_{i,1..K} (notation of the paper, sec. 3.2):
    F_i  = sum_k f_phi(x_{i,k})                    class feature map: element-wise sum over
                                                   the class's K support maps (K = 1: the map)
    r_ij = g_phi(C(F_i, f_phi(x_j)))               C = concatenation along the channels,
                                                   class map first, then the query map (eq. 1-2)
    g_phi ends in a sigmoid, so r_ij in (0, 1); the objective is the squared error against the
    match indicator (eq. 3):  sum_i sum_j (r_ij - 1(y_i == y_j))^2.
Here the sum is replaced by the mean over the M x N (query, class) pairs of a task and over
the T tasks, as the authors' code does (nn.MSELoss): the same minimiser, a different scale.

Architecture (Omniglot, sec. 4.1 and Fig. 2, with paddings from the authors' code,
metacore.models.metric_heads): embedding f_phi = 4 x [3x3 conv 64, BN, ReLU], 2x2 max-pool
after the first two, the first two convolutions unpadded and the last two padded by 1
(28 -> 26 -> 13 -> 11 -> 5 -> 5 -> 5: a 5 x 5 x 64 map); relation module g_phi =
2 x [3x3 conv 64 padded by 1, BN, ReLU, 2x2 max-pool] on the 5 x 5 x 128 pair map
(5 -> 2 -> 1), then fully connected 64 -> 8 (ReLU) -> 1 (sigmoid). The paper states the
blocks and the FC sizes; the paddings (not in the text) follow the code, which is what makes
the 64-d input of the first FC layer come out.

Backward, with z the pre-sigmoid score and t the match indicator:
    dL/dr = 2 (r - t) / (T M N),  dL/dz = dL/dr * r (1 - r);
    g_phi's backward gives d C; its first C channels sum over the queries into dF_i, which
    flows to every support map of class i unchanged (the sum); its last channels sum over the
    classes into d f(x_j); both go back through the one shared f_phi.

Batch norm: training uses each task's batch statistics (f_phi: support and query images
together; g_phi: all M x N pairs of the task) and can update the running statistics;
evaluation uses the running statistics by default (bn="running"), so no query's score
depends on another query. bn="batch" is the transductive alternative, for comparison only.

Shape letters: T tasks, N classes, K shots, S = N*K support and M query images per task,
h x w x c feature maps, P parameters.
"""
import numpy as np

from metacore.algorithms.protonet import BN_MODES, check_episode, evaluate_episodes
from metacore.models.metric_heads import (JointParams, backward_with_input_grad,
                                          relation_embedding, relation_module)
from metacore.nonfinite import check_loss_grad
from metacore.params import tile_tasks


def sigmoid(z):
    """1 / (1 + e^-z) without overflow for large |z| (only exp of non-positive numbers)."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def class_sum_matrix(support_y, N, dtype):
    """B: (T, N, S) with B[t, k, i] = 1 where support_y[t, i] = k: class maps = B @ maps."""
    return (support_y[:, None, :] == np.arange(N)[None, :, None]).astype(dtype)


class RelationNet:
    """Relation Network: embedding f_phi and relation module g_phi in one flat vector
    (blocks 'embed/...' then 'relation/...')."""

    def __init__(self, embedding=None, relation=None):
        self.embed = embedding if embedding is not None else relation_embedding()
        feat = self.embed.out_shape
        if len(feat) != 3:
            raise ValueError(f"RelationNet: the embedding must output (h, w, c) maps, got "
                             f"{feat}")
        self.relation = relation if relation is not None else relation_module(feat)
        want = feat[:2] + (2 * feat[2],)
        if self.relation.in_shape != want or self.relation.out_shape != (1,):
            raise ValueError(f"RelationNet: the relation module must map {want} to (1,), got "
                             f"{self.relation.in_shape} -> {self.relation.out_shape}")
        self.params = JointParams([("embed", self.embed), ("relation", self.relation)])
        self.layout, self.num_params = self.params.layout, self.params.size

    def init_params(self, rng, dtype=np.float32):
        return np.concatenate([self.embed.init_params(rng, dtype),
                               self.relation.init_params(rng, dtype)])

    def _set_bn(self, bn):
        if bn not in BN_MODES:
            raise ValueError(f"RelationNet: bn must be one of {BN_MODES}, got {bn!r}")
        self.embed.set_bn_mode(bn)
        self.relation.set_bn_mode(bn)

    def _forward(self, params, support_x, support_y, query_x, N):
        """-> scores r (T, M, N), and what backward needs."""
        T, S = support_x.shape[:2]
        M = query_x.shape[1]
        x = np.concatenate([support_x, query_x], axis=1)                  # (T, S+M, H, W, C)
        th_f = tile_tasks(self.params.part(params, "embed"), T)
        maps, f_caches = self.embed.forward(th_f, x)                      # (T, S+M, h, w, c)
        fshape = maps.shape[2:]
        B = class_sum_matrix(support_y, N, params.dtype)                  # (T, N, S)
        F = (B @ maps[:, :S].reshape(T, S, -1)).reshape((T, N) + fshape)  # (T, N, h, w, c)
        fq = maps[:, S:]                                                  # (T, M, h, w, c)
        pairs = np.concatenate(
            [np.broadcast_to(F[:, None], (T, M, N) + fshape),
             np.broadcast_to(fq[:, :, None], (T, M, N) + fshape)], axis=-1)   # (T, M, N, h, w, 2c)
        th_g = tile_tasks(self.params.part(params, "relation"), T)
        z, g_caches = self.relation.forward(th_g, pairs.reshape((T, M * N) + pairs.shape[3:]))
        r = sigmoid(z.reshape(T, M, N))                                   # (T, M, N)
        return r, (f_caches, g_caches, B, fshape)

    # ------------------------------------------------------------------ training
    def episode_loss_and_grad(self, params, support_x, support_y, query_x, query_y,
                              update_running_stats=False, momentum=0.1):
        """Mean squared error of the relation scores against the one-hot match, averaged over
        pairs and tasks; its gradient; the query accuracy (argmax_i r_ij == y_j).

        params (P,); support_x (T, S, H, W, C), support_y (T, S) in 0..N-1, every class
        present; query_x (T, M, H, W, C), query_y (T, M). Batch norm: batch statistics.
        -> loss (float), grad (P,), accuracy (float)."""
        N = check_episode("RelationNet.episode_loss_and_grad", params, self.num_params,
                          support_x, support_y, query_x, query_y, self.embed.in_shape)
        T, S = support_x.shape[:2]
        M = query_x.shape[1]
        self._set_bn("batch")
        r, (f_caches, g_caches, B, fshape) = self._forward(params, support_x, support_y,
                                                           query_x, N)
        if update_running_stats:
            self.embed.update_running_stats(f_caches, momentum)
            self.relation.update_running_stats(g_caches, momentum)
        target = (query_y[:, :, None] == np.arange(N)).astype(params.dtype)   # (T, M, N)
        diff = r - target
        loss = float((diff * diff).mean())
        dz = (2.0 / diff.size) * diff * r * (1.0 - r)                    # (T, M, N)
        dpairs, g_grad = backward_with_input_grad(
            self.relation, dz.reshape(T, M * N, 1), g_caches, T)         # (T, M*N, h, w, 2c)
        c = fshape[-1]
        dpairs = dpairs.reshape((T, M, N) + fshape[:-1] + (2 * c,))
        dF = dpairs[..., :c].sum(axis=1)                                  # (T, N, h, w, c)
        dfq = dpairs[..., c:].sum(axis=2)                                 # (T, M, h, w, c)
        dfs = (B.transpose(0, 2, 1) @ dF.reshape(T, N, -1)).reshape((T, S) + fshape)
        f_grad = self.embed.backward(np.concatenate([dfs, dfq], axis=1), f_caches, T)
        grad = np.concatenate([f_grad.sum(axis=0), g_grad.sum(axis=0)])
        acc = float((r.argmax(axis=-1) == query_y).mean())
        check_loss_grad("RelationNet.episode_loss_and_grad", loss, grad)
        return loss, grad, acc

    # ------------------------------------------------------------------ evaluation
    def scores(self, params, support_x, support_y, query_x, bn="running"):
        """-> relation scores r (T, M, N) in (0, 1). bn='running' (default): no leak."""
        N = check_episode("RelationNet.scores", params, self.num_params, support_x, support_y,
                          query_x, None, self.embed.in_shape)
        self._set_bn(bn)
        return self._forward(params, support_x, support_y, query_x, N)[0]

    def predict(self, params, support_x, support_y, query_x, bn="running"):
        """-> (T, M) int64: the class with the highest relation score."""
        return self.scores(params, support_x, support_y, query_x, bn).argmax(axis=-1)

    def evaluate(self, params, sampler, n_episodes=1000, chunk=50, bn="running"):
        """Accuracy over n_episodes tasks from sampler: {"accuracy", "ci95", "per_task"}."""
        return evaluate_episodes(self.predict, params, sampler, n_episodes, chunk, bn)
