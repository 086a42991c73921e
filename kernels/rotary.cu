// Rotary position embedding applied in place to Q `[tokens, q_heads, head_dim]` and
// K `[tokens, kv_heads, head_dim]`, each token at its own position (tokens of many
// sequences share one launch). Llama / Hugging Face layout: dimension i pairs with
// i + head_dim / 2. `cos` and `sin` are f32 tables `[max_position, head_dim / 2]`.
// One block per token; threads stride over (head, pair) of Q then K.
#include "common.cuh"

template <typename T>
__device__ void rotate(T* __restrict__ base, int heads, int head_dim, const float* __restrict__ c,
                       const float* __restrict__ s) {
    const int half = head_dim / 2;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int h = i / half, d = i % half;
        T* row = base + h * head_dim;
        const float x1 = to_f32(row[d]), x2 = to_f32(row[d + half]);
        row[d] = from_f32<T>(x1 * c[d] - x2 * s[d]);
        row[d + half] = from_f32<T>(x2 * c[d] + x1 * s[d]);
    }
}

template <typename T>
__device__ void rotary_inplace(T* q, T* k, const uint32_t* __restrict__ positions,
                               const float* __restrict__ cos, const float* __restrict__ sin,
                               int q_heads, int kv_heads, int head_dim) {
    const int64_t t = blockIdx.x;
    const int half = head_dim / 2;
    const float* c = cos + (int64_t)positions[t] * half;
    const float* s = sin + (int64_t)positions[t] * half;
    rotate<T>(q + t * q_heads * head_dim, q_heads, head_dim, c, s);
    rotate<T>(k + t * kv_heads * head_dim, kv_heads, head_dim, c, s);
}

#define ROTARY(T, NAME)                                                                    \
    extern "C" __global__ void flotilla_rotary_inplace_##NAME(                               \
        T* q, T* k, const uint32_t* positions, const float* cos, const float* sin,           \
        int q_heads, int kv_heads, int head_dim) {                                           \
        rotary_inplace<T>(q, k, positions, cos, sin, q_heads, kv_heads, head_dim);           \
    }
FLOTILLA_FOR_EACH_DTYPE(ROTARY)
