// Fused residual add + RMSNorm, one block per row:
//   x[row] += residual[row]            (in place: x is the residual stream)
//   out[row] = x[row] / sqrt(mean(x[row]^2) + eps) * weight
// Unfused, the add and the norm each read and write the hidden state from HBM; here it is
// read once and written twice (x and out). `residual` may be null (plain RMSNorm).
// The sum is rounded to the storage type before it is normalised, as the unfused ops do.
#include "common.cuh"

template <typename T>
__device__ void add_rms_norm(T* __restrict__ x, const T* __restrict__ residual,
                             const T* __restrict__ weight, T* __restrict__ out, int hidden,
                             float eps) {
    const int64_t row = blockIdx.x;
    T* xr = x + row * hidden;
    const T* rr = residual ? residual + row * hidden : nullptr;
    T* outr = out + row * hidden;

    float sq = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = to_f32(xr[i]);
        if (rr) {
            T s = from_f32<T>(v + to_f32(rr[i]));
            xr[i] = s;
            v = to_f32(s);
        }
        sq += v * v;
    }

    __shared__ float partial[32];
    sq = warp_sum(sq);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = sq;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + 31) / 32;
        float t = lane < nwarps ? partial[lane] : 0.f;
        t = warp_sum(t);
        if (lane == 0) partial[0] = rsqrtf(t / hidden + eps);
    }
    __syncthreads();
    const float inv = partial[0];
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        outr[i] = from_f32<T>(to_f32(xr[i]) * inv * to_f32(weight[i]));
    }
}

#define ADD_RMS_NORM(T, NAME)                                                              \
    extern "C" __global__ void flotilla_add_rms_norm_##NAME(                                 \
        T* x, const T* residual, const T* weight, T* out, int hidden, float eps) {           \
        add_rms_norm<T>(x, residual, weight, out, hidden, eps);                              \
    }
FLOTILLA_FOR_EACH_DTYPE(ADD_RMS_NORM)
