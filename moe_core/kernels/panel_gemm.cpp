// y[M, N] = x[M, K] . W[N, K]^T (+ bias) with AVX2 and FMA, for the small-row GEMMs of decoding: float32
// rows and output, float32 or bfloat16 weights (bfloat16 halves the bytes a decode step streams; each
// weight is widened to float32 exactly, so only the weights' rounding differs from float32).
//
// W is packed once into panels of 16 output columns, wp[N / 16][K][16] (the last panel zero-padded), so
// the inner loop streams one 64-byte line of weights per k and multiplies it into up to 6 rows held in
// 12 accumulator registers. Each output element is a k-ordered chain of FMAs whose order depends on
// nothing but K: a row's result is the same bits whatever the number of rows beside it in the call, and
// whatever the number of threads (the expert-output cache relies on the first).
//
// Threads split the panels (each thread streams its own contiguous part of W) on the OpenMP runtime of
// the process: torch's, whose libgomp.so.1 this library binds to at load, so torch.set_num_threads on
// the calling thread sets the team here too.

#include <immintrin.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>

namespace {

constexpr int kPanel = 16;
constexpr int kRowsPerBlock = 6;  // 12 accumulators + 2 weight vectors + 1 broadcast of the 16 ymm registers
constexpr long kSerialWork = 1L << 17;  // multiply-adds below which a parallel region costs more than it saves

// 8 weights of a panel row as float32: float32 as they are, bfloat16 widened (its bits are float32's top half).
inline __m256 load8(const float* w) { return _mm256_load_ps(w); }
inline __m256 load8(const uint16_t* w) {
    const __m128i bits = _mm_load_si128(reinterpret_cast<const __m128i*>(w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

template <int MR, bool kPrefetchNext, typename W>
inline __attribute__((always_inline)) void block(const float* __restrict x, long ldx, int K,
                                                 const W* __restrict w, const float* __restrict bias,
                                                 float* __restrict y, long ldy, int ncols) {
    __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) { lo[i] = _mm256_setzero_ps(); hi[i] = _mm256_setzero_ps(); }
    for (int k = 0; k < K; k++) {
        // The first row block pulls the next panel towards L2 while it streams this one from memory,
        // so the later row blocks of that panel find it near.
        if (kPrefetchNext) _mm_prefetch(reinterpret_cast<const char*>(w + (long)K * kPanel + k * kPanel), _MM_HINT_T1);
        const __m256 w_lo = load8(w + k * kPanel), w_hi = load8(w + k * kPanel + 8);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            const __m256 xi = _mm256_broadcast_ss(x + i * ldx + k);
            lo[i] = _mm256_fmadd_ps(xi, w_lo, lo[i]);
            hi[i] = _mm256_fmadd_ps(xi, w_hi, hi[i]);
        }
    }
    if (bias != nullptr) {
        alignas(32) float b[kPanel] = {};
        for (int j = 0; j < ncols; j++) b[j] = bias[j];
        const __m256 b_lo = _mm256_load_ps(b), b_hi = _mm256_load_ps(b + 8);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) { lo[i] = _mm256_add_ps(lo[i], b_lo); hi[i] = _mm256_add_ps(hi[i], b_hi); }
    }
    if (ncols == kPanel) {
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            _mm256_storeu_ps(y + i * ldy, lo[i]);
            _mm256_storeu_ps(y + i * ldy + 8, hi[i]);
        }
    } else {  // the last, partial panel
        alignas(32) float out[MR][kPanel];
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) { _mm256_store_ps(out[i], lo[i]); _mm256_store_ps(out[i] + 8, hi[i]); }
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < ncols; j++) y[i * ldy + j] = out[i][j];
    }
}

template <bool kPrefetchNext, typename W>
inline void rows_block(int mr, const float* x, long ldx, int K, const W* w, const float* bias, float* y,
                       long ldy, int ncols) {
    switch (mr) {
        case 1: block<1, kPrefetchNext, W>(x, ldx, K, w, bias, y, ldy, ncols); break;
        case 2: block<2, kPrefetchNext, W>(x, ldx, K, w, bias, y, ldy, ncols); break;
        case 3: block<3, kPrefetchNext, W>(x, ldx, K, w, bias, y, ldy, ncols); break;
        case 4: block<4, kPrefetchNext, W>(x, ldx, K, w, bias, y, ldy, ncols); break;
        case 5: block<5, kPrefetchNext, W>(x, ldx, K, w, bias, y, ldy, ncols); break;
        default: block<6, kPrefetchNext, W>(x, ldx, K, w, bias, y, ldy, ncols); break;
    }
}

template <typename W>
void panel(int p, const float* x, long ldx, int M, int K, const W* wp, const float* bias, int N, int panels,
           float* y, long ldy) {
    const W* w = wp + (long)p * K * kPanel;
    const int ncols = N - p * kPanel < kPanel ? N - p * kPanel : kPanel;
    const float* b = bias == nullptr ? nullptr : bias + p * kPanel;
    const bool prefetch = M > kRowsPerBlock && p + 1 < panels;
    for (int m0 = 0; m0 < M; m0 += kRowsPerBlock) {
        const int mr = M - m0 < kRowsPerBlock ? M - m0 : kRowsPerBlock;
        const float* xs = x + m0 * ldx;
        float* ys = y + m0 * ldy + p * kPanel;
        if (prefetch && m0 == 0) rows_block<true>(mr, xs, ldx, K, w, b, ys, ldy, ncols);
        else rows_block<false>(mr, xs, ldx, K, w, b, ys, ldy, ncols);
    }
}

template <typename W>
void gemm(const float* x, long ldx, int M, int K, const W* wp, const float* bias, int N, float* y, long ldy) {
    const int panels = (N + kPanel - 1) / kPanel;
    const bool parallel = (long)M * N * K >= kSerialWork && omp_get_max_threads() > 1;
#pragma omp parallel for schedule(static) if (parallel)
    for (int p = 0; p < panels; p++) panel(p, x, ldx, M, K, wp, bias, N, panels, y, ldy);
}

}  // namespace

extern "C" {

int panel_gemm_panel_width() { return kPanel; }

void panel_gemm(const float* x, long ldx, int M, int K, const float* wp, const float* bias, int N, float* y, long ldy) {
    gemm(x, ldx, M, K, wp, bias, N, y, ldy);
}

// wp: bfloat16 panels, as the float32 ones (16-bit elements).
void panel_gemm_bf16(const float* x, long ldx, int M, int K, const uint16_t* wp, const float* bias, int N, float* y,
                     long ldy) {
    gemm(x, ldx, M, K, wp, bias, N, y, ldy);
}

}  // extern "C"
