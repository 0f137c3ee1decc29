// Decode attention over a paged KV cache, float32, AVX2 + FMA: one new query token per sequence against
// its cached keys and values, read where they lie (no gather into a padded batch first).
//
// Work is split by (sequence, KV head); each is computed by one thread in a fixed order from nothing
// but its own query and cache, so a sequence's result is the same bits whatever else is in the step
// (the expert-output cache needs that of decode rows) and whatever the thread count.
//
// Per (sequence, KV head) with G query heads sharing it: scores q.k for every cached position (each key
// row read once for all G heads), a softmax per query head, then the probability-weighted sum of the
// value rows, 8 columns at a time for up to 8 heads at once.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

namespace {

// exp for x <= 0 (scores minus their maximum): 2^n * p(r) with |r| <= ln2 / 2 and a degree-6 Taylor
// polynomial, relative error ~1e-7; below -87 the result is 0.
inline __m256 exp_nonpositive(__m256 x) {
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    const __m256 too_small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
    r = _mm256_fnmadd_ps(n, ln2_lo, r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(too_small, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 cached values as float32: float32 as they are, bfloat16 widened exactly (its bits are float32's top half).
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const uint16_t* x) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

template <typename T>
inline float dot(const float* a, const T* b, int d) {  // d a multiple of 8
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= d; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), s1);
    }
    if (i < d) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
    return hsum(_mm256_add_ps(s0, s1));
}

// Rows of one sequence lie in blocks scattered over the cache, 2 * kv_heads * D floats apart within a
// block: too irregular for the hardware prefetcher, so each pass asks for the rows it reads kAhead ahead.
constexpr int kAhead = 8;

template <typename T>
inline void prefetch_row(const T* row, int d) {
    const char* bytes = reinterpret_cast<const char*>(row);
    for (int i = 0; i < d * (int)sizeof(T); i += 64) _mm_prefetch(bytes + i, _MM_HINT_T0);
}

template <typename T>
struct Problem {
    const float* q; int heads, head_dim;
    const T* keys; const T* values; int kv_heads;
    const int64_t* tables; int table_width, block_size;
    const int64_t* lengths; int window; float scale;
    float* out;
};

template <typename T>
struct Scratch {  // per thread, reused across (sequence, KV head) items
    std::vector<float> scores, inv;
    std::vector<const T*> keys, values;
};

// out[h] += sum over t of p[h][t] * v[t][d0:d0+8] for the H heads of one chunk: H accumulators in registers,
// one 32-byte load of each value row per pass.
template <int H, typename T>
void weighted_values(const float* const* s, const T* const* values, int n, int d0, int row_floats,
                     const float* inv, float* const* out) {
    __m256 acc[H];
#pragma GCC unroll 8
    for (int h = 0; h < H; h++) acc[h] = _mm256_setzero_ps();
    for (int t = 0; t < n; t++) {
        if (d0 == 0 && t + kAhead < n) prefetch_row(values[t + kAhead], row_floats);  // later passes find them in L2
        const __m256 v = load8(values[t] + d0);
#pragma GCC unroll 8
        for (int h = 0; h < H; h++) acc[h] = _mm256_fmadd_ps(_mm256_set1_ps(s[h][t]), v, acc[h]);
    }
#pragma GCC unroll 8
    for (int h = 0; h < H; h++) _mm256_storeu_ps(out[h] + d0, _mm256_mul_ps(acc[h], _mm256_set1_ps(inv[h])));
}

template <typename T>
void one(const Problem<T>& p, int b, int g, Scratch<T>& scratch) {
    const int group = p.heads / p.kv_heads, d = p.head_dim;
    const int length = (int)p.lengths[b];
    const int first = p.window > 0 ? std::max(0, length - p.window) : 0;
    const int n = length - first, padded = (n + 7) & ~7;
    const int64_t* table = p.tables + (int64_t)b * p.table_width;
    // where each position's key and value rows lie, found once (not once per head and per pass)
    scratch.keys.resize(n);
    scratch.values.resize(n);
    for (int t = 0; t < n; t++) {
        const int pos = first + t;
        const int64_t row = (table[pos / p.block_size] * p.block_size + pos % p.block_size) * p.kv_heads + g;
        scratch.keys[t] = p.keys + row * d;
        scratch.values[t] = p.values + row * d;
    }
    scratch.scores.assign((size_t)group * padded, -INFINITY);
    float* scores = scratch.scores.data();
    const float* q = p.q + ((int64_t)b * p.heads + (int64_t)g * group) * d;
    for (int t = 0; t < n; t++) {  // each key row read once, for every head of the group
        if (t + kAhead < n) prefetch_row(scratch.keys[t + kAhead], d);
        const T* k = scratch.keys[t];
        for (int h = 0; h < group; h++) scores[(size_t)h * padded + t] = dot(q + h * d, k, d) * p.scale;
    }
    std::vector<float>& inv = scratch.inv;
    inv.resize(group);
    for (int h = 0; h < group; h++) {
        float* s = scores + (size_t)h * padded;
        __m256 top = _mm256_set1_ps(-INFINITY);
        for (int t = 0; t < padded; t += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + t));
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, top);
        const __m256 peak = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
        __m256 total = _mm256_setzero_ps();
        for (int t = 0; t < padded; t += 8) {
            const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), peak));
            _mm256_storeu_ps(s + t, e);
            total = _mm256_add_ps(total, e);
        }
        inv[h] = 1.0f / hsum(total);
    }
    float* out = p.out + ((int64_t)b * p.heads + (int64_t)g * group) * d;
    for (int h0 = 0; h0 < group; h0 += 8) {
        const int hs = std::min(8, group - h0);
        const float* s[8];
        float* o[8];
        for (int h = 0; h < hs; h++) { s[h] = scores + (size_t)(h0 + h) * padded; o[h] = out + (h0 + h) * d; }
        for (int d0 = 0; d0 < d; d0 += 8) {
            const T* const* vs = scratch.values.data();
            switch (hs) {
                case 1: weighted_values<1>(s, vs, n, d0, d, &inv[h0], o); break;
                case 2: weighted_values<2>(s, vs, n, d0, d, &inv[h0], o); break;
                case 3: weighted_values<3>(s, vs, n, d0, d, &inv[h0], o); break;
                case 4: weighted_values<4>(s, vs, n, d0, d, &inv[h0], o); break;
                case 5: weighted_values<5>(s, vs, n, d0, d, &inv[h0], o); break;
                case 6: weighted_values<6>(s, vs, n, d0, d, &inv[h0], o); break;
                case 7: weighted_values<7>(s, vs, n, d0, d, &inv[h0], o); break;
                default: weighted_values<8>(s, vs, n, d0, d, &inv[h0], o); break;
            }
        }
    }
}

template <typename T>
void attend(const float* q, int batch, int heads, int head_dim, const T* keys, const T* values, int kv_heads,
            const int64_t* tables, int table_width, int block_size, const int64_t* lengths, int window, float scale,
            float* out) {
    const Problem<T> p{q, heads, head_dim, keys, values, kv_heads, tables, table_width, block_size, lengths, window,
                       scale, out};
    const int items = batch * kv_heads;
#pragma omp parallel if (items > 1 && omp_get_max_threads() > 1)
    {
        Scratch<T> scratch;
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < items; item++) one(p, item / kv_heads, item % kv_heads, scratch);
    }
}

}  // namespace

extern "C" {

// q [B, heads, D] float32; keys, values [slots, kv_heads, D]; tables [B, table_width] block ids; lengths
// [B] (each sequence's context, the new token included); window <= 0: none; out [B, heads, D] float32.
// D % 8 == 0. Caches in float32 (paged_decode_attention) or bfloat16 (paged_decode_attention_bf16).
void paged_decode_attention(const float* q, int batch, int heads, int head_dim, const float* keys,
                            const float* values, int kv_heads, const int64_t* tables, int table_width,
                            int block_size, const int64_t* lengths, int window, float scale, float* out) {
    attend(q, batch, heads, head_dim, keys, values, kv_heads, tables, table_width, block_size, lengths, window, scale,
           out);
}

void paged_decode_attention_bf16(const float* q, int batch, int heads, int head_dim, const uint16_t* keys,
                                 const uint16_t* values, int kv_heads, const int64_t* tables, int table_width,
                                 int block_size, const int64_t* lengths, int window, float scale, float* out) {
    attend(q, batch, heads, head_dim, keys, values, kv_heads, tables, table_width, block_size, lengths, window, scale,
           out);
}

}  // extern "C"
