// Both RMSNorm kinds of the model (spec §3.1, §3.4) and partial NeoX RoPE (§3.3). One block per row.

// out = x / rms(x) · (1 + w): the zero-centred RMSNorm of the decoder and of q/k. Row r of x starts at
// x + r·x_stride, of out at out + r·out_stride (q/k heads sit at a stride); `out` may be `x`.
extern "C" __global__ void rms_norm_offset(const float* x, int x_stride, const float* __restrict__ w, float* out,
                                           int out_stride, int rows, int n, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * x_stride;
    float* o = out + (size_t)r * out_stride;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int c = threadIdx.x; c < n; c += blockDim.x) o[c] = xr[c] * inv * (1.0f + w[c]);
}

// y = w · (o / rms(o)) · silu(z): RMSNormGated of the Gated DeltaNet output, plain weight.
extern "C" __global__ void rms_norm_gated(const float* __restrict__ o, const float* __restrict__ z,
                                          const float* __restrict__ w, float* __restrict__ y, int rows, int n,
                                          float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* orow = o + (size_t)r * n;
    const float* zr = z + (size_t)r * n;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) ss += orow[c] * orow[c];
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int c = threadIdx.x; c < n; c += blockDim.x) y[(size_t)r * n + c] = w[c] * (orow[c] * inv) * silu_f(zr[c]);
}

// Rotates the first `rotary_dim` dims of every head vector in place: dim i pairs with i + rotary_dim/2 at angle
// pos · θ^(−2i/rotary_dim). Head `h` of token `t` starts at x + t·row_stride + h·head_stride. One block per
// (token, head).
extern "C" __global__ void rope_partial(float* x, const int* __restrict__ pos, int ntok, int heads, int row_stride,
                                        int head_stride, int rotary_dim, float theta) {
    const int th = blockIdx.x;
    if (th >= ntok * heads) return;
    const int t = th / heads, h = th % heads, half = rotary_dim / 2;
    float* v = x + (size_t)t * row_stride + (size_t)h * head_stride;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float f = 1.0f / powf(theta, (float)(2 * i) / (float)rotary_dim);
        float s, c;
        sincosf((float)pos[t] * f, &s, &c);
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}
