// LRUA memory of MANN (Santoro et al. 2016): CUDA C source of the 'cupy' backend.
//
// Shape letters: T time steps, B episodes, H heads (n = H reads), S slots, W slot width.
// The same kernels, phases and order of every sum as kernels/lrua_cuda.py (read its
// docstring): one thread block per episode, the time loop inside the episode kernels, each
// phase of a step a block-strided loop over its independent outputs, phases separated by
// __syncthreads; one step's forward (fwd_step) and reverse (bwd_step) shared by the episode
// kernels and the step kernels (lrua_step_forward, lrua_step_backward). Every array is
// C-contiguous; kernels/lrua_cupy.py checks dtypes, shapes and contiguity and casts every
// scalar. Entry points are extern "C", suffix _f32 / _f64; each returns for a block index
// past B (the bounds guard; the per-thread loops are bounded by their own extents).

typedef long long i64;

// g: (T, B, H) = sigmoid(alpha) = (1 + tanh(alpha / 2)) / 2; alpha: (H,) (per_step 0) or
// (T, B, H) (per_step 1).
template <typename F>
__device__ void gates(const F* alpha, int per_step, int T, int B, int H, F* g) {
    const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= (i64)T * B * H) return;
    const F a = per_step ? alpha[p] : alpha[p % H];
    g[p] = F(0.5) * (F(1) + tanh(F(0.5) * a));
}

// The least-used counts of slot i: *below = #{j : wu(j) < wu(i)} ("shared": slot i is marked
// iff below < n, i.e. wu(i) <= m(wu, n)), *rank = its position in the order of (wu(j), j),
// the reference's stable sort ("per_head": head h takes the slot of rank h).
template <typename F>
__device__ void lu_rank(const F* wu, int S, int i, int* below, int* rank) {
    int bl = 0, rk = 0;
    const F v = wu[i];
    for (int j = 0; j < S; ++j) {
        if (wu[j] < v) { ++bl; ++rk; }
        else if (wu[j] == v && j < i) ++rk;
    }
    *below = bl;
    *rank = rk;
}

// One step of one episode by the whole block (steps 0-7 of metacore.reference.lrua),
// shared by `forward` (every step of an episode) and `step_forward` / `step_backward` (one
// step), so that the chained step pair runs the very code of the whole episode.
// k: (H, W) k_t, gr: (H,) gates, Mp: (S, W) M_{t-1}, wr_prev: (H, S), wu_prev: (S,),
// per_head: the write rule (1 "per_head", 0 "shared")
// -> M: (S, W) M_t (must not alias Mp), wlu: (H, S) w_lu_{t-1}, one row per head,
// *zout: the zeroed slot,
// ww, wr: (H, S) w_w_t, w_r_t, read: (H, W) r_t, wu: (S,) w_u_t, all overwritten;
// scratch kn: (H,), mn: (S,), c: (H, S). Returns the zeroed slot to every thread and ends
// with a __syncthreads, so every output is visible to the whole block.
template <typename F>
__device__ int fwd_step(const F* k, const F* gr, const F* Mp, F* M, const F* wr_prev,
                        const F* wu_prev, F gamma, F eps, int per_head, int H, int S, int W,
                        F* wlu, i64* zout, F* ww, F* wr, F* read, F* wu, F* kn, F* mn, F* c) {
    const int tid = threadIdx.x, nt = blockDim.x;
    __shared__ int zsh;
    // 1. least-used weights of every head (counting, no sort)
    for (int i = tid; i < S; i += nt) {
        int below, rank;
        lu_rank<F>(wu_prev, S, i, &below, &rank);
        for (int h = 0; h < H; ++h)
            wlu[h * S + i] = (per_head ? rank == h : below < H) ? F(1) : F(0);
    }
    // 3. the slot to zero: first argmin
    if (tid == 0) {
        int z = 0;
        for (int i = 1; i < S; ++i) if (wu_prev[i] < wu_prev[z]) z = i;
        zsh = z;
        *zout = z;
    }
    __syncthreads();
    const int z = zsh;
    // 2. write weights
    for (int p = tid; p < H * S; p += nt) {
        const int h = p / S, i = p - h * S;
        const F gh = gr[h];
        ww[p] = gh * wr_prev[p] + (F(1) - gh) * wlu[p];
    }
    __syncthreads();
    // 3-4. zero slot z, then write every head's key (sum over h in order)
    for (int p = tid; p < S * W; p += nt) {
        const int i = p / W, x = p - i * W;
        F v = i == z ? F(0) : Mp[p];
        for (int h = 0; h < H; ++h) v += ww[h * S + i] * k[h * W + x];
        M[p] = v;
    }
    __syncthreads();
    // 5. clamped norms, cosines, softmax over slots
    for (int h = tid; h < H; h += nt) {
        F acc = 0;
        for (int x = 0; x < W; ++x) acc += k[h * W + x] * k[h * W + x];
        kn[h] = max(sqrt(acc), eps);
    }
    for (int i = tid; i < S; i += nt) {
        F acc = 0;
        for (int x = 0; x < W; ++x) acc += M[i * W + x] * M[i * W + x];
        mn[i] = max(sqrt(acc), eps);
    }
    __syncthreads();
    for (int p = tid; p < H * S; p += nt) {
        const int h = p / S, i = p - h * S;
        F acc = 0;
        for (int x = 0; x < W; ++x) acc += k[h * W + x] * M[i * W + x];
        c[p] = acc / (kn[h] * mn[i]);
    }
    __syncthreads();
    for (int h = tid; h < H; h += nt) {
        F cmax = c[h * S];
        for (int i = 1; i < S; ++i) cmax = max(cmax, c[h * S + i]);
        F tot = 0;
        for (int i = 0; i < S; ++i) {
            const F e = exp(c[h * S + i] - cmax);
            wr[h * S + i] = e;
            tot += e;
        }
        for (int i = 0; i < S; ++i) wr[h * S + i] /= tot;
    }
    __syncthreads();
    // 6. reads; 7. usage
    for (int p = tid; p < H * W; p += nt) {
        const int h = p / W, x = p - h * W;
        F acc = 0;
        for (int i = 0; i < S; ++i) acc += wr[h * S + i] * M[i * W + x];
        read[p] = acc;
    }
    for (int i = tid; i < S; i += nt) {
        F sr = 0, sw = 0;
        for (int h = 0; h < H; ++h) { sr += wr[h * S + i]; sw += ww[h * S + i]; }
        wu[i] = gamma * wu_prev[i] + sr + sw;
    }
    __syncthreads();
    return z;
}

// Reverse of one step of one episode by the whole block (formulas: metacore.reference.
// lrua.lrua_backward), shared by `backward` and `step_backward`.
// dr: (H, W) dL/dr_t, k: (H, W), gr: (H,), M: (S, W) M_t, wr, ww: (H, S) w_r_t, w_w_t,
// wr_prev: (H, S) w_r_{t-1}, wlu: (H, S) w_lu_{t-1}, z: the zeroed slot;
// dM: (S, W) dL/dM_t in, dL/dM_{t-1} out; dwr: (H, S) dL/dw_r_t in, dL/dw_r_{t-1} out;
// dk: (H, W) dL/dk_t, da: (H,) dL/dalpha_t (per-step gate), overwritten; scratch dc, gi:
// (H, S), kn, kon, sk: (H,), mn, mon, sm: (S,). The caller synchronises after writing dM
// and dwr; this ends with a __syncthreads.
template <typename F>
__device__ void bwd_step(const F* dr, const F* k, const F* gr, const F* M, const F* wr,
                         const F* ww, const F* wr_prev, const F* wlu, i64 z, F eps, int H,
                         int S, int W, F* dM, F* dwr, F* dk, F* da, F* dc, F* gi, F* kn,
                         F* kon, F* sk, F* mn, F* mon, F* sm) {
    const int tid = threadIdx.x, nt = blockDim.x;
    // read r = w_r M; and the clamped norms
    for (int p = tid; p < H * S; p += nt) {
        const int h = p / S, i = p - h * S;
        F acc = dwr[p];
        for (int x = 0; x < W; ++x) acc += dr[h * W + x] * M[i * W + x];
        dwr[p] = acc;
    }
    for (int p = tid; p < S * W; p += nt) {
        const int i = p / W, x = p - i * W;
        F acc = dM[p];
        for (int h = 0; h < H; ++h) acc += wr[h * S + i] * dr[h * W + x];
        dM[p] = acc;
    }
    for (int h = tid; h < H; h += nt) {
        F acc = 0;
        for (int x = 0; x < W; ++x) acc += k[h * W + x] * k[h * W + x];
        const F nrm = sqrt(acc);
        kn[h] = max(nrm, eps);
        kon[h] = nrm > eps ? F(1) : F(0);
    }
    for (int i = tid; i < S; i += nt) {
        F acc = 0;
        for (int x = 0; x < W; ++x) acc += M[i * W + x] * M[i * W + x];
        const F nrm = sqrt(acc);
        mn[i] = max(nrm, eps);
        mon[i] = nrm > eps ? F(1) : F(0);
    }
    __syncthreads();
    // softmax over slots: dc = w_r (dwr - sum_j w_r dwr); sk holds the inner sums
    for (int h = tid; h < H; h += nt) {
        F acc = 0;
        for (int i = 0; i < S; ++i) acc += wr[h * S + i] * dwr[h * S + i];
        sk[h] = acc;
    }
    __syncthreads();
    // cosine: c, gi = dc / (a_h b_i), and dc c (kept in dc)
    for (int p = tid; p < H * S; p += nt) {
        const int h = p / S, i = p - h * S;
        const F d = wr[p] * (dwr[p] - sk[h]);
        F acc = 0;
        for (int x = 0; x < W; ++x) acc += k[h * W + x] * M[i * W + x];
        const F inv = F(1) / (kn[h] * mn[i]);
        const F cv = acc * inv;
        gi[p] = d * inv;
        dc[p] = d * cv;
    }
    __syncthreads();
    for (int h = tid; h < H; h += nt) {
        F acc = 0;
        for (int i = 0; i < S; ++i) acc += dc[h * S + i];
        sk[h] = acc * kon[h] / (kn[h] * kn[h]);
    }
    for (int i = tid; i < S; i += nt) {
        F acc = 0;
        for (int h = 0; h < H; ++h) acc += dc[h * S + i];
        sm[i] = acc * mon[i] / (mn[i] * mn[i]);
    }
    __syncthreads();
    for (int p = tid; p < H * W; p += nt) {
        const int h = p / W, x = p - h * W;
        F acc = -sk[h] * k[p];
        for (int i = 0; i < S; ++i) acc += gi[h * S + i] * M[i * W + x];
        dk[p] = acc;
    }
    for (int p = tid; p < S * W; p += nt) {
        const int i = p / W, x = p - i * W;
        F acc = dM[p] - sm[i] * M[p];
        for (int h = 0; h < H; ++h) acc += gi[h * S + i] * k[h * W + x];
        dM[p] = acc;
    }
    __syncthreads();
    // write M_t = M' + w_w^T k: key gradient, write-weight gradient (into dwr)
    for (int p = tid; p < H * W; p += nt) {
        const int h = p / W, x = p - h * W;
        F acc = dk[p];
        for (int i = 0; i < S; ++i) acc += ww[h * S + i] * dM[i * W + x];
        dk[p] = acc;
    }
    for (int p = tid; p < H * S; p += nt) {
        const int h = p / S, i = p - h * S;
        F acc = 0;
        for (int x = 0; x < W; ++x) acc += k[h * W + x] * dM[i * W + x];
        dwr[p] = acc;
    }
    __syncthreads();
    // zeroing of the least-used slot; gate w_w = g w_r_{t-1} + (1 - g) w_lu_{t-1}
    for (int x = tid; x < W; x += nt) dM[z * W + x] = 0;
    for (int h = tid; h < H; h += nt) {
        const F gh = gr[h];
        F acc = 0;
        for (int i = 0; i < S; ++i) {
            acc += dwr[h * S + i] * (wr_prev[h * S + i] - wlu[h * S + i]);
            dwr[h * S + i] *= gh;
        }
        da[h] = gh * (F(1) - gh) * acc;
    }
    __syncthreads();
}

// Block b runs episode b over T steps (fwd_step for each).
// keys: (T, B, H, W), g: (T, B, H), memory0: (B, S, W), read0: (B, H, S), usage0: (B, S)
// -> reads: (T, B, H, W), w_r, w_w: (T, B, H, S), w_u, w_lu: (T, B, S), Ms: (B, K, S, W)
// (M_0 at 0, the memory after step t = 0..T-1 at (t + 1) % K), wlu_prev: (B, T, H, S),
// zs: (B, T), memory: (B, S, W) the last memory; scratch kn: (B, H), mn: (B, S), c: (B, H, S).
template <typename F>
__device__ void forward(const F* keys, const F* g, const F* memory0, const F* read0,
                        const F* usage0, F gamma, F eps, int per_head, int T, int B, int H,
                        int S, int W, int K, F* reads, F* w_r, F* w_w, F* w_u, F* w_lu, F* Ms,
                        F* wlu_prev, i64* zs, F* memory, F* kn_, F* mn_, F* c_) {
    const i64 b = blockIdx.x;
    if (b >= B) return;
    const int tid = threadIdx.x, nt = blockDim.x;
    const i64 SW = (i64)S * W, HS = (i64)H * S, HW = (i64)H * W;
    F* Mb = Ms + b * K * SW;
    for (i64 p = tid; p < SW; p += nt) Mb[p] = memory0[b * SW + p];
    __syncthreads();
    for (int t = 0; t < T; ++t) {
        const i64 tb = (i64)t * B + b;
        const F* wr_prev = t == 0 ? read0 + b * HS : w_r + (tb - B) * HS;   // (H, S)
        const F* wu_prev = t == 0 ? usage0 + b * S : w_u + (tb - B) * S;    // (S,)
        F* wu = w_u + tb * S;                                               // (S,)
        fwd_step<F>(keys + tb * HW, g + tb * H, Mb + (t % K) * SW, Mb + ((t + 1) % K) * SW,
                    wr_prev, wu_prev, gamma, eps, per_head, H, S, W,
                    wlu_prev + (b * T + t) * HS,
                    zs + b * T + t, w_w + tb * HS, w_r + tb * HS, reads + tb * HW, wu,
                    kn_ + b * H, mn_ + b * S, c_ + b * HS);
        // the least-used slots of the new usage, the union over heads (returned; step
        // t + 1 recomputes them)
        for (int i = tid; i < S; i += nt) {
            int below, rank;
            lu_rank<F>(wu, S, i, &below, &rank);
            w_lu[tb * S + i] = (per_head ? rank : below) < H ? F(1) : F(0);
        }
        __syncthreads();
    }
    const F* MT = Mb + (T % K) * SW;
    for (i64 p = tid; p < SW; p += nt) memory[b * SW + p] = MT[p];
}

// Block b runs the reverse sweep of episode b (bwd_step for each step, last to first).
// Ms: (B, T + 1, S, W) with M_t at index t; dkeys: (T, B, H, W), dalpha: (T, B, H),
// dmemory0: (B, S, W), dread0: (B, H, S) overwritten; scratch dM: (B, S, W),
// dwr, dc, gi: (B, H, S), kn, kon, sk: (B, H), mn, mon, sm: (B, S).
template <typename F>
__device__ void backward(const F* dreads, const F* keys, const F* g, const F* read0,
                         const F* w_r, const F* w_w, const F* Ms, const F* wlu_prev,
                         const i64* zs, F eps, int T, int B, int H, int S, int W,
                         F* dkeys, F* dalpha, F* dmemory0, F* dread0, F* dM_, F* dwr_,
                         F* dc_, F* gi_, F* kn_, F* kon_, F* sk_, F* mn_, F* mon_, F* sm_) {
    const i64 b = blockIdx.x;
    if (b >= B) return;
    const int tid = threadIdx.x, nt = blockDim.x;
    const i64 SW = (i64)S * W, HS = (i64)H * S, HW = (i64)H * W;
    F* dM = dM_ + b * SW;
    F* dwr = dwr_ + b * HS;
    for (i64 p = tid; p < SW; p += nt) dM[p] = 0;
    for (i64 p = tid; p < HS; p += nt) dwr[p] = 0;
    __syncthreads();
    for (int t = T - 1; t >= 0; --t) {
        const i64 tb = (i64)t * B + b;
        const F* wr_prev = t == 0 ? read0 + b * HS : w_r + (tb - B) * HS;   // (H, S)
        bwd_step<F>(dreads + tb * HW, keys + tb * HW, g + tb * H,
                    Ms + (b * (T + 1) + t + 1) * SW, w_r + tb * HS, w_w + tb * HS, wr_prev,
                    wlu_prev + (b * T + t) * HS, zs[b * T + t], eps, H, S, W, dM, dwr,
                    dkeys + tb * HW, dalpha + tb * H, dc_ + b * HS, gi_ + b * HS,
                    kn_ + b * H, kon_ + b * H, sk_ + b * H, mn_ + b * S, mon_ + b * S,
                    sm_ + b * S);
    }
    for (i64 p = tid; p < SW; p += nt) dmemory0[b * SW + p] = dM[p];
    for (i64 p = tid; p < HS; p += nt) dread0[b * HS + p] = dwr[p];
}

// Block b runs one step of episode b (fwd_step). key: (B, H, W), g: (B, H),
// memory_prev: (B, S, W), w_r_prev: (B, H, S), w_u_prev: (B, S) -> read: (B, H, W),
// memory: (B, S, W), w_r, w_w: (B, H, S), w_u: (B, S); scratch wlu: (B, H, S), zs: (B,),
// kn: (B, H), mn: (B, S), c: (B, H, S).
template <typename F>
__device__ void step_forward(const F* key, const F* g, const F* memory_prev,
                             const F* w_r_prev, const F* w_u_prev, F gamma, F eps,
                             int per_head, int B, int H, int S, int W, F* read, F* memory,
                             F* w_r, F* w_w, F* w_u,
                             F* wlu, i64* zs, F* kn, F* mn, F* c) {
    const i64 b = blockIdx.x;
    if (b >= B) return;
    const i64 SW = (i64)S * W, HS = (i64)H * S, HW = (i64)H * W;
    fwd_step<F>(key + b * HW, g + b * H, memory_prev + b * SW, memory + b * SW,
                w_r_prev + b * HS, w_u_prev + b * S, gamma, eps, per_head, H, S, W, wlu + b * HS,
                zs + b,
                w_w + b * HS, w_r + b * HS, read + b * HW, w_u + b * S, kn + b * H,
                mn + b * S, c + b * HS);
}

// Block b reruns one step of episode b (fwd_step), then its reverse (bwd_step) from
// dread, dmemory, dw_r -> dkey: (B, H, W), dalpha: (B, H), dmemory_prev: (B, S, W),
// dw_r_prev: (B, H, S) overwritten (the last two are bwd_step's running dM and dwr).
// Scratch M: (B, S, W) M_t, wr, ww, dc, gi, wlu: (B, H, S), wu, mn, mon, sm: (B, S),
// zs: (B,), kn, kon, sk: (B, H). The forward's read goes to dkey (overwritten by bwd_step)
// and its cosines to dc (bwd_step's scratch).
template <typename F>
__device__ void step_backward(const F* dread, const F* dmemory, const F* dw_r, const F* key,
                              const F* g, const F* memory_prev, const F* w_r_prev,
                              const F* w_u_prev, F gamma, F eps, int per_head, int B, int H,
                              int S, int W, F* dkey, F* dalpha, F* dmemory_prev, F* dw_r_prev, F* M,
                              F* wr, F* ww, F* wu, F* wlu, i64* zs, F* dc, F* gi, F* kn,
                              F* kon, F* sk, F* mn, F* mon, F* sm) {
    const i64 b = blockIdx.x;
    if (b >= B) return;
    const int tid = threadIdx.x, nt = blockDim.x;
    const i64 SW = (i64)S * W, HS = (i64)H * S, HW = (i64)H * W;
    F* dM = dmemory_prev + b * SW;
    F* dwr = dw_r_prev + b * HS;
    for (i64 p = tid; p < SW; p += nt) dM[p] = dmemory[b * SW + p];
    for (i64 p = tid; p < HS; p += nt) dwr[p] = dw_r[b * HS + p];
    const int z = fwd_step<F>(key + b * HW, g + b * H, memory_prev + b * SW, M + b * SW,
                              w_r_prev + b * HS, w_u_prev + b * S, gamma, eps, per_head,
                              H, S, W, wlu + b * HS, zs + b, ww + b * HS, wr + b * HS,
                              dkey + b * HW,
                              wu + b * S, kn + b * H, mn + b * S, dc + b * HS);
    bwd_step<F>(dread + b * HW, key + b * HW, g + b * H, M + b * SW, wr + b * HS, ww + b * HS,
                w_r_prev + b * HS, wlu + b * HS, z, eps, H, S, W, dM, dwr, dkey + b * HW,
                dalpha + b * H, dc + b * HS, gi + b * HS, kn + b * H, kon + b * H,
                sk + b * H, mn + b * S, mon + b * S, sm + b * S);
}

// dalpha: (T, B, H) -> out: (H,) = sum over t then b, in order.
template <typename F>
__device__ void sum_tb(const F* dalpha, int T, int B, int H, F* out) {
    const int h = blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= H) return;
    F acc = 0;
    for (int t = 0; t < T; ++t)
        for (int b = 0; b < B; ++b) acc += dalpha[((i64)t * B + b) * H + h];
    out[h] = acc;
}

#define INSTANTIATE(F, S)                                                                   \
extern "C" __global__ void lrua_gates_##S(const F* alpha, int per_step, int T, int B,       \
                                          int H, F* g) {                                    \
    gates<F>(alpha, per_step, T, B, H, g); }                                                \
extern "C" __global__ void lrua_forward_##S(                                                \
        const F* keys, const F* g, const F* memory0, const F* read0, const F* usage0,       \
        F gamma, F eps, int per_head, int T, int B, int H, int S_, int W, int K, F* reads,  \
        F* w_r, F* w_w, F* w_u, F* w_lu, F* Ms, F* wlu_prev, i64* zs, F* memory, F* kn,     \
        F* mn, F* c) {                                                                      \
    forward<F>(keys, g, memory0, read0, usage0, gamma, eps, per_head, T, B, H, S_, W, K,    \
               reads, w_r, w_w, w_u, w_lu, Ms, wlu_prev, zs, memory, kn, mn, c); }          \
extern "C" __global__ void lrua_backward_##S(                                               \
        const F* dreads, const F* keys, const F* g, const F* read0, const F* w_r,           \
        const F* w_w, const F* Ms, const F* wlu_prev, const i64* zs, F eps, int T, int B,   \
        int H, int S_, int W, F* dkeys, F* dalpha, F* dmemory0, F* dread0, F* dM, F* dwr,   \
        F* dc, F* gi, F* kn, F* kon, F* sk, F* mn, F* mon, F* sm) {                         \
    backward<F>(dreads, keys, g, read0, w_r, w_w, Ms, wlu_prev, zs, eps, T, B, H, S_, W,    \
                dkeys, dalpha, dmemory0, dread0, dM, dwr, dc, gi, kn, kon, sk, mn, mon,     \
                sm); }                                                                      \
extern "C" __global__ void lrua_sum_tb_##S(const F* dalpha, int T, int B, int H, F* out) {  \
    sum_tb<F>(dalpha, T, B, H, out); }                                                      \
extern "C" __global__ void lrua_step_forward_##S(                                           \
        const F* key, const F* g, const F* memory_prev, const F* w_r_prev,                  \
        const F* w_u_prev, F gamma, F eps, int per_head, int B, int H, int S_, int W,       \
        F* read, F* memory, F* w_r, F* w_w, F* w_u, F* wlu, i64* zs, F* kn, F* mn, F* c) {  \
    step_forward<F>(key, g, memory_prev, w_r_prev, w_u_prev, gamma, eps, per_head, B, H,    \
                    S_, W, read, memory, w_r, w_w, w_u, wlu, zs, kn, mn, c); }              \
extern "C" __global__ void lrua_step_backward_##S(                                          \
        const F* dread, const F* dmemory, const F* dw_r, const F* key, const F* g,          \
        const F* memory_prev, const F* w_r_prev, const F* w_u_prev, F gamma, F eps,         \
        int per_head, int B, int H, int S_, int W, F* dkey, F* dalpha, F* dmemory_prev,     \
        F* dw_r_prev, F* M, F* wr, F* ww, F* wu, F* wlu, i64* zs, F* dc, F* gi, F* kn,      \
        F* kon, F* sk, F* mn, F* mon, F* sm) {                                              \
    step_backward<F>(dread, dmemory, dw_r, key, g, memory_prev, w_r_prev, w_u_prev, gamma,  \
                     eps, per_head, B, H, S_, W, dkey, dalpha, dmemory_prev, dw_r_prev, M,  \
                     wr, ww, wu, wlu, zs, dc, gi, kn, kon, sk, mn, mon, sm); }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
