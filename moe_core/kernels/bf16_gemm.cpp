// y[M, N] = x[M, K] . W[N, K]^T (+ bias), bfloat16 rows, weights and output, float32 accumulation, with
// AVX512-BF16's pair dot product (vdpbf16ps): the GEMMs of a bfloat16 model on CPUs that have it.
//
// W is packed once into panels of 16 output columns whose k run in pairs, wp[N / 16][K / 2][16][2] (the
// last panel zero-padded), so one 64-byte line holds two k of 16 columns: exactly one vdpbf16ps operand.
// A block of up to 8 rows and 3 panels keeps 24 accumulators in registers; each row's pair (x[k], x[k+1])
// is broadcast as one 32-bit word. Each output element is one accumulator's k-ordered chain of pair dot
// products, so a row's result is the same bits whatever the number of rows beside it in the call and
// whatever the number of threads (the expert-output cache relies on the first). The accumulator is
// rounded to bfloat16 once, to nearest even, as oneDNN and torch round a float32 result.
//
// Threads split the panel groups (each streams its own part of W, once, however many rows) on the OpenMP
// runtime torch loaded (see panel_gemm.cpp).

#include <immintrin.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

namespace {

constexpr int kPanel = 16;
constexpr int kRows = 8;    // rows per block: 8 x 3 accumulators + 3 weight lines + 1 broadcast of 32 zmm
constexpr int kPanels = 3;  // panels per block
constexpr long kSerialWork = 1L << 17;  // multiply-adds below which a parallel region costs more than it saves

template <int MR, int NR>
inline __attribute__((always_inline)) void block(const uint16_t* __restrict x, long ldx, int pairs,
                                                 const uint16_t* __restrict w, long panel_stride,
                                                 const float* __restrict bias, uint16_t* __restrict y, long ldy,
                                                 int last_cols) {
    __m512 acc[MR][NR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    for (int k = 0; k < pairs; k++) {
        __m512bh wv[NR];
#pragma GCC unroll 3
        for (int j = 0; j < NR; j++)
            wv[j] = (__m512bh)_mm512_loadu_si512(w + j * panel_stride + (long)k * 2 * kPanel);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            int32_t pair;
            memcpy(&pair, x + i * ldx + 2 * k, sizeof pair);
            const __m512bh xi = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 3
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xi, wv[j]);
        }
    }
#pragma GCC unroll 3
    for (int j = 0; j < NR; j++) {
        const int cols = j == NR - 1 ? last_cols : kPanel;
        const __mmask16 mask = cols == kPanel ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1);
        const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, bias + j * kPanel);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            const __m512 v = bias == nullptr ? acc[i][j] : _mm512_add_ps(acc[i][j], b);
            const __m256i out = (__m256i)_mm512_cvtneps_pbh(v);
            _mm256_mask_storeu_epi16(y + i * ldy + j * kPanel, mask, out);
        }
    }
}

template <int NR>
inline void rows_block(int mr, const uint16_t* x, long ldx, int pairs, const uint16_t* w, long panel_stride,
                       const float* bias, uint16_t* y, long ldy, int last_cols) {
    switch (mr) {
        case 1: block<1, NR>(x, ldx, pairs, w, panel_stride, bias, y, ldy, last_cols); break;
        case 2: block<2, NR>(x, ldx, pairs, w, panel_stride, bias, y, ldy, last_cols); break;
        case 3: block<3, NR>(x, ldx, pairs, w, panel_stride, bias, y, ldy, last_cols); break;
        case 4: block<4, NR>(x, ldx, pairs, w, panel_stride, bias, y, ldy, last_cols); break;
        case 5: block<5, NR>(x, ldx, pairs, w, panel_stride, bias, y, ldy, last_cols); break;
        case 6: block<6, NR>(x, ldx, pairs, w, panel_stride, bias, y, ldy, last_cols); break;
        case 7: block<7, NR>(x, ldx, pairs, w, panel_stride, bias, y, ldy, last_cols); break;
        default: block<8, NR>(x, ldx, pairs, w, panel_stride, bias, y, ldy, last_cols); break;
    }
}

// Every row through the panels [p, p + nr) of W.
void group(int p, int nr, const uint16_t* x, long ldx, int M, int K, const uint16_t* wp, const float* bias, int N,
           uint16_t* y, long ldy) {
    const long panel_stride = (long)K * kPanel;
    const uint16_t* w = wp + p * panel_stride;
    const int last_cols = N - (p + nr - 1) * kPanel < kPanel ? N - (p + nr - 1) * kPanel : kPanel;
    const float* b = bias == nullptr ? nullptr : bias + p * kPanel;
    for (int m0 = 0; m0 < M; m0 += kRows) {
        const int mr = M - m0 < kRows ? M - m0 : kRows;
        const uint16_t* xs = x + m0 * ldx;
        uint16_t* ys = y + m0 * ldy + p * kPanel;
        switch (nr) {
            case 1: rows_block<1>(mr, xs, ldx, K / 2, w, panel_stride, b, ys, ldy, last_cols); break;
            case 2: rows_block<2>(mr, xs, ldx, K / 2, w, panel_stride, b, ys, ldy, last_cols); break;
            default: rows_block<3>(mr, xs, ldx, K / 2, w, panel_stride, b, ys, ldy, last_cols); break;
        }
    }
}

}  // namespace

extern "C" {

int bf16_gemm_panel_width() { return kPanel; }

// x: M rows of K bfloat16 (K even), row stride ldx; wp: the packed panels; bias: N float32 or null;
// y: M rows of N bfloat16, row stride ldy.
void bf16_gemm(const uint16_t* x, long ldx, int M, int K, const uint16_t* wp, const float* bias, int N, uint16_t* y,
               long ldy) {
    const int panels = (N + kPanel - 1) / kPanel;
    const int groups = (panels + kPanels - 1) / kPanels;
    const bool parallel = (long)M * N * K >= kSerialWork && omp_get_max_threads() > 1;
#pragma omp parallel for schedule(static) if (parallel)
    for (int g = 0; g < groups; g++) {
        const int p = g * kPanels;
        const int nr = panels - p < kPanels ? panels - p : kPanels;
        group(p, nr, x, ldx, M, K, wp, bias, N, y, ldy);
    }
}

}  // extern "C"
