"""Convolutional Siamese networks (Koch, Zemel & Salakhutdinov 2015, "Siamese Neural Networks
for One-shot Image Recognition", ICML Deep Learning Workshop), with the gradient by hand.

Verification model (sec. 3.1 of the paper): twin embeddings h1 = f(x1), h2 = f(x2) with
shared weights, then
    p = sigmoid( sum_j alpha_j |h1_j - h2_j| + b )          (the weighted L1 distance)
trained with the binary cross-entropy against y = 1 for a same-class pair, 0 otherwise:
    L = -(1/B) sum [ y log p + (1 - y) log(1 - p) ]         (mean over pairs, then tasks)
One-shot classification (sec. 4.2): a query gets the label of the support image whose pair
with it has the highest p (the most similar support; with K > 1 shots, of all N*K supports).

Deviation from the paper: Koch et al.'s twin is a 4-conv net for 105 x 105 images (10x10, 7x7,
4x4, 4x4 filters, then a 4096-unit sigmoid layer), trained with layer-wise L2 penalties,
momentum and affine distortions. On the 28 x 28 images used here the twin is the Conv-4
embedding of Prototypical Networks (metacore.models.conv4_protonet: 4 x [3x3 conv 64, BN,
ReLU, 2x2 max-pool], 64-d), trained with Adam and no weight penalty; the head (alpha, b),
the loss and the affine distortions of the training pairs (below) are the paper's.

Gradients: with z = alpha . |d| + b, d = h1 - h2 and dz = dL/dz = (p - y) / (B T):
    dalpha = sum dz |d|,   db = sum dz,   dh1 = dz alpha sign(d) = -dh2   (sign(0) = 0),
and dh1, dh2 flow back through the one shared embedding (both images of every pair go
through it as one batch, so BN sees x1 and x2 of the task together).

Affine distortions (PairSampler(distort=True); the Siamese protocol's default in
metacore.methods.metric): Koch et al. augment the verification pairs with small random
affine distortions, T = (theta, rho_x, rho_y, s_x, s_y, t_x, t_y) with theta in [-10, 10]
degrees, rho_x, rho_y in [-0.3, 0.3], s_x, s_y in [0.8, 1.2], t_x, t_y in [-2, 2] pixels,
each component present with probability 0.5 (absent: the identity value 0 or 1); each image
of a pair gets its own draw. The paper gives the ranges but neither the order of
composition nor the centre; here, in (x, y) = (column, row) coordinates about the image
centre c = ((W - 1) / 2, (H - 1) / 2),
    u' = A (u - c) + c + t,   A = R(theta) [[1, rho_x], [rho_y, 1]] diag(s_x, s_y)
(det A >= 0.8^2 (1 - 0.09) > 0). The warp is by inverse mapping, bilinear, with the
background value 0 outside the image (affine_warp), so the image size and the value range
[min(0, x.min()), max(0, x.max())] are kept. Koch's images are 105 x 105, so a 2-pixel
shift there is a smaller fraction of the image than on the 28 x 28 images used here.
Batch norm: training uses each task's batch statistics; evaluation uses the running
statistics by default (bn="running"), so no query's prediction depends on another query.

Shape letters: T tasks, B pairs per task, S support and M query images per task, D
embedding size, H x W x C images, P parameters.
"""
import math
from dataclasses import dataclass

import numpy as np

from metacore.algorithms.protonet import BN_MODES, check_episode, evaluate_episodes
from metacore.nonfinite import check_loss_grad
from metacore.stats import mean_ci
from metacore.losses import bce_logits
from metacore.models import conv4_protonet
from metacore.models.metric_heads import JointParams
from metacore.params import tile_tasks
from metacore.validate import check_float_array


# Koch et al. 2015: the affine distortion's components, (low, high, identity value), and the
# probability that each is present
DISTORT_RANGES = {"theta": (-10.0, 10.0, 0.0),                       # degrees
                  "rho_x": (-0.3, 0.3, 0.0), "rho_y": (-0.3, 0.3, 0.0),
                  "s_x": (0.8, 1.2, 1.0), "s_y": (0.8, 1.2, 1.0),
                  "t_x": (-2.0, 2.0, 0.0), "t_y": (-2.0, 2.0, 0.0)}   # pixels
DISTORT_P = 0.5


def sample_distortions(rng, n):
    """n independent draws of Koch et al.'s distortion from the numpy Generator rng ->
    {component: (n,) float64}; each component present with probability DISTORT_P, uniform
    on its range when present, else its identity value. Consumes 2 * 7 rng calls."""
    out = {}
    for name, (lo, hi, ident) in DISTORT_RANGES.items():
        present = rng.random(n) < DISTORT_P
        out[name] = np.where(present, rng.uniform(lo, hi, n), ident)
    return out


def distortion_matrices(d):
    """{component: (n,)} -> A (n, 2, 2), t (n, 2): u' = A (u - c) + c + t in (x, y)."""
    th = np.deg2rad(d["theta"])
    cos, sin = np.cos(th), np.sin(th)
    R = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)      # (n, 2, 2)
    one = np.ones_like(th)
    Sh = np.stack([np.stack([one, d["rho_x"]], -1), np.stack([d["rho_y"], one], -1)], -2)
    A = R @ Sh * np.stack([d["s_x"], d["s_y"]], -1)[:, None, :]   # right-multiply diag(s)
    return A, np.stack([d["t_x"], d["t_y"]], -1)


def affine_warp(x, A, t):
    """x: (n, H, W) images, A: (n, 2, 2), t: (n, 2) -> (n, H, W) fresh, x's dtype: output pixel
    u takes the bilinear interpolation of x at A^-1 (u - c - t) + c (inverse mapping), 0
    outside the image. A = I, t = 0 returns x exactly."""
    n, H, W = x.shape
    c = np.array([(W - 1) / 2.0, (H - 1) / 2.0])
    rows, cols = np.mgrid[0:H, 0:W]
    u = np.stack([cols, rows], -1).reshape(-1, 2).astype(np.float64)             # (H W, 2)
    Ainv = np.linalg.inv(A)                                                       # (n, 2, 2)
    src = np.einsum("nij,npj->npi", Ainv, u[None] - c - t[:, None, :]) + c       # (n, H W, 2)
    # exact at integer source positions (the identity): no rounding through the centre
    src = np.where(np.abs(src - np.rint(src)) < 1e-9, np.rint(src), src)
    sx, sy = src[..., 0], src[..., 1]                                             # (n, H W)
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = sx - x0, sy - y0
    flat = x.reshape(n, -1).astype(np.float64)                                    # (n, H W)
    out = np.zeros((n, H * W))
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
            v = np.take_along_axis(flat, np.where(inside, yi * W + xi, 0), axis=1)
            out += np.where(inside, wx * wy * v, 0.0)
    return out.reshape(n, H, W).astype(x.dtype)


def distort(x, rng):
    """x: (..., H, W, 1) images -> the same shape and dtype, each image warped by its own
    draw of sample_distortions(rng)."""
    H, W = x.shape[-3:-1]
    flat = x.reshape(-1, H, W)
    A, t = distortion_matrices(sample_distortions(rng, flat.shape[0]))
    return affine_warp(flat, A, t).reshape(x.shape)


@dataclass
class PairBatch:
    """Verification pairs: x1, x2 (T, B, H, W, 1); same (T, B) float 1/0; class1, class2
    (T, B) class ids (character position * n_rot + quarter turns); char1, char2, rot1, rot2,
    drawing1, drawing2 (T, B) int64 for checks."""
    x1: np.ndarray
    x2: np.ndarray
    same: np.ndarray
    class1: np.ndarray
    class2: np.ndarray
    char1: np.ndarray
    char2: np.ndarray
    rot1: np.ndarray
    rot2: np.ndarray
    drawing1: np.ndarray
    drawing2: np.ndarray


class PairSampler:
    """Seeded sampler of verification pairs from the given characters (e.g. the training
    split). Each task holds ceil(B/2) same-class pairs (one class, two distinct drawings) then
    floor(B/2) different-class pairs (two distinct classes); with rotate=True a class is a
    (character, quarter turn), as in EpisodeSampler. distort=True: every image of a pair is
    warped by its own Koch et al. affine distortion (module docstring), drawn from the same
    rng after the pair's classes and drawings."""

    def __init__(self, images, char_indices, *, rotate=True, seed, dtype=np.float32,
                 distort=False):
        op = "PairSampler"
        check_float_array(op, "images", images, ndim=4)              # (C, D, H, W)
        chars = np.asarray(char_indices)
        if chars.ndim != 1 or chars.size < 1 or not np.issubdtype(chars.dtype, np.integer):
            raise ValueError(f"{op}: char_indices must be a non-empty 1-D integer array, got "
                             f"shape {chars.shape}, dtype {chars.dtype}")
        if chars.min() < 0 or chars.max() >= images.shape[0] or np.unique(chars).size != chars.size:
            raise ValueError(f"{op}: char_indices must be distinct values in "
                             f"[0, {images.shape[0]})")
        if images.shape[1] < 2:
            raise ValueError(f"{op}: same-class pairs need >= 2 drawings per character, got "
                             f"{images.shape[1]}")
        self.n_rot = 4 if rotate else 1
        if self.n_rot * chars.size < 2:
            raise ValueError(f"{op}: different-class pairs need >= 2 classes")
        self.images, self.chars = images, chars.astype(np.int64)
        self.dtype = np.dtype(dtype)
        if not isinstance(distort, (bool, np.bool_)):
            raise TypeError(f"{op}: distort must be a bool, got {type(distort).__name__}")
        self.distort = bool(distort)
        self._rng = np.random.default_rng(seed)

    @property
    def rng(self):
        """The sampler's numpy Generator (save / restore its state for exact resume)."""
        return self._rng

    def _images(self, cls, drawing):
        char, rot = self.chars[cls // self.n_rot], cls % self.n_rot
        x = self.images[char, drawing].astype(self.dtype)           # (T, B, H, W)
        for r in range(1, self.n_rot):
            x[rot == r] = np.rot90(x[rot == r], r, axes=(-2, -1))
        return x[..., None], char, rot

    def sample(self, n_tasks, n_pairs):
        T, B = int(n_tasks), int(n_pairs)
        if T < 1 or B < 2:
            raise ValueError(f"PairSampler.sample: needs n_tasks >= 1 and n_pairs >= 2, got "
                             f"{n_tasks}, {n_pairs}")
        rng, n_cls, D = self._rng, self.chars.size * self.n_rot, self.images.shape[1]
        n_same = (B + 1) // 2
        c1 = rng.integers(0, n_cls, (T, B))
        c2 = c1.copy()
        # different pairs: c2 = c1 + a nonzero offset mod n_cls, uniform over the other classes
        c2[:, n_same:] = (c1[:, n_same:] + rng.integers(1, n_cls, (T, B - n_same))) % n_cls
        d1 = rng.integers(0, D, (T, B))
        d2 = rng.integers(0, D, (T, B))
        # same pairs: a second drawing different from the first
        d2[:, :n_same] = (d1[:, :n_same] + rng.integers(1, D, (T, n_same))) % D
        x1, ch1, r1 = self._images(c1, d1)
        x2, ch2, r2 = self._images(c2, d2)
        if self.distort:
            x1, x2 = distort(x1, rng), distort(x2, rng)
        same = (c1 == c2).astype(self.dtype)
        return PairBatch(x1, x2, same, c1, c2, ch1, ch2, r1, r2, d1, d2)


class SiameseNet:
    """Twin embedding and weighted-L1 head in one flat vector: 'embed/...', 'head/alpha' (D,),
    'head/bias' (1,)."""

    def __init__(self, embedding=None):
        self.embed = embedding if embedding is not None else conv4_protonet()
        if self.embed.loss_name is not None or len(self.embed.out_shape) != 1:
            raise ValueError(f"SiameseNet: the embedding must have no loss and a vector "
                             f"output, got {self.embed!r}")
        self.D = self.embed.out_shape[0]
        self.params = JointParams([("embed", self.embed),
                                   ("head", [("alpha", (self.D,)), ("bias", (1,))])])
        self.layout, self.num_params = self.params.layout, self.params.size

    def init_params(self, rng, dtype=np.float32):
        a = math.sqrt(6.0 / (self.D + 1))                            # Glorot uniform, D -> 1
        head = np.concatenate([rng.uniform(-a, a, self.D), [0.0]]).astype(dtype)
        return np.concatenate([self.embed.init_params(rng, dtype), head])

    def _head(self, params):
        h = self.params.part(params, "head")
        return h[:self.D], h[self.D]

    def _embed(self, params, x, bn):
        if bn not in BN_MODES:
            raise ValueError(f"SiameseNet: bn must be one of {BN_MODES}, got {bn!r}")
        self.embed.set_bn_mode(bn)
        return self.embed.forward(tile_tasks(self.params.part(params, "embed"), x.shape[0]), x)

    # ------------------------------------------------------------------ training
    def episode_loss_and_grad(self, params, x1, x2, same, update_running_stats=False,
                              momentum=0.1):
        """Binary cross-entropy of the verification pairs, mean over pairs and tasks.

        params (P,); x1, x2 (T, B, H, W, C); same (T, B) in {0, 1} (float, params' dtype).
        -> loss (float), grad (P,), accuracy (float: p > 1/2 agrees with same)."""
        op = "SiameseNet.episode_loss_and_grad"
        check_float_array(op, "params", params, shape=(self.num_params,))
        check_float_array(op, "x1", x1, shape=(None, None) + self.embed.in_shape,
                          dtype=params.dtype)
        check_float_array(op, "x2", x2, shape=x1.shape, dtype=params.dtype)
        check_float_array(op, "same", same, shape=x1.shape[:2], dtype=params.dtype)
        if not np.isin(same, (0.0, 1.0)).all():
            raise ValueError(f"{op}: same must hold only 0 and 1, got values "
                             f"{np.unique(same)[:5]}")
        T, B = x1.shape[:2]
        h, caches = self._embed(params, np.concatenate([x1, x2], axis=1), "batch")  # (T, 2B, D)
        if update_running_stats:
            self.embed.update_running_stats(caches, momentum)
        alpha, bias = self._head(params)
        d = h[:, :B] - h[:, B:]                                      # (T, B, D)
        z = np.abs(d) @ alpha + bias                                 # (T, B)
        loss, lcache = bce_logits.bce_logits_forward(z, same)        # (T,)
        dz = bce_logits.bce_logits_backward(lcache) / T              # (T, B), of the mean
        dh1 = dz[..., None] * alpha * np.sign(d)                     # (T, B, D)
        grad_f = self.embed.backward(np.concatenate([dh1, -dh1], axis=1), caches, T)
        dalpha = np.einsum("tb,tbd->d", dz, np.abs(d))
        grad = np.concatenate([grad_f.sum(axis=0), dalpha, [dz.sum()]]).astype(params.dtype)
        acc = float(((z > 0) == (same > 0.5)).mean())
        check_loss_grad("SiameseNet.episode_loss_and_grad", loss, grad)
        return float(loss.mean()), grad, acc

    # ------------------------------------------------------------------ evaluation
    def pair_logits(self, params, support_x, support_y, query_x, bn="running"):
        """-> z (T, M, S): logit of 'same' for each (query, support) pair."""
        check_episode("SiameseNet.pair_logits", params, self.num_params, support_x,
                      support_y, query_x, None, self.embed.in_shape)
        S = support_x.shape[1]
        h, _ = self._embed(params, np.concatenate([support_x, query_x], axis=1), bn)
        alpha, bias = self._head(params)
        d = np.abs(h[:, S:, None, :] - h[:, None, :S, :])            # (T, M, S, D)
        return d @ alpha + bias

    def predict(self, params, support_x, support_y, query_x, bn="running"):
        """-> (T, M) int64: the label of the most similar support (highest p)."""
        z = self.pair_logits(params, support_x, support_y, query_x, bn)
        return np.take_along_axis(support_y, z.argmax(axis=-1), axis=1)

    def evaluate(self, params, sampler, n_episodes=1000, chunk=50, bn="running"):
        """N-way K-shot accuracy over n_episodes tasks: {"accuracy", "ci95", "per_task"}."""
        return evaluate_episodes(self.predict, params, sampler, n_episodes, chunk, bn)


def lake_accuracy(predict, params, data, bn="running"):
    """Lake et al.'s 20 one-shot runs (20-way, within one alphabet; metacore.data.omniglot.
    lake_episodes) scored with any predict(params, sx, sy, qx, bn) -> (T, M) labels.
    -> {"accuracy": mean over runs, "ci95", "per_run": (20,)}."""
    from metacore.data.omniglot import lake_episodes
    ep = lake_episodes(data, dtype=params.dtype)
    pred = predict(params, ep.support_x, ep.support_y, ep.query_x, bn=bn)
    per_run = (pred == ep.query_y).mean(axis=1)
    mean, ci = mean_ci(per_run)
    return {"accuracy": mean, "ci95": ci, "per_run": per_run}
