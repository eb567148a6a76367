// The routed experts around cuBLAS: the rows routed to each expert are gathered (and rounded to bf16) into one
// expert-ordered matrix, cuBLAS runs gate_up and down per expert on its slice of rows, SwiGLU sits in between, and the
// weighted combine sums each token's rows back in expert order (no atomics: the same routing gives the same bits).

// out[r, :] = bf16(x[rows[r], :]); one block per gathered row.
extern "C" __global__ void gather_rows_bf16(const float* __restrict__ x, const unsigned int* __restrict__ rows,
                                            bf16_t* __restrict__ out, int n_rows, int h) {
    const int r = blockIdx.x;
    if (r >= n_rows) return;
    const float* src = x + (size_t)rows[r] * h;
    bf16_t* dst = out + (size_t)r * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) dst[c] = f32_to_bf16(src[c]);
}

// act[r, j] = bf16(silu(gu[r, j]) * gu[r, inter + j]): gu holds the gate rows' outputs, then the up rows'.
extern "C" __global__ void swiglu_bf16(const float* __restrict__ gu, bf16_t* __restrict__ act, int n_rows, int inter) {
    const int r = blockIdx.x;
    if (r >= n_rows) return;
    const float* g = gu + (size_t)r * 2 * inter;
    bf16_t* a = act + (size_t)r * inter;
    for (int j = threadIdx.x; j < inter; j += blockDim.x) a[j] = f32_to_bf16(silu_f(g[j]) * g[inter + j]);
}

// out[t, :] = Σ_{s in offsets[t]..offsets[t+1]} weights[s] · y[slots[s], :], the slots in expert order; tokens
// without a slot get zeros. One block per token.
extern "C" __global__ void combine_rows(const float* __restrict__ y, const unsigned int* __restrict__ offsets,
                                        const unsigned int* __restrict__ slots, const float* __restrict__ weights,
                                        float* __restrict__ out, int ntok, int h) {
    const int t = blockIdx.x;
    if (t >= ntok) return;
    const unsigned int a = offsets[t], b = offsets[t + 1];
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        float acc = 0.0f;
        for (unsigned int s = a; s < b; ++s) acc += weights[s] * y[(size_t)slots[s] * h + c];
        out[(size_t)t * h + c] = acc;
    }
}
