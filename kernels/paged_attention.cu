// Paged attention over the engine's block tables, and the write of new K/V into the cache.
//
// Cache layout (per layer, as in the CPU engine): `[num_blocks, block_size, kv_heads,
// head_dim]`. A sequence's token j lives in block `table[j / block_size]`, slot
// `j % block_size`. Block tables are one flat `[num_seqs, max_blocks]` array.
//
// Attention takes one query row per (token, head) and attends over that token's own
// context: `context_lens[q]` cached tokens of sequence `query_seq[q]`. A decode token's
// context is its whole sequence; a prefill token at position p sees p + 1 tokens, so the
// same kernel serves mixed prefill/decode batches (causal by construction).
//
// One block of NUM_WARPS warps per (query, head) (grid x = queries, which may exceed
// 65535; grid y = heads); warps take cached tokens round-robin and
// keep an online softmax (running max, sum and weighted V) in registers, so no score
// buffer is needed at any context length; the warps' partial results are merged at the
// end. Within a warp, lanes split head_dim so every K/V row is read coalesced, once.
#include "common.cuh"

constexpr int NUM_WARPS = 4;
constexpr int MAX_HEAD_DIM = 256;
constexpr int DIMS_PER_LANE = MAX_HEAD_DIM / 32;

template <typename T>
__device__ void paged_attention(T* __restrict__ out, const T* __restrict__ q,
                                const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                const uint32_t* __restrict__ block_tables, int max_blocks,
                                const uint32_t* __restrict__ query_seq,
                                const uint32_t* __restrict__ context_lens, int num_heads,
                                int num_kv_heads, int head_dim, int block_size, float scale) {
    const int64_t qi = blockIdx.x;
    const int h = blockIdx.y;
    const int kvh = h / (num_heads / num_kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t* table = block_tables + (int64_t)query_seq[qi] * max_blocks;
    const int ctx = (int)context_lens[qi];
    const int64_t kv_width = (int64_t)num_kv_heads * head_dim;

    float qv[DIMS_PER_LANE], acc[DIMS_PER_LANE];
    const T* qrow = q + (qi * num_heads + h) * head_dim;
#pragma unroll
    for (int i = 0; i < DIMS_PER_LANE; i++) {
        const int d = lane + 32 * i;
        qv[i] = d < head_dim ? to_f32(qrow[d]) * scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int j = warp; j < ctx; j += NUM_WARPS) {
        const int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
        const T* kr = k_cache + slot * kv_width + (int64_t)kvh * head_dim;
        const T* vr = v_cache + slot * kv_width + (int64_t)kvh * head_dim;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < DIMS_PER_LANE; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) dot += qv[i] * to_f32(kr[d]);
        }
        dot = warp_sum(dot);
        const float m_new = fmaxf(m, dot);
        const float corr = __expf(m - m_new);
        const float p = __expf(dot - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < DIMS_PER_LANE; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = acc[i] * corr + p * to_f32(vr[d]);
        }
        m = m_new;
    }

    __shared__ float s_max[NUM_WARPS], s_sum[NUM_WARPS];
    __shared__ float s_acc[NUM_WARPS][MAX_HEAD_DIM];
    if (lane == 0) {
        s_max[warp] = m;
        s_sum[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < DIMS_PER_LANE; i++) {
        const int d = lane + 32 * i;
        if (d < head_dim) s_acc[warp][d] = acc[i];
    }
    __syncthreads();
    float gmax = -INFINITY;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; w++) gmax = fmaxf(gmax, s_max[w]);
    float weights[NUM_WARPS], total = 0.f;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; w++) {
        // A warp that saw no tokens has max -inf: weight exp(-inf) = 0.
        weights[w] = __expf(s_max[w] - gmax);
        total += s_sum[w] * weights[w];
    }
    T* orow = out + (qi * num_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; w++) o += s_acc[w][d] * weights[w];
        // An empty context (never built by the host) gives zeros, not NaN.
        orow[d] = from_f32<T>(total > 0.f ? o / total : 0.f);
    }
}

// k, v: `[tokens, kv_heads * head_dim]`; slots[t] = block * block_size + offset.
template <typename T>
__device__ void write_kv(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                         T* __restrict__ v_cache, const uint32_t* __restrict__ slots,
                         int kv_width) {
    const int64_t t = blockIdx.x;
    const int64_t dst = (int64_t)slots[t] * kv_width;
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
        k_cache[dst + i] = k[t * kv_width + i];
        v_cache[dst + i] = v[t * kv_width + i];
    }
}

#define PAGED(T, NAME)                                                                     \
    extern "C" __global__ void flotilla_paged_attention_##NAME(                              \
        T* out, const T* q, const T* k_cache, const T* v_cache, const uint32_t* block_tables, \
        int max_blocks, const uint32_t* query_seq, const uint32_t* context_lens,             \
        int num_heads, int num_kv_heads, int head_dim, int block_size, float scale) {        \
        paged_attention<T>(out, q, k_cache, v_cache, block_tables, max_blocks, query_seq,    \
                           context_lens, num_heads, num_kv_heads, head_dim, block_size,      \
                           scale);                                                           \
    }                                                                                        \
    extern "C" __global__ void flotilla_write_kv_##NAME(const T* k, const T* v, T* k_cache,  \
                                                        T* v_cache, const uint32_t* slots,   \
                                                        int kv_width) {                      \
        write_kv<T>(k, v, k_cache, v_cache, slots, kv_width);                                \
    }
FLOTILLA_FOR_EACH_DTYPE(PAGED)
