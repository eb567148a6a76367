// The glue of the decoder on the GPU (spec §3.2): embedding rows, bf16 operands for cuBLAS, row gathers, and the MoE
// layer's residual update.

// x[t, :] = embed[ids[t], :] (bf16 table, f32 rows). One block per token.
extern "C" __global__ void embed_rows(const bf16_t* __restrict__ embed, const unsigned int* __restrict__ ids,
                                      float* __restrict__ x, int n, int h) {
    const int t = blockIdx.x;
    if (t >= n) return;
    const bf16_t* src = embed + (size_t)ids[t] * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) x[(size_t)t * h + c] = bf16_to_f32(src[c]);
}

// out[i] = bf16(x[i]): activations rounded for a bf16 GEMM.
extern "C" __global__ void to_bf16(const float* __restrict__ x, bf16_t* __restrict__ out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(x[i]);
}

// out[r, :] = x[rows[r], :] (f32). One block per row.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ x, const unsigned int* __restrict__ rows,
                                           float* __restrict__ out, int n_rows, int h) {
    const int r = blockIdx.x;
    if (r >= n_rows) return;
    for (int c = threadIdx.x; c < h; c += blockDim.x) out[(size_t)r * h + c] = x[(size_t)rows[r] * h + c];
}

// x[t, :] += routed[t, :] + sigmoid(gate[t]) · shared[t, :]: the MoE layer's output joins the residual stream.
extern "C" __global__ void moe_residual(float* __restrict__ x, const float* __restrict__ routed,
                                        const float* __restrict__ shared, const float* __restrict__ gate, int n,
                                        int h) {
    const int t = blockIdx.x;
    if (t >= n) return;
    const float g = sigmoid_f(gate[t]);
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        const size_t i = (size_t)t * h + c;
        x[i] += routed[i] + g * shared[i];
    }
}

// dst[rows[r], :] = src[r, :] (f32). One block per row.
extern "C" __global__ void scatter_rows_f32(const float* __restrict__ src, const unsigned int* __restrict__ rows,
                                            float* __restrict__ dst, int n_rows, int h) {
    const int r = blockIdx.x;
    if (r >= n_rows) return;
    for (int c = threadIdx.x; c < h; c += blockDim.x) dst[(size_t)rows[r] * h + c] = src[(size_t)r * h + c];
}
