// Gated attention over a paged KV cache (spec §3.3) for one sequence span. The cache holds pages of `page_tokens`
// rows of width nkv·hd (f32); `pages` maps the sequence's page i to its page in the pool.

// Copies n new rows (keys or values, [n, width]) to positions pos0.. of the sequence.
extern "C" __global__ void kv_append(const float* __restrict__ rows, const int* __restrict__ pages,
                                     float* __restrict__ cache, int n, int pos0, int width, int page_tokens) {
    const int t = blockIdx.x;
    if (t >= n) return;
    const int p = pos0 + t;
    float* dst = cache + ((size_t)pages[p / page_tokens] * page_tokens + p % page_tokens) * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = rows[(size_t)t * width + c];
}

#define ATT_MAX_LANE_DIMS 8  // head_dim ≤ 256

// The body of both attention kernels, for one (token, head) per block: writes out[d] = sigmoid(gate[d]) ·
// (softmax(q·Kᵀ · scale) V)[d] over positions 0..ctx−1 of the sequence whose pages are `pages`, reading key/value head
// g. The block's warps split the keys, each with an online softmax, merged at the end (flash-decoding within a
// block). `part` is (2 + hd) floats of shared memory per warp.
__device__ void attend(const float* __restrict__ qrow, const float* __restrict__ k_cache,
                       const float* __restrict__ v_cache, const int* __restrict__ pages, int ctx, int g, int nkv,
                       int hd, int page_tokens, float scale, float* part, float* __restrict__ out) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int per_lane = hd / 32, width = nkv * hd;
    float qv[ATT_MAX_LANE_DIMS], acc[ATT_MAX_LANE_DIMS];
    for (int m = 0; m < per_lane; ++m) {
        qv[m] = qrow[lane + 32 * m];
        acc[m] = 0.0f;
    }
    float mx = -MOE_INF, sum = 0.0f;
    for (int p = warp; p < ctx; p += nw) {
        const size_t at = ((size_t)pages[p / page_tokens] * page_tokens + p % page_tokens) * width + (size_t)g * hd;
        float s = 0.0f;
        for (int m = 0; m < per_lane; ++m) s += qv[m] * k_cache[at + lane + 32 * m];
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        s *= scale;
        const float next = fmaxf(mx, s);
        const float corr = expf(mx - next), e = expf(s - next);
        sum = sum * corr + e;
        for (int m = 0; m < per_lane; ++m) acc[m] = acc[m] * corr + e * v_cache[at + lane + 32 * m];
        mx = next;
    }
    float* wm = part;              // [nw]
    float* ws = part + nw;         // [nw]
    float* wa = part + 2 * nw;     // [nw, hd]
    if (lane == 0) {
        wm[warp] = mx;
        ws[warp] = sum;
    }
    for (int m = 0; m < per_lane; ++m) wa[warp * hd + lane + 32 * m] = acc[m];
    __syncthreads();
    float big = -MOE_INF;
    for (int w = 0; w < nw; ++w) big = fmaxf(big, wm[w]);
    float total = 0.0f;
    for (int w = 0; w < nw; ++w) total += ws[w] * expf(wm[w] - big);
    const float* gate = qrow + hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float x = 0.0f;
        for (int w = 0; w < nw; ++w) x += wa[w * hd + d] * expf(wm[w] - big);
        out[d] = x / total * sigmoid_f(gate[d]);
    }
}

// o[t, h, :] for the n new tokens at positions pos0.. of one sequence, with q and gate laid out per head as
// [q (hd) | gate (hd)] in qg [n, nh, 2·hd] (q already normed and rotated). One block per (token, head); dynamic
// shared memory: (2 + hd) floats per warp.
extern "C" __global__ void attention_paged(const float* __restrict__ qg, const float* __restrict__ k_cache,
                                           const float* __restrict__ v_cache, const int* __restrict__ pages,
                                           float* __restrict__ o, int n, int pos0, int nh, int nkv, int hd,
                                           int page_tokens, float scale) {
    extern __shared__ float part[];
    const int t = blockIdx.x / nh, h = blockIdx.x % nh;
    if (t >= n) return;
    attend(qg + ((size_t)t * nh + h) * 2 * hd, k_cache, v_cache, pages, pos0 + t + 1, h / (nh / nkv), nkv, hd,
           page_tokens, scale, part, o + ((size_t)t * nh + h) * hd);
}

// Decode steps of B sequences at once, one token each: token b is row rows[b] of the batch, at position pos[b], with
// its page table at tables + b·max_pages.

// Appends each token's key or value row (rows[b] of `src`, [ntok, width]) at its position.
extern "C" __global__ void kv_append_multi(const float* __restrict__ src, const unsigned int* __restrict__ rows,
                                           const int* __restrict__ pos, const int* __restrict__ tables, int max_pages,
                                           float* __restrict__ cache, int B, int width, int page_tokens) {
    const int b = blockIdx.x;
    if (b >= B) return;
    const int p = pos[b];
    const int page = tables[(size_t)b * max_pages + p / page_tokens];
    float* dst = cache + ((size_t)page * page_tokens + p % page_tokens) * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = src[(size_t)rows[b] * width + c];
}

// attention_paged for one token of each of B sequences: block (b, h) reads qg row rows[b] and writes o row rows[b].
extern "C" __global__ void attention_paged_multi(const float* __restrict__ qg, const float* __restrict__ k_cache,
                                                 const float* __restrict__ v_cache,
                                                 const unsigned int* __restrict__ rows, const int* __restrict__ pos,
                                                 const int* __restrict__ tables, int max_pages, float* __restrict__ o,
                                                 int B, int nh, int nkv, int hd, int page_tokens, float scale) {
    extern __shared__ float part[];
    const int b = blockIdx.x / nh, h = blockIdx.x % nh;
    if (b >= B) return;
    const size_t t = rows[b];
    attend(qg + (t * nh + h) * 2 * hd, k_cache, v_cache, tables + (size_t)b * max_pages, pos[b] + 1, h / (nh / nkv),
           nkv, hd, page_tokens, scale, part, o + (t * nh + h) * hd);
}
