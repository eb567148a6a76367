// The router's softmax over all experts and its top-k (spec §3.5). One block per token; `ne` floats of dynamic shared
// memory hold the probabilities.

// Picks the larger probability, ties to the lower expert id (as torch.topk on CPU and the CPU backend do).
__device__ __forceinline__ void better(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

extern "C" __global__ void softmax_topk(const float* __restrict__ logits, int ntok, int ne, int k, int renormalize,
                                        unsigned int* __restrict__ experts, float* __restrict__ weights) {
    extern __shared__ float p[];
    __shared__ float scratch[32];
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const int t = blockIdx.x;
    if (t >= ntok) return;
    const float* l = logits + (size_t)t * ne;
    float m = -MOE_INF;
    for (int e = threadIdx.x; e < ne; e += blockDim.x) m = fmaxf(m, l[e]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int e = threadIdx.x; e < ne; e += blockDim.x) {
        p[e] = expf(l[e] - m);
        s += p[e];
    }
    s = block_sum(s, scratch);
    const float inv = 1.0f / s;
    for (int e = threadIdx.x; e < ne; e += blockDim.x) p[e] *= inv;
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int kk = 0; kk < k; ++kk) {
        float v = -2.0f;
        int i = 0x7fffffff;
        for (int e = threadIdx.x; e < ne; e += blockDim.x) better(v, i, p[e], e);
        for (int o = 16; o > 0; o >>= 1) better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
        if (lane == 0) { best_v[warp] = v; best_i[warp] = i; }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < nw; ++w) better(v, i, best_v[w], best_i[w]);
            experts[(size_t)t * k + kk] = (unsigned int)i;
            weights[(size_t)t * k + kk] = v;
            p[i] = -1.0f;  // taken: below every probability
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && renormalize) {
        float sum = 0.0f;
        for (int kk = 0; kk < k; ++kk) sum += weights[(size_t)t * k + kk];
        for (int kk = 0; kk < k; ++kk) weights[(size_t)t * k + kk] /= sum;
    }
}
