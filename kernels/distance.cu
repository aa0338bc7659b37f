// Episodic distances and the ProtoNet loss: CUDA C source of the 'cupy' backend.
//
// Shape letters: T tasks, Q queries per task, N supports per task, D features.
// Same kernels, same order of every sum and same conventions as kernels/distance_cuda.py
// (read its docstring) and metacore.reference.distance. Every array is C-contiguous; the
// wrapper kernels/distance_cupy.py checks dtype, shape and contiguity and casts each scalar,
// because a raw kernel checks nothing. Each entry point is extern "C" (one per dtype, suffix
// _f32 / _f64) and guards its bounds.

#ifndef TILE
#define TILE 16            // outputs per block side; blocks are TILE x TILE threads
#endif
#define PAD (TILE + 1)     // shared rows padded by one: column reads hit distinct banks

typedef long long i64;

// out[t,i,j] = sum_k term(q[t,i,k], s[t,j,k]), term = (q-s)^2 (mode 0), |q-s| (1), q*s (2).
// Grid (ceil(N/TILE), ceil(Q/TILE), T), block (TILE, TILE): thread (x, y) owns
// out[t, i0 + y, j0 + x]. q and s stream through shared memory TILE features at a time.
template <typename F>
__device__ void pair_fwd(const F* q, const F* s, int Q, int N, int D, int mode, F* out) {
    __shared__ F qs[TILE][PAD];
    __shared__ F ss[TILE][PAD];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const i64 t = blockIdx.z;
    const int i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE;
    const F* qt = q + t * Q * D;
    const F* st = s + t * N * D;
    F acc = 0;
    for (int k0 = 0; k0 < D; k0 += TILE) {
        const int kk = k0 + tx;
        qs[ty][tx] = (i0 + ty < Q && kk < D) ? qt[(i64)(i0 + ty) * D + kk] : F(0);
        ss[ty][tx] = (j0 + ty < N && kk < D) ? st[(i64)(j0 + ty) * D + kk] : F(0);
        __syncthreads();
        const int nk = min(TILE, D - k0);
        for (int k = 0; k < nk; ++k) {
            const F a = qs[ty][k], v = ss[tx][k];
            if (mode == 0) { const F d = a - v; acc += d * d; }
            else if (mode == 1) { acc += fabs(a - v); }
            else { acc += a * v; }
        }
        __syncthreads();
    }
    const int i = i0 + ty, j = j0 + tx;
    if (i < Q && j < N) out[(t * Q + i) * N + j] = acc;
}

// out[t,i,k] = sum_j G[t,i,j] f(a[t,i,k], b[t,j,k]), f = a-b (mode 0, then doubled),
// sign(a-b) with sign(0) = 0 (1), b (2); G = g: (T, A, B) (gtrans 0) or G[t,i,j] = g[t,j,i]
// with g: (T, B, A) (gtrans 1). Grid (ceil(D/TILE), ceil(A/TILE), T), block (TILE, TILE):
// thread (x, y) owns out[t, i0 + y, k0 + x].
template <typename F>
__device__ void pair_grad(const F* g, int gtrans, const F* a, const F* b, int A, int B, int D,
                          int mode, F* out) {
    __shared__ F gs[TILE][PAD];   // G[t, i0 + y, j0 + x]
    __shared__ F bs[TILE][PAD];   // b[t, j0 + y, k0 + x]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const i64 t = blockIdx.z;
    const int i0 = blockIdx.y * TILE, k0 = blockIdx.x * TILE;
    const int i = i0 + ty, k = k0 + tx;
    const F* gt = g + t * A * B;
    const F* at = a + t * A * D;
    const F* bt = b + t * B * D;
    const bool inside = i < A && k < D;
    const F av = inside ? at[(i64)i * D + k] : F(0);
    F acc = 0;
    for (int j0 = 0; j0 < B; j0 += TILE) {
        if (gtrans == 0) {
            const int ii = i0 + ty, jj = j0 + tx;
            gs[ty][tx] = (ii < A && jj < B) ? gt[(i64)ii * B + jj] : F(0);
        } else {   // read g[t, j, i] along i (coalesced), store it as G[i, j]
            const int jj = j0 + ty, ii = i0 + tx;
            gs[tx][ty] = (ii < A && jj < B) ? gt[(i64)jj * A + ii] : F(0);
        }
        const int jb = j0 + ty;
        bs[ty][tx] = (jb < B && k < D) ? bt[(i64)jb * D + k] : F(0);
        __syncthreads();
        const int nj = min(TILE, B - j0);
        for (int j = 0; j < nj; ++j) {
            const F v = bs[j][tx];
            F f;
            if (mode == 0) f = av - v;
            else if (mode == 1) { const F d = av - v; f = d > 0 ? F(1) : (d < 0 ? F(-1) : F(0)); }
            else f = v;
            acc += gs[ty][j] * f;
        }
        __syncthreads();
    }
    if (inside) {
        if (mode == 0) acc += acc;   // the factor 2, exact
        out[(t * A + i) * D + k] = acc;
    }
}

// x: (T, M, D) -> norm: (T, M) = max(|x|, eps), on: (T, M) = 1 if |x| > eps else 0.
template <typename F>
__device__ void row_norms(const F* x, i64 TM, int D, F eps, F* norm, F* on) {
    const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= TM) return;
    F acc = 0;
    for (int k = 0; k < D; ++k) acc += x[p * D + k] * x[p * D + k];
    const F n = sqrt(acc);
    norm[p] = n > eps ? n : eps;
    on[p] = n > eps ? F(1) : F(0);
}

// c: (T, Q, N) /= qn[t, i] sn[t, j], in place.
template <typename F>
__device__ void cos_div(F* c, int T, int Q, int N, const F* qn, const F* sn) {
    const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= (i64)T * Q * N) return;
    const i64 t = p / ((i64)Q * N);
    const i64 r = p - t * Q * N;
    const i64 i = r / N, j = r - i * N;
    c[p] /= qn[t * Q + i] * sn[t * N + j];
}

// g, c: (T, Q, N) -> gi = g / (qn sn), gc = g c, overwritten.
template <typename F>
__device__ void cos_prep(const F* g, const F* c, int T, int Q, int N, const F* qn,
                         const F* sn, F* gi, F* gc) {
    const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= (i64)T * Q * N) return;
    const i64 t = p / ((i64)Q * N);
    const i64 r = p - t * Q * N;
    const i64 i = r / N, j = r - i * N;
    const F gv = g[p];
    gi[p] = gv / (qn[t * Q + i] * sn[t * N + j]);
    gc[p] = gv * c[p];
}

// dx[t,m,:] -= (sum_j G[t,m,j]) on[t,m] / n[t,m]^2 x[t,m,:]; G = gc: (T, M, P) (gtrans 0)
// or G[t,m,j] = gc[t,j,m] with gc: (T, P, M) (gtrans 1). x, dx: (T, M, D); in place.
template <typename F>
__device__ void cos_fix(const F* gc, int gtrans, int T, int M, int P, int D, const F* on,
                        const F* n, const F* x, F* dx) {
    const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= (i64)T * M) return;
    const i64 t = p / M, m = p - t * M;
    F acc = 0;
    if (gtrans == 0) for (int j = 0; j < P; ++j) acc += gc[(t * M + m) * P + j];
    else for (int j = 0; j < P; ++j) acc += gc[(t * P + j) * M + m];
    const F f = acc * on[p] / (n[p] * n[p]);
    for (int k = 0; k < D; ++k) dx[p * D + k] -= f * x[p * D + k];
}

// One thread per query row: d: (T, Q, N), ss = sign * scale, y: (T, Q), gloss: (T,) ->
// loss_rows: (T, Q), dlogits = ss w (softmax - onehot(y)) with w = gloss / Q, pred: (T, Q)
// first argmax; a label outside [0, N) gives NaN and pred -1 (the host checks; a guard).
template <typename F>
__device__ void softmax_ce(const F* d, int T, int Q, int N, F ss, const i64* y,
                           const F* gloss, F* loss_rows, F* dlogits, i64* pred) {
    const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= (i64)T * Q) return;
    const i64 t = p / Q;
    const F* row = d + p * N;
    F* drow = dlogits + p * N;
    const i64 yi = y[p];
    if (yi < 0 || yi >= N) {
        const F nan = F(0) / F(0);
        loss_rows[p] = nan;
        for (int j = 0; j < N; ++j) drow[j] = nan;
        pred[p] = -1;
        return;
    }
    F m = row[0] * ss;
    int am = 0;
    for (int j = 1; j < N; ++j) {
        const F v = row[j] * ss;
        if (v > m) { m = v; am = j; }
    }
    F z = 0;
    for (int j = 0; j < N; ++j) z += exp(row[j] * ss - m);
    const F lz = log(z);
    loss_rows[p] = lz + m - row[yi] * ss;
    const F wt = gloss[t] / F(Q);
    for (int j = 0; j < N; ++j) {
        F v = wt * exp(row[j] * ss - m - lz);
        if (j == yi) v -= wt;
        drow[j] = v * ss;
    }
    pred[p] = am;
}

// rows: (T, Q) -> out: (T,) = sum_i rows[t, i] / Q (in order).
template <typename F>
__device__ void row_mean(const F* rows, int T, int Q, F* out) {
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    F acc = 0;
    for (int i = 0; i < Q; ++i) acc += rows[t * Q + i];
    out[t] = acc / F(Q);
}

#define INSTANTIATE(F, S)                                                                   \
extern "C" __global__ void pair_fwd_##S(const F* q, const F* s, int Q, int N, int D,       \
                                        int mode, F* out) {                                 \
    pair_fwd<F>(q, s, Q, N, D, mode, out); }                                                \
extern "C" __global__ void pair_grad_##S(const F* g, int gtrans, const F* a, const F* b,   \
                                         int A, int B, int D, int mode, F* out) {           \
    pair_grad<F>(g, gtrans, a, b, A, B, D, mode, out); }                                    \
extern "C" __global__ void row_norms_##S(const F* x, i64 TM, int D, F eps, F* norm,        \
                                         F* on) {                                           \
    row_norms<F>(x, TM, D, eps, norm, on); }                                                \
extern "C" __global__ void cos_div_##S(F* c, int T, int Q, int N, const F* qn,             \
                                       const F* sn) {                                       \
    cos_div<F>(c, T, Q, N, qn, sn); }                                                       \
extern "C" __global__ void cos_prep_##S(const F* g, const F* c, int T, int Q, int N,       \
                                        const F* qn, const F* sn, F* gi, F* gc) {           \
    cos_prep<F>(g, c, T, Q, N, qn, sn, gi, gc); }                                           \
extern "C" __global__ void cos_fix_##S(const F* gc, int gtrans, int T, int M, int P,       \
                                       int D, const F* on, const F* n, const F* x, F* dx) { \
    cos_fix<F>(gc, gtrans, T, M, P, D, on, n, x, dx); }                                     \
extern "C" __global__ void softmax_ce_##S(const F* d, int T, int Q, int N, F ss,           \
                                          const i64* y, const F* gloss, F* loss_rows,       \
                                          F* dlogits, i64* pred) {                          \
    softmax_ce<F>(d, T, Q, N, ss, y, gloss, loss_rows, dlogits, pred); }                    \
extern "C" __global__ void row_mean_##S(const F* rows, int T, int Q, F* out) {             \
    row_mean<F>(rows, T, Q, out); }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
