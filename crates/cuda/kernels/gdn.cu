// Gated DeltaNet (spec §3.4) for one sequence span: the causal depthwise conv with SiLU, the per-head preparation
// (L2-normalised q/k, β, log-decay g), the gated delta rule in its recurrent and chunked forms, and RMSNormGated
// (in norm.cu). As on the CPU backend the rule runs in f64 on the fp32 state.

// Causal depthwise conv over the window [state (k−1 rows) | inp (n rows)], then SiLU: out[t, ch] =
// silu(Σ_j w[j, ch] · window[t + j, ch]) with w laid out [k][c]. The same launch writes the next state (the last k−1
// window rows) to `next_state`, which must not alias `state`. One thread per (row, channel) of out and next_state.
extern "C" __global__ void causal_conv_silu(const float* __restrict__ state, const float* __restrict__ inp,
                                            const float* __restrict__ w, float* __restrict__ out,
                                            float* __restrict__ next_state, int n, int c, int k) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t outs = (size_t)n * c, total = outs + (size_t)(k - 1) * c;
    if (idx >= total) return;
    const int ch = (int)(idx % c);
    if (idx < outs) {
        const int t = (int)(idx / c);
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) {
            const int r = t + j;  // window row
            const float x = r < k - 1 ? state[(size_t)r * c + ch] : inp[(size_t)(r - (k - 1)) * c + ch];
            acc += w[(size_t)j * c + ch] * x;
        }
        out[idx] = silu_f(acc);
    } else {
        const int r = n + (int)((idx - outs) / c);  // window row kept
        next_state[idx - outs] = r < k - 1 ? state[(size_t)r * c + ch] : inp[(size_t)(r - (k - 1)) * c + ch];
    }
}

// From the conv output u [n, 2·hk·dk + hv·dv] (q | k | v) and the b, a projections [n, hv], writes per value head j
// (key head j / (hv/hk)), head-major: q, k [hv, n, dk] (L2-normalised, q scaled), v [hv, n, dv], beta = σ(b) and
// g = −exp(A_log) · softplus(a + dt_bias), both [hv, n]. One block per (token, value head).
extern "C" __global__ void gdn_prepare(const float* __restrict__ u, const float* __restrict__ b,
                                       const float* __restrict__ a, const float* __restrict__ neg_a,
                                       const float* __restrict__ dt_bias, double* __restrict__ q,
                                       double* __restrict__ k, double* __restrict__ v, double* __restrict__ beta,
                                       double* __restrict__ g, int n, int hk, int hv, int dk, int dv, float q_scale,
                                       float eps) {
    __shared__ float scratch[32];
    const int t = blockIdx.x / hv, j = blockIdx.x % hv;
    if (t >= n) return;
    const int kh = j / (hv / hk);
    const int width = 2 * hk * dk + hv * dv;
    const float* ur = u + (size_t)t * width;
    const float* qs = ur + kh * dk;
    const float* ks = ur + hk * dk + kh * dk;
    float sq = 0.0f, sk = 0.0f;
    for (int i = threadIdx.x; i < dk; i += blockDim.x) {
        sq += qs[i] * qs[i];
        sk += ks[i] * ks[i];
    }
    sq = block_sum(sq, scratch);
    sk = block_sum(sk, scratch);
    const float fq = q_scale / sqrtf(sq + eps), fk = 1.0f / sqrtf(sk + eps);
    const size_t row = (size_t)j * n + t;
    for (int i = threadIdx.x; i < dk; i += blockDim.x) {
        q[row * dk + i] = (double)(qs[i] * fq);
        k[row * dk + i] = (double)(ks[i] * fk);
    }
    const float* vs = ur + 2 * hk * dk + j * dv;
    for (int i = threadIdx.x; i < dv; i += blockDim.x) v[row * dv + i] = (double)vs[i];
    if (threadIdx.x == 0) {
        const float x = a[(size_t)t * hv + j] + dt_bias[j];
        const float sp = x > 20.0f ? x : log1pf(expf(x));
        beta[row] = (double)sigmoid_f(b[(size_t)t * hv + j]);
        g[row] = (double)(neg_a[j] * sp);
    }
}

// One token of the recurrent rule for state column c of one head (state s [dk, dv]): the token's q and k (row `row`)
// are staged in `qk` (2·dk doubles of shared memory) by the whole block, then thread c updates its column and writes
// o[row, c]. Every thread of the block must call it.
__device__ void delta_step(const double* __restrict__ q, const double* __restrict__ k, const double* __restrict__ v,
                           const double* __restrict__ beta, const double* __restrict__ g, size_t row, float* s,
                           double* __restrict__ out, int dk, int dv, int c, double* qk) {
    double* qs = qk;
    double* ks = qk + dk;
    for (int i = threadIdx.x; i < dk; i += blockDim.x) {
        qs[i] = q[row * dk + i];
        ks[i] = k[row * dk + i];
    }
    __syncthreads();
    if (c >= dv) return;
    const double alpha = exp(g[row]);
    double e = v[row * dv + c];
    for (int i = 0; i < dk; ++i) e -= ks[i] * alpha * (double)s[(size_t)i * dv + c];
    e *= beta[row];
    double o = 0.0;
    for (int i = 0; i < dk; ++i) {
        const double updated = alpha * (double)s[(size_t)i * dv + c] + ks[i] * e;
        o += qs[i] * updated;
        s[(size_t)i * dv + c] = (float)updated;
    }
    out[row * dv + c] = o;
}

// The recurrent rule, token by token: S ← αS + k ⊗ β(v − (αS)ᵀk), o = Sᵀq, with the state rounded to f32 after each
// token. Every state column is independent, so thread c owns column c of its head's state [dk, dv]: grid (hv,
// ⌈dv/blockDim⌉), 2·dk doubles of dynamic shared memory for the token's q and k. out is [hv, n, dv].
extern "C" __global__ void gated_delta_recurrent(const double* __restrict__ q, const double* __restrict__ k,
                                                 const double* __restrict__ v, const double* __restrict__ beta,
                                                 const double* __restrict__ g, float* __restrict__ state,
                                                 double* __restrict__ out, int n, int dk, int dv) {
    extern __shared__ double qk[];
    const int j = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    float* s = state + (size_t)j * dk * dv;
    for (int t = 0; t < n; ++t) {
        delta_step(q, k, v, beta, g, (size_t)j * n + t, s, out, dk, dv, c, qk);
        __syncthreads();
    }
}

#define GDN_CHUNK 64

// The chunked rule (the reference's prefill form), one block per value head, chunks of 64 tokens:
//   A_ij = β_i (k_i·k_j) e^{Γ_i−Γ_j} (j < i);  U = (I+A)⁻¹ diag(β) V;  W = (I+A)⁻¹ diag(β e^Γ) K;
//   V' = U − W S;  O_i = e^{Γ_i} q_i S + Σ_{j≤i} (q_i·k_j) e^{Γ_i−Γ_j} V'_j;  S ← e^{Γ_l} S + Σ_j e^{Γ_l−Γ_j} k_j ⊗ V'_j.
// The state is held in f64 for the whole span (in `scratch`) and rounded to f32 once at the end, as on the CPU.
// scratch holds, per head, dk·dv + 64·64 + 2·64·dv + 64·dk doubles.
extern "C" __global__ void gated_delta_chunked(const double* __restrict__ q, const double* __restrict__ k,
                                               const double* __restrict__ v, const double* __restrict__ beta,
                                               const double* __restrict__ g, float* __restrict__ state,
                                               double* __restrict__ out, double* __restrict__ scratch, int n, int dk,
                                               int dv) {
    __shared__ double gam[GDN_CHUNK];
    const int j = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const size_t per_head = (size_t)dk * dv + GDN_CHUNK * GDN_CHUNK + 2 * GDN_CHUNK * dv + GDN_CHUNK * dk;
    double* S = scratch + (size_t)j * per_head;
    double* A = S + (size_t)dk * dv;
    double* U = A + GDN_CHUNK * GDN_CHUNK;
    double* VP = U + (size_t)GDN_CHUNK * dv;
    double* W = VP + (size_t)GDN_CHUNK * dv;
    float* s32 = state + (size_t)j * dk * dv;
    for (int i = tid; i < dk * dv; i += nt) S[i] = (double)s32[i];
    __syncthreads();
    for (int c0 = 0; c0 < n; c0 += GDN_CHUNK) {
        const int l = min(GDN_CHUNK, n - c0);
        const size_t base = (size_t)j * n + c0;
        const double* qc = q + base * dk;
        const double* kc = k + base * dk;
        const double* vc = v + base * dv;
        const double* bc = beta + base;
        if (tid == 0) {
            double acc = 0.0;
            for (int i = 0; i < l; ++i) {
                acc += g[base + i];
                gam[i] = acc;
            }
        }
        __syncthreads();
        for (int idx = tid; idx < l * l; idx += nt) {
            const int i = idx / l, jj = idx % l;
            if (jj < i) {
                double d = 0.0;
                for (int r = 0; r < dk; ++r) d += kc[(size_t)i * dk + r] * kc[(size_t)jj * dk + r];
                A[i * GDN_CHUNK + jj] = bc[i] * d * exp(gam[i] - gam[jj]);
            }
        }
        __syncthreads();
        // Forward substitution, row by row; each row is parallel over its columns.
        for (int i = 0; i < l; ++i) {
            for (int c = tid; c < dv; c += nt) {
                double x = bc[i] * vc[(size_t)i * dv + c];
                for (int jj = 0; jj < i; ++jj) x -= A[i * GDN_CHUNK + jj] * U[(size_t)jj * dv + c];
                U[(size_t)i * dv + c] = x;
            }
            const double f = bc[i] * exp(gam[i]);
            for (int r = tid; r < dk; r += nt) {
                double x = f * kc[(size_t)i * dk + r];
                for (int jj = 0; jj < i; ++jj) x -= A[i * GDN_CHUNK + jj] * W[(size_t)jj * dk + r];
                W[(size_t)i * dk + r] = x;
            }
            __syncthreads();
        }
        // V' = U − W S and the inter-chunk part of O.
        for (int idx = tid; idx < l * dv; idx += nt) {
            const int i = idx / dv, c = idx % dv;
            const double eg = exp(gam[i]);
            double x = U[(size_t)i * dv + c], o = 0.0;
            for (int r = 0; r < dk; ++r) {
                const double sc = S[(size_t)r * dv + c];
                x -= W[(size_t)i * dk + r] * sc;
                o += qc[(size_t)i * dk + r] * eg * sc;
            }
            VP[(size_t)i * dv + c] = x;
            out[(base + i) * dv + c] = o;
        }
        __syncthreads();
        // A is free again: it now holds (q_i·k_j) e^{Γ_i−Γ_j} for j ≤ i.
        for (int idx = tid; idx < l * l; idx += nt) {
            const int i = idx / l, jj = idx % l;
            if (jj <= i) {
                double d = 0.0;
                for (int r = 0; r < dk; ++r) d += qc[(size_t)i * dk + r] * kc[(size_t)jj * dk + r];
                A[i * GDN_CHUNK + jj] = d * exp(gam[i] - gam[jj]);
            }
        }
        __syncthreads();
        for (int idx = tid; idx < l * dv; idx += nt) {
            const int i = idx / dv, c = idx % dv;
            double o = out[(base + i) * dv + c];
            for (int jj = 0; jj <= i; ++jj) o += A[i * GDN_CHUNK + jj] * VP[(size_t)jj * dv + c];
            out[(base + i) * dv + c] = o;
        }
        const double last = gam[l - 1], decay = exp(last);
        for (int idx = tid; idx < dk * dv; idx += nt) {
            const int r = idx / dv, c = idx % dv;
            double x = S[idx] * decay;
            for (int jj = 0; jj < l; ++jj) x += kc[(size_t)jj * dk + r] * exp(last - gam[jj]) * VP[(size_t)jj * dv + c];
            S[idx] = x;
        }
        __syncthreads();
    }
    for (int i = tid; i < dk * dv; i += nt) s32[i] = (float)S[i];
}

// y [n, hv·dv] = RMSNormGated(o) with o [hv, n, dv] in f64 (rounded to f32 first, as on the CPU) and z [n, hv·dv].
// One block per (token, value head).
extern "C" __global__ void gdn_output_norm(const double* __restrict__ o, const float* __restrict__ z,
                                           const float* __restrict__ w, float* __restrict__ y, int n, int hv, int dv,
                                           float eps) {
    __shared__ float scratch[32];
    const int t = blockIdx.x / hv, j = blockIdx.x % hv;
    if (t >= n) return;
    const double* orow = o + ((size_t)j * n + t) * dv;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < dv; c += blockDim.x) {
        const float x = (float)orow[c];
        ss += x * x;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)dv + eps);
    const size_t at = ((size_t)t * hv + j) * dv;
    for (int c = threadIdx.x; c < dv; c += blockDim.x) y[at + c] = w[c] * ((float)orow[c] * inv) * silu_f(z[at + c]);
}

// Decode steps of B sequences at once, one token each (the serving engine's common case): their states are found
// through per-sequence pointer tables, so that one launch serves the whole batch.

// The causal conv for one token per sequence, updating each state [K−1, C] in place: token b's pre-conv row is
// qkv[rows[b], :]; u[b, :] is its output. One thread per (sequence, channel), which owns that state column.
extern "C" __global__ void conv_step_multi(float* const* __restrict__ states, const float* __restrict__ qkv,
                                           const unsigned int* __restrict__ rows, const float* __restrict__ w,
                                           float* __restrict__ u, int B, int c, int k) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * c) return;
    const int b = (int)(idx / c), ch = (int)(idx % c);
    float* st = states[b];
    const float x = qkv[(size_t)rows[b] * c + ch];
    float acc = w[(size_t)(k - 1) * c + ch] * x;
    for (int j = 0; j < k - 1; ++j) acc += w[(size_t)j * c + ch] * st[(size_t)j * c + ch];
    u[idx] = silu_f(acc);
    for (int j = 0; j + 1 < k - 1; ++j) st[(size_t)j * c + ch] = st[(size_t)(j + 1) * c + ch];
    if (k >= 2) st[(size_t)(k - 2) * c + ch] = x;
}

// One recurrent step for each of B sequences (q, k, v, beta, g laid out [hv, B, ...] as gdn_prepare writes them for
// n = B), sequence b's state [hv, dk, dv] at states[b]. Grid (hv, ⌈dv/blockDim⌉, B); 2·dk doubles of shared memory.
extern "C" __global__ void gated_delta_step_multi(const double* __restrict__ q, const double* __restrict__ k,
                                                  const double* __restrict__ v, const double* __restrict__ beta,
                                                  const double* __restrict__ g, float* const* __restrict__ states,
                                                  double* __restrict__ out, int B, int dk, int dv) {
    extern __shared__ double qk[];
    const int j = blockIdx.x, b = blockIdx.z;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    delta_step(q, k, v, beta, g, (size_t)j * B + b, states[b] + (size_t)j * dk * dv, out, dk, dv, c, qk);
}
