"""Matching Networks (Vinyals et al. 2016), with and without Full Context Embeddings, forward
and backward by hand over one flat parameter vector.

Shape letters (this module):
  T tasks (episodes), M supports per task (N classes x K shots, any order), Q queries per
  task, N classes (n_way), E embedding features, P parameters.

The model, in the paper's notation (section 2.1 and appendix A.1/A.2):
  embedding   f' = g' = the same Conv-4 (metacore.models.conv4_protonet), shared weights
  attention   a(x_hat, x_i) = softmax_i c(f(x_hat, S), g(x_i, S)),  c a similarity (below)
  prediction  y_hat = sum_i a(x_hat, x_i) y_i  (y_i one-hot), so y_hat_n = sum_{i: y_i = n} a_i
  loss        per task, the mean over its queries of -log y_hat_{y}; the episode loss is the
              mean over the T tasks.
  log y_hat_n = logsumexp_{i: y_i = n} c_i - logsumexp_i c_i: the log of a sum of softmax
  weights, computed as a difference of log-sum-exps (never log of a rounded sum of small
  weights), each shifted by its own maximum (the class's, the whole row's): c is unbounded
  for 'support_cosine' and 'scaled_cosine', where one shared shift could underflow a class.
  Gradient: d(-log y_hat_y)/dc_i = a_i - [y_i = y] exp(c_i) / sum_{j: y_j = y} exp(c_j).

The similarity c(f, g) (`similarity=`; f a query's embedding, g a support's, norms clamped
at EPS = 1e-8 as in metacore.kernels.distance):
  'support_cosine' (default)  c = f . g / |g|. Only the support side is normalised, so |f|
      acts as a learned per-query temperature. The paper's text says cosine, but public
      reimplementations normalise the support side only: zergylord/oneshot (its issue 2 is
      reported to carry the paper authors' confirmation; that thread was not readable from
      here) and AntreasAntoniou/MatchingNetworks (issues 15 and 21, where that
      reimplementation's author explains the choice). With the symmetric cosine and 5
      supports, a_i <= e / (e + 4 e^-1) ~ 0.65, so the loss has a floor; see
      docs/RESULTS_METRIC.md for the ablation.
      Backward, with u = g / |g|: df = sum_i dc_i u_i,
      dg_i = (I - u_i u_i^T) (sum_q dc_qi f_q) / |g_i|  (|g_i| <= EPS: the plain 1/EPS term).
  'cosine'          c = f . g / (|f| |g|), Vinyals et al. 2016 sec. 2.1 as written
      (metacore.kernels.distance.pairwise_cosine and its backward).
  'scaled_cosine'   c = s f . g / (|f| |g|): s = cosine_scale fixed, or with learn_scale a
      scalar parameter 'scale' (the last entry of the flat vector) initialised at
      cosine_scale, with dL/ds = sum dc * cos. (A temperature on the cosine, as in later
      metric-learning work; cosine_scale = 10 is our choice.)

Full Context Embeddings (fce=True), the appendix's equations with H = E hidden units:
  g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i): a bidirectional LSTM over the M support embeddings
      (in the order given, zero initial states; metacore.layers.lstm.bilstm_forward).
  f(x_hat, S) = attLSTM(f'(x_hat), g(S), K): h_0 = c_0 = 0, then for k = 1..K
      r_{k-1} = sum_i a(h_{k-1}, g(x_i)) g(x_i),   a = softmax_i of the dot products h . g_i
      h_hat_k, c_k = LSTM(f'(x_hat), [h_{k-1}, r_{k-1}], c_{k-1})
      h_k = h_hat_k + f'(x_hat)
  and f = h_K. The LSTM step reads the concatenation [f', r_{k-1}] as its input and h_{k-1}
  as its state, i.e. W: (2E + E, 4E) over [f', r, h] - the paper's [h, r] state written
  with its rows in another order. r_0 is the readout at h_0 = 0: the mean of the g(x_i).
  Each query is processed on its own (it attends to the supports only), so queries stay
  independent; only the support set conditions f.

Batch norm: training (bn mode 'batch') normalises each task with the statistics of its
own episode, supports and queries together (the usual transductive setting). predict()
defaults to bn='running': the model's running statistics, so that one query's prediction
cannot depend on the other queries of its batch (loss_and_grad(update_bn_stats=True) keeps
those statistics up to date during training).

Parameters: one flat vector (P,) with named views (metacore.params.ParamLayout): the
embedding's blocks prefixed 'emb.' (the first P_e entries, in the Conv-4's own layout),
then with FCE 'g_fwd.W', 'g_fwd.b', 'g_bwd.W', 'g_bwd.b' (E -> E each) and 'f_att.W'
(3E, 4E), 'f_att.b' (4E,); with similarity='scaled_cosine' and learn_scale, 'scale' (1,)
last.
"""
import numpy as np

from metacore.kernels import distance as dist
from metacore.layers import lstm as ls
from metacore.nonfinite import check_loss_grad
from metacore.params import ParamLayout
from metacore.validate import check_float_array, check_int_array

LSTM_BLOCKS = ("g_fwd", "g_bwd", "f_att")
SIMILARITIES = ("support_cosine", "cosine", "scaled_cosine")
EPS = dist.EPS


class MatchingNet:
    """embedding: a metacore.network.Model with a flat (E,) output (e.g. conv4_protonet());
    fce: Full Context Embeddings on/off (decides the parameter layout); read_steps: K of the
    attention LSTM; backend: of metacore.kernels.distance for the cosine similarity;
    similarity: one of SIMILARITIES (module docstring); cosine_scale: the scale of
    'scaled_cosine' (its initial value with learn_scale); learn_scale: 'scaled_cosine' only,
    the scale becomes the parameter 'scale'."""

    def __init__(self, embedding, fce=False, read_steps=5, forget_bias=1.0, backend="auto",
                 similarity="support_cosine", cosine_scale=10.0, learn_scale=False):
        if len(embedding.out_shape) != 1:
            raise ValueError(f"MatchingNet: the embedding must output a flat vector, "
                             f"{embedding.name} outputs shape {embedding.out_shape}")
        if not isinstance(fce, (bool, np.bool_)):
            raise TypeError(f"MatchingNet: fce must be a bool, got {type(fce).__name__}")
        if isinstance(read_steps, bool) or not isinstance(read_steps, (int, np.integer)) \
                or read_steps < 1:
            raise ValueError(f"MatchingNet: read_steps must be an int >= 1, got {read_steps!r}")
        self.model, self.fce, self.read_steps = embedding, bool(fce), int(read_steps)
        self.forget_bias, self.backend = float(forget_bias), backend
        if similarity not in SIMILARITIES:
            raise ValueError(f"MatchingNet: similarity must be one of {SIMILARITIES}, got "
                             f"{similarity!r}")
        if isinstance(cosine_scale, bool) or not isinstance(cosine_scale, (int, float)) \
                or not np.isfinite(cosine_scale) or cosine_scale <= 0:
            raise ValueError(f"MatchingNet: cosine_scale must be a finite number > 0, got "
                             f"{cosine_scale!r}")
        if not isinstance(learn_scale, (bool, np.bool_)):
            raise TypeError(f"MatchingNet: learn_scale must be a bool, got "
                            f"{type(learn_scale).__name__}")
        if learn_scale and similarity != "scaled_cosine":
            raise ValueError(f"MatchingNet: learn_scale applies to similarity='scaled_cosine' "
                             f"only, got similarity={similarity!r}")
        self.similarity, self.cosine_scale = similarity, float(cosine_scale)
        self.learn_scale = bool(learn_scale)
        E = self.dim = embedding.out_shape[0]
        blocks = [("emb." + n, s) for n, s, _ in embedding.layout.describe()]
        if self.fce:
            for name, d_in in (("g_fwd", E), ("g_bwd", E), ("f_att", 2 * E)):
                blocks += [(f"{name}.{p}", s) for p, s in ls.lstm_param_shapes(d_in, E)]
        if self.learn_scale:
            blocks.append(("scale", (1,)))
        self.layout = ParamLayout(blocks)
        self.num_params = self.layout.size
        self.num_emb = embedding.num_params      # 'emb.' blocks are theta[:num_emb]

    def __repr__(self):
        sim = self.similarity + (f"(s={self.cosine_scale:g}{', learned' if self.learn_scale else ''})"
                                 if self.similarity == "scaled_cosine" else "")
        return (f"MatchingNet(embedding={self.model.name}, E={self.dim}, fce={self.fce}, "
                f"K={self.read_steps}, {sim}, {self.num_params} parameters)")

    def init_params(self, rng, dtype=np.float64):
        """A fresh (P,) vector: the embedding's initialiser, then each LSTM's (lstm_init)."""
        theta = np.empty(self.num_params, dtype)
        theta[:self.num_emb] = self.model.init_params(rng, dtype)
        if self.fce:
            E = self.dim
            for name, d_in in (("g_fwd", E), ("g_bwd", E), ("f_att", 2 * E)):
                W, b = ls.lstm_init(rng, d_in, E, dtype, self.forget_bias)
                theta[self.layout.slice(name + ".W")] = W.reshape(-1)
                theta[self.layout.slice(name + ".b")] = b
        if self.learn_scale:
            theta[self.layout.slice("scale")] = self.cosine_scale
        return theta

    def views(self, params):
        """(P,) -> {name: view of its block}; writing a view writes params."""
        return {k: v[0] for k, v in self.layout.views(params[None, :]).items()}

    # -------------------------------------------------------------- checks
    def _check(self, op, params, support_x, support_y, query_x, query_y, n_way):
        check_float_array(op, "params", params, shape=(self.num_params,))
        if isinstance(n_way, bool) or not isinstance(n_way, (int, np.integer)) or n_way < 1:
            raise ValueError(f"{op}: n_way must be an int >= 1, got {n_way!r}")
        img = self.model.in_shape
        check_float_array(op, "support_x", support_x, shape=(None, None) + img,
                          dtype=params.dtype)
        T, M = support_x.shape[:2]
        check_float_array(op, "query_x", query_x, shape=(T, None) + img, dtype=params.dtype)
        check_int_array(op, "support_y", support_y, shape=(T, M), low=0, high=n_way)
        if query_y is not None:
            check_int_array(op, "query_y", query_y, shape=(T, query_x.shape[1]), low=0,
                            high=n_way)
        counts = np.stack([np.bincount(row, minlength=n_way) for row in support_y])  # (T, N)
        if (counts == 0).any():
            t, n = np.argwhere(counts == 0)[0]
            raise ValueError(f"{op}: task {t} has no support example of class {n} "
                             f"(every one of the {n_way} classes needs at least one)")
        if query_x.shape[1] < 1:
            raise ValueError(f"{op}: needs at least one query per task, got query_x of shape "
                             f"{query_x.shape}")

    # -------------------------------------------------------------- forward
    def _forward(self, params, support_x, support_y, query_x, n_way):
        """-> logp: (T, Q, N) log y_hat, cache."""
        T, M = support_x.shape[:2]
        theta = np.repeat(params[None, :self.num_emb], T, axis=0)      # (T, P_e)
        x = np.concatenate([support_x, query_x], axis=1)               # (T, M+Q, *img)
        emb, emb_cache = self.model.forward(theta, x)                  # (T, M+Q, E)
        gp, fp = emb[:, :M], emb[:, M:]                                # (T, M, E), (T, Q, E)
        fce_cache = None
        if self.fce:
            v = self.views(params)
            hf, hb, bl_cache = ls.bilstm_forward(np.ascontiguousarray(gp.transpose(1, 0, 2)),
                                                 v["g_fwd.W"], v["g_fwd.b"],
                                                 v["g_bwd.W"], v["g_bwd.b"])   # (M, T, E)
            G = gp + (hf + hb).transpose(1, 0, 2)                      # (T, M, E)
            F, att_cache = _attention_lstm_forward(fp, G, v["f_att.W"], v["f_att.b"],
                                                   self.read_steps)    # (T, Q, E)
            fce_cache = (bl_cache, att_cache)
        else:
            G, F = np.ascontiguousarray(gp), np.ascontiguousarray(fp)
        c, sim_cache = self._similarity(params, F, G)                  # (T, Q, M)
        Y = np.eye(n_way, dtype=c.dtype)[support_y]                    # (T, M, N) one-hot
        e = np.exp(c - c.max(axis=-1, keepdims=True))                  # (T, Q, M)
        Z = e.sum(axis=-1, keepdims=True)                              # (T, Q, 1)
        # each class's own shift: exp(c_i - max_{j in n} c_j) for i in class n, else 0
        member = Y.transpose(0, 2, 1)[:, None] > 0                     # (T, 1, N, M)
        cn = np.where(member, c[:, :, None, :], -np.inf)               # (T, Q, N, M)
        mn = cn.max(axis=-1)                                           # (T, Q, N)
        en = np.exp(cn - mn[..., None])                                # (T, Q, N, M)
        Sn = en.sum(axis=-1)                                           # (T, Q, N)
        logp = (mn + np.log(Sn)) - (c.max(axis=-1, keepdims=True) + np.log(Z))  # (T, Q, N)
        return logp, (emb_cache, F, G, fce_cache, sim_cache, e, Z, en, Sn)

    # -------------------------------------------------------------- similarity
    def _similarity(self, params, F, G):
        """F: (T, Q, E), G: (T, M, E) -> c: (T, Q, M), cache (see the module docstring)."""
        if self.similarity == "support_cosine":
            n = np.sqrt((G * G).sum(axis=-1))                          # (T, M)
            nc = np.maximum(n, EPS)                                    # (T, M) clamped
            U = G / nc[..., None]                                      # (T, M, E)
            return np.matmul(F, U.transpose(0, 2, 1)), (U, nc, n > EPS)
        cos = dist.pairwise_cosine(F, G, backend=self.backend)         # (T, Q, M)
        if self.similarity == "cosine":
            return cos, None
        s = params[self.layout.slice("scale")][0] if self.learn_scale \
            else params.dtype.type(self.cosine_scale)
        return s * cos, (cos, s)

    def _similarity_backward(self, dc, F, G, cache, grad):
        """dc: (T, Q, M) -> dF (T, Q, E), dG (T, M, E) fresh; the learned scale's gradient
        is written into grad['scale']."""
        if self.similarity == "support_cosine":
            U, nc, on = cache
            dF = np.matmul(dc, U)                                      # (T, Q, E)
            dU = np.matmul(dc.transpose(0, 2, 1), F)                   # (T, M, E)
            # d(g/|g|) = (I - u u^T) dg / |g|; below EPS the norm is the constant EPS
            proj = (U * dU).sum(axis=-1) * on                          # (T, M)
            dG = (dU - proj[..., None] * U) / nc[..., None]            # (T, M, E)
            return dF, dG
        if self.similarity == "cosine":
            return dist.pairwise_cosine_backward(dc, F, G, backend=self.backend)
        cos, s = cache
        if self.learn_scale:
            grad[self.layout.slice("scale")] = (dc * cos).sum()
        return dist.pairwise_cosine_backward(s * dc, F, G, backend=self.backend)

    def episode_loss(self, params, support_x, support_y, query_x, query_y, n_way):
        """-> loss: the mean over tasks of each task's mean query cross-entropy."""
        self._check("MatchingNet.episode_loss", params, support_x, support_y, query_x,
                    query_y, n_way)
        logp, _ = self._forward(params, support_x, support_y, query_x, n_way)
        return float(-np.take_along_axis(logp, query_y[..., None], axis=-1).mean())

    def episode_loss_and_grad(self, params, support_x, support_y, query_x, query_y, n_way,
                              update_bn_stats=False, momentum=0.1):
        """params: (P,); support_x: (T, M, *img), support_y: (T, M) ints in [0, N) with every
        class present; query_x: (T, Q, *img), query_y: (T, Q)
        -> loss (float), grad (P,) fresh, accuracy (float, fraction of queries right).
        update_bn_stats: after the forward pass, fold this episode's batch statistics into the
        embedding's BN running statistics (bn mode 'batch' only), with this momentum."""
        self._check("MatchingNet.episode_loss_and_grad", params, support_x, support_y,
                    query_x, query_y, n_way)
        T, Q = query_y.shape
        logp, cache = self._forward(params, support_x, support_y, query_x, n_way)
        emb_cache, F, G, fce_cache, sim_cache, e, Z, en, Sn = cache
        loss = float(-np.take_along_axis(logp, query_y[..., None], axis=-1).mean())
        acc = float((logp.argmax(axis=-1) == query_y).mean())
        if update_bn_stats:
            self.model.update_running_stats(emb_cache, momentum)
        # dc = (a - b) / (T Q): a the softmax over supports, b the softmax within the class
        idx = query_y[..., None, None]                                 # (T, Q, 1, 1)
        ey = np.take_along_axis(en, idx, axis=2)[:, :, 0]              # (T, Q, M)
        Sy = np.take_along_axis(Sn, query_y[..., None], axis=-1)       # (T, Q, 1)
        dc = (e / Z - ey / Sy) / (T * Q)                               # (T, Q, M)
        grad = np.zeros(self.num_params, params.dtype)                 # (P,)
        dF, dG = self._similarity_backward(dc, F, G, sim_cache, grad)
        if self.fce:
            v = self.views(grad)
            bl_cache, att_cache = fce_cache
            dfp, dG_att, v["f_att.W"][...], v["f_att.b"][...] = \
                _attention_lstm_backward(dF, att_cache)
            dG = dG + dG_att                                           # (T, M, E)
            dGt = np.ascontiguousarray(dG.transpose(1, 0, 2))          # (M, T, E)
            dgp_l, v["g_fwd.W"][...], v["g_fwd.b"][...], v["g_bwd.W"][...], \
                v["g_bwd.b"][...] = ls.bilstm_backward(dGt, dGt, bl_cache)
            dgp = dG + dgp_l.transpose(1, 0, 2)                        # (T, M, E)
        else:
            dfp, dgp = dF, dG
        demb = np.concatenate([dgp, dfp], axis=1)                      # (T, M+Q, E)
        grad[:self.num_emb] = self.model.backward(demb, emb_cache, T).sum(axis=0)
        check_loss_grad("MatchingNet.episode_loss_and_grad", loss, grad)
        return loss, grad, acc

    def predict(self, params, support_x, support_y, query_x, n_way, bn="running"):
        """-> logp (T, Q, N) = log y_hat, pred (T, Q) int64 (argmax, first on ties).
        bn='running' (default): BN with the running statistics, queries independent;
        bn='batch': each task's own batch statistics (transductive). The model's BN modes
        are restored afterwards."""
        op = "MatchingNet.predict"
        if bn not in ("running", "batch"):
            raise ValueError(f"{op}: bn must be 'running' or 'batch', got {bn!r}")
        self._check(op, params, support_x, support_y, query_x, None, n_way)
        layers = [layer for _, layer in self.model.batchnorm_layers()]
        saved = [layer.mode for layer in layers]
        try:
            self.model.set_bn_mode(bn)
            logp, _ = self._forward(params, support_x, support_y, query_x, n_way)
        finally:
            for layer, mode in zip(layers, saved):
                layer.mode = mode
        return logp, logp.argmax(axis=-1)


# ------------------------------------------------------------------ attention LSTM (f)
def _softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _attention_lstm_forward(fp, G, W, b, K):
    """fp: (T, Q, E) query embeddings f', G: (T, M, E) support embeddings g, W: (3E, 4E),
    b: (4E,) -> F: (T, Q, E) = h_K, cache. Each of the T Q queries is one LSTM sequence."""
    T, Q, E = fp.shape
    h = np.zeros((T, Q, E), fp.dtype)                                  # (T, Q, E) h_0
    c = np.zeros((T * Q, E), fp.dtype)                                 # (T Q, E) c_0
    steps = []
    for _ in range(K):
        a = _softmax(np.matmul(h, G.transpose(0, 2, 1)))               # (T, Q, M)
        r = np.matmul(a, G)                                            # (T, Q, E)
        inp = np.concatenate([fp, r], axis=-1).reshape(T * Q, 2 * E)   # (T Q, 2E)
        hh, c, cell = ls.lstm_cell_forward(inp, h.reshape(T * Q, E), c, W, b)
        steps.append((h, a, cell))
        h = hh.reshape(T, Q, E) + fp                                   # (T, Q, E)
    return h, (G, steps)


def _attention_lstm_backward(dF, cache):
    """dF: (T, Q, E) -> dfp (T, Q, E), dG (T, M, E), dW (3E, 4E), db (4E,): fresh; the
    W, b and G contributions of the K steps are summed."""
    G, steps = cache
    T, Q, E = dF.shape
    dfp = np.zeros_like(dF)                                            # (T, Q, E)
    dG = np.zeros_like(G)                                              # (T, M, E)
    dW = db = None
    dh, dc = dF, None
    for h_prev, a, cell in reversed(steps):
        dfp += dh                                                      # h_k = h_hat_k + f'
        dinp, dhp, dc, dWk, dbk = ls.lstm_cell_backward(dh.reshape(T * Q, E), dc, cell)
        dW = dWk if dW is None else dW + dWk
        db = dbk if db is None else db + dbk
        dinp = dinp.reshape(T, Q, 2 * E)
        dfp += dinp[..., :E]
        dr = dinp[..., E:]                                             # (T, Q, E)
        dG += np.matmul(a.transpose(0, 2, 1), dr)                      # r = a G
        da = np.matmul(dr, G.transpose(0, 2, 1))                       # (T, Q, M)
        ds = a * (da - (a * da).sum(axis=-1, keepdims=True))           # softmax backward
        dG += np.matmul(ds.transpose(0, 2, 1), h_prev)                 # s = h G^T
        dh = dhp.reshape(T, Q, E) + np.matmul(ds, G)                   # (T, Q, E)
    return dfp, dG, dW, db


# ------------------------------------------------------------------ functional entry points
def episode_loss_and_grad(net, params, support_x, support_y, query_x, query_y, n_way,
                          update_bn_stats=False):
    """MatchingNet.episode_loss_and_grad as a function: -> loss, grad (P,), accuracy."""
    return net.episode_loss_and_grad(params, support_x, support_y, query_x, query_y, n_way,
                                     update_bn_stats)


def predict(net, params, support_x, support_y, query_x, n_way, bn="running"):
    """MatchingNet.predict as a function: -> logp (T, Q, N), pred (T, Q)."""
    return net.predict(params, support_x, support_y, query_x, n_way, bn)


__all__ = ["MatchingNet", "episode_loss_and_grad", "predict", "LSTM_BLOCKS", "SIMILARITIES"]
