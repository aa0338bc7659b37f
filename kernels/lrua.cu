// LRUA memory of MANN (Santoro et al. 2016): CUDA C source of the 'cupy' backend.
//
// Shape letters: T time steps, B episodes, H heads (n = H reads), S slots, W slot width.
// The same kernels, phases and order of every sum as kernels/lrua_cuda.py (read its
// docstring): one thread block per episode, the time loop inside the kernel, each phase of
// a step a block-strided loop over its independent outputs, phases separated by
// __syncthreads. Every array is C-contiguous; kernels/lrua_cupy.py checks dtypes, shapes
// and contiguity and casts every scalar. Entry points are extern "C", suffix _f32 / _f64.

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

// Block b runs episode b over T steps (steps 1-7 of metacore.reference.lrua).
// keys: (T, B, H, W), g: (T, B, H), memory0: (B, S, W), read0: (B, H, S), usage0: (B, S)
// -> reads: (T, B, H, W), w_r, w_w: (T, B, H, S), w_u, w_lu: (T, B, S), Ms: (B, K, S, W)
// (M_0 at 0, the memory after step t = 0..T-1 at (t + 1) % K), wlu_prev: (B, T, S),
// zs: (B, T), memory: (B, S, W) the last memory; scratch kn: (B, H), mn: (B, S), c: (B, H, S).
template <typename F>
__device__ void forward(const F* keys, const F* g, const F* memory0, const F* read0,
                        const F* usage0, F gamma, F eps, int T, int B, int H, int S, int W,
                        int K, F* reads, F* w_r, F* w_w, F* w_u, F* w_lu, F* Ms,
                        F* wlu_prev, i64* zs, F* memory, F* kn_, F* mn_, F* c_) {
    const i64 b = blockIdx.x;
    const int tid = threadIdx.x, nt = blockDim.x;
    __shared__ int zsh;
    const i64 SW = (i64)S * W, HS = (i64)H * S, HW = (i64)H * W;
    F* Mb = Ms + b * K * SW;
    F* kn = kn_ + b * H;
    F* mn = mn_ + b * S;
    F* c = c_ + b * HS;
    for (i64 p = tid; p < SW; p += nt) Mb[p] = memory0[b * SW + p];
    __syncthreads();
    for (int t = 0; t < T; ++t) {
        const F* Mp = Mb + (t % K) * SW;                          // M_{t-1}: (S, W)
        F* M = Mb + ((t + 1) % K) * SW;                           // M_t: (S, W)
        const i64 tb = (i64)t * B + b;
        const F* wr_prev = t == 0 ? read0 + b * HS : w_r + (tb - B) * HS;   // (H, S)
        const F* wu_prev = t == 0 ? usage0 + b * S : w_u + (tb - B) * S;    // (S,)
        const F* k = keys + tb * HW;                              // (H, W)
        F* ww = w_w + tb * HS;                                    // (H, S)
        F* wr = w_r + tb * HS;                                    // (H, S)
        F* wlu = wlu_prev + (b * T + t) * S;                      // (S,)
        // 1. least-used indicator: w_lu(i) = 1 iff #{j : w_u(j) < w_u(i)} < n
        for (int i = tid; i < S; i += nt) {
            int below = 0;
            for (int j = 0; j < S; ++j) below += wu_prev[j] < wu_prev[i];
            wlu[i] = below < H ? F(1) : F(0);
        }
        // 3. the slot to zero: first argmin
        if (tid == 0) {
            int z = 0;
            for (int i = 1; i < S; ++i) if (wu_prev[i] < wu_prev[z]) z = i;
            zsh = z;
            zs[b * T + t] = z;
        }
        __syncthreads();
        const int z = zsh;
        // 2. write weights
        for (int p = tid; p < H * S; p += nt) {
            const int h = p / S, i = p - h * S;
            const F gh = g[tb * H + h];
            ww[p] = gh * wr_prev[p] + (F(1) - gh) * wlu[i];
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
            reads[tb * HW + p] = acc;
        }
        F* wu = w_u + tb * S;                                     // (S,)
        for (int i = tid; i < S; i += nt) {
            F sr = 0, sw = 0;
            for (int h = 0; h < H; ++h) { sr += wr[h * S + i]; sw += ww[h * S + i]; }
            wu[i] = gamma * wu_prev[i] + sr + sw;
        }
        __syncthreads();
        // the least-used indicator of the new usage (returned; step t + 1 recomputes it)
        for (int i = tid; i < S; i += nt) {
            int below = 0;
            for (int j = 0; j < S; ++j) below += wu[j] < wu[i];
            w_lu[tb * S + i] = below < H ? F(1) : F(0);
        }
        __syncthreads();
    }
    const F* MT = Mb + (T % K) * SW;
    for (i64 p = tid; p < SW; p += nt) memory[b * SW + p] = MT[p];
}

// Block b runs the reverse sweep of episode b (formulas: metacore.reference.lrua.
// lrua_backward). Ms: (B, T + 1, S, W) with M_t at index t; dkeys: (T, B, H, W),
// dalpha: (T, B, H), dmemory0: (B, S, W), dread0: (B, H, S) overwritten; scratch
// dM: (B, S, W), dwr, dc, gi: (B, H, S), kn, kon, sk: (B, H), mn, mon, sm: (B, S).
template <typename F>
__device__ void backward(const F* dreads, const F* keys, const F* g, const F* read0,
                         const F* w_r, const F* w_w, const F* Ms, const F* wlu_prev,
                         const i64* zs, F eps, int T, int B, int H, int S, int W,
                         F* dkeys, F* dalpha, F* dmemory0, F* dread0, F* dM_, F* dwr_,
                         F* dc_, F* gi_, F* kn_, F* kon_, F* sk_, F* mn_, F* mon_, F* sm_) {
    const i64 b = blockIdx.x;
    const int tid = threadIdx.x, nt = blockDim.x;
    const i64 SW = (i64)S * W, HS = (i64)H * S, HW = (i64)H * W;
    F* dM = dM_ + b * SW;
    F* dwr = dwr_ + b * HS;
    F* dc = dc_ + b * HS;
    F* gi = gi_ + b * HS;
    F* kn = kn_ + b * H; F* kon = kon_ + b * H; F* sk = sk_ + b * H;
    F* mn = mn_ + b * S; F* mon = mon_ + b * S; F* sm = sm_ + b * S;
    for (i64 p = tid; p < SW; p += nt) dM[p] = 0;
    for (i64 p = tid; p < HS; p += nt) dwr[p] = 0;
    __syncthreads();
    for (int t = T - 1; t >= 0; --t) {
        const i64 tb = (i64)t * B + b;
        const F* M = Ms + (b * (T + 1) + t + 1) * SW;             // M_t: (S, W)
        const F* k = keys + tb * HW;                              // (H, W)
        const F* wr = w_r + tb * HS;                              // (H, S)
        const F* ww = w_w + tb * HS;                              // (H, S)
        const F* dr = dreads + tb * HW;                           // (H, W)
        F* dk = dkeys + tb * HW;                                  // (H, W)
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
        const i64 z = zs[b * T + t];
        for (int x = tid; x < W; x += nt) dM[z * W + x] = 0;
        const F* wr_prev = t == 0 ? read0 + b * HS : w_r + (tb - B) * HS;   // (H, S)
        const F* wlu = wlu_prev + (b * T + t) * S;                          // (S,)
        for (int h = tid; h < H; h += nt) {
            const F gh = g[tb * H + h];
            F acc = 0;
            for (int i = 0; i < S; ++i) {
                acc += dwr[h * S + i] * (wr_prev[h * S + i] - wlu[i]);
                dwr[h * S + i] *= gh;
            }
            dalpha[tb * H + h] = gh * (F(1) - gh) * acc;
        }
        __syncthreads();
    }
    for (i64 p = tid; p < SW; p += nt) dmemory0[b * SW + p] = dM[p];
    for (i64 p = tid; p < HS; p += nt) dread0[b * HS + p] = dwr[p];
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
extern "C" __global__ void lrua_gates_##S(const F* alpha, int per_step, int T, int B,      \
                                          int H, F* g) {                                    \
    gates<F>(alpha, per_step, T, B, H, g); }                                                \
extern "C" __global__ void lrua_forward_##S(                                                \
        const F* keys, const F* g, const F* memory0, const F* read0, const F* usage0,       \
        F gamma, F eps, int T, int B, int H, int S_, int W, int K, F* reads, F* w_r,        \
        F* w_w, F* w_u, F* w_lu, F* Ms, F* wlu_prev, i64* zs, F* memory, F* kn, F* mn,      \
        F* c) {                                                                             \
    forward<F>(keys, g, memory0, read0, usage0, gamma, eps, T, B, H, S_, W, K, reads, w_r,  \
               w_w, w_u, w_lu, Ms, wlu_prev, zs, memory, kn, mn, c); }                      \
extern "C" __global__ void lrua_backward_##S(                                               \
        const F* dreads, const F* keys, const F* g, const F* read0, const F* w_r,           \
        const F* w_w, const F* Ms, const F* wlu_prev, const i64* zs, F eps, int T, int B,   \
        int H, int S_, int W, F* dkeys, F* dalpha, F* dmemory0, F* dread0, F* dM, F* dwr,   \
        F* dc, F* gi, F* kn, F* kon, F* sk, F* mn, F* mon, F* sm) {                         \
    backward<F>(dreads, keys, g, read0, w_r, w_w, Ms, wlu_prev, zs, eps, T, B, H, S_, W,    \
                dkeys, dalpha, dmemory0, dread0, dM, dwr, dc, gi, kn, kon, sk, mn, mon,     \
                sm); }                                                                      \
extern "C" __global__ void lrua_sum_tb_##S(const F* dalpha, int T, int B, int H, F* out) { \
    sum_tb<F>(dalpha, T, B, H, out); }

INSTANTIATE(float, f32)
INSTANTIATE(double, f64)
