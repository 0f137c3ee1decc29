// y[M, N] = x[M, K] . W[N, K]^T (+ bias), bfloat16 rows, weights and output, float32 accumulation, with
// AVX512-BF16's pair dot product (vdpbf16ps): the GEMMs of a bfloat16 model on CPUs that have it.
//
// W is packed once into panels of 16 output columns whose k run in pairs, wp[N / 16][K / 2][16][2] (the
// last panel zero-padded), so one 64-byte line holds two k of 16 columns: exactly one vdpbf16ps operand.
// A block of up to 8 rows and 3 panels keeps 24 accumulators in registers; each row's pair (x[k], x[k+1])
// is broadcast as one 32-bit word. Each output element is one accumulator's k-ordered chain of pair dot
// products, so a row's result is the same bits whatever the number of rows beside it in the call and
// whatever the number of threads (the expert-output cache relies on the first). The accumulator is
// rounded to bfloat16 once, to nearest even, as torch rounds a float32 result (denormals kept).
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

// acc[i][j] = the k-ordered pair dot products of row i with panel j (panels panel_stride elements apart).
template <int MR, int NR>
inline __attribute__((always_inline)) void accumulate(const uint16_t* __restrict x, long ldx, int pairs,
                                                      const uint16_t* __restrict w, long panel_stride,
                                                      __m512 (&acc)[MR][NR]) {
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
}

inline __mmask16 first(int cols) { return cols >= kPanel ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1); }

// float32 -> bfloat16 as torch rounds (c10's round_to_nearest_even): to nearest, ties to even, NaN to a
// quiet NaN, and denormals kept (vcvtneps2bf16 would flush them to zero).
inline __m256i to_bf16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(rounded);
}

// bfloat16 -> float32: the bits moved up, exactly.
inline __m512 widen(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

// e^a for float32 lanes, step for step as SLEEF's expf (the u10 variant torch's vectorised exp calls): a =
// q ln 2 + s, e^s from a degree-7 polynomial, times 2^q; 0 below -104, inf above 104. Inputs are clamped
// first so that q stays finite (an infinite input would give inf - inf in s); NaN stays NaN.
inline __m512 exp_ps(__m512 a) {
    const __m512 d = _mm512_min_ps(_mm512_max_ps(a, _mm512_set1_ps(-105.0f)), _mm512_set1_ps(105.0f));
    const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(1.442695040888963407359924681001892137f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 s = _mm512_fmadd_ps(q, _mm512_set1_ps(-0.693145751953125f), d);
    s = _mm512_fmadd_ps(q, _mm512_set1_ps(-1.428606765330187045e-06f), s);
    __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
    u = _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, _mm512_add_ps(s, _mm512_set1_ps(1.0f)));
    u = _mm512_scalef_ps(u, q);
    u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(-104.0f), _CMP_LT_OQ), u, _mm512_setzero_ps());
    u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(104.0f), _CMP_GT_OQ), u,
                             _mm512_set1_ps(__builtin_inff()));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), u, a);  // NaN in, NaN out
}

template <int MR, int NR>
inline __attribute__((always_inline)) void block(const uint16_t* __restrict x, long ldx, int pairs,
                                                 const uint16_t* __restrict w, long panel_stride,
                                                 const float* __restrict bias, uint16_t* __restrict y, long ldy,
                                                 int last_cols) {
    __m512 acc[MR][NR];
    accumulate<MR, NR>(x, ldx, pairs, w, panel_stride, acc);
#pragma GCC unroll 3
    for (int j = 0; j < NR; j++) {
        const __mmask16 mask = first(j == NR - 1 ? last_cols : kPanel);
        const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, bias + j * kPanel);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            const __m512 v = bias == nullptr ? acc[i][j] : _mm512_add_ps(acc[i][j], b);
            _mm256_mask_storeu_epi16(y + i * ldy + j * kPanel, mask, to_bf16(v));
        }
    }
}

// SwiGLU: panel 0 holds 16 gate columns, panel 1 the same 16 up columns; y gets silu(gate) * up, rounded
// as torch rounds the bfloat16 tensors of `F.silu(gate) * up`: gate and up to bfloat16, silu in float32
// (x / (1 + e^-x)) to bfloat16, the product in float32 to bfloat16.
template <int MR>
inline __attribute__((always_inline)) void gated_block(const uint16_t* __restrict x, long ldx, int pairs,
                                                       const uint16_t* __restrict w, long panel_stride,
                                                       uint16_t* __restrict y, long ldy, int cols) {
    __m512 acc[MR][2];
    accumulate<MR, 2>(x, ldx, pairs, w, panel_stride, acc);
    const __mmask16 mask = first(cols);
    const __m512 one = _mm512_set1_ps(1.0f);
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
        const __m512 gate = widen(to_bf16(acc[i][0])), up = widen(to_bf16(acc[i][1]));
        const __m512 silu = widen(to_bf16(_mm512_div_ps(gate, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate))))));
        _mm256_mask_storeu_epi16(y + i * ldy, mask, to_bf16(_mm512_mul_ps(silu, up)));
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

// Every row through gate/up panel pair q: output columns [16q, 16q + 16).
void gated_pair(int q, const uint16_t* x, long ldx, int M, int K, const uint16_t* wp, int N, uint16_t* y, long ldy) {
    const long panel_stride = (long)K * kPanel;
    const uint16_t* w = wp + 2L * q * panel_stride;
    const int cols = N - q * kPanel < kPanel ? N - q * kPanel : kPanel;
    for (int m0 = 0; m0 < M; m0 += kRows) {
        const int mr = M - m0 < kRows ? M - m0 : kRows;
        const uint16_t* xs = x + m0 * ldx;
        uint16_t* ys = y + m0 * ldy + q * kPanel;
        switch (mr) {
            case 1: gated_block<1>(xs, ldx, K / 2, w, panel_stride, ys, ldy, cols); break;
            case 2: gated_block<2>(xs, ldx, K / 2, w, panel_stride, ys, ldy, cols); break;
            case 3: gated_block<3>(xs, ldx, K / 2, w, panel_stride, ys, ldy, cols); break;
            case 4: gated_block<4>(xs, ldx, K / 2, w, panel_stride, ys, ldy, cols); break;
            case 5: gated_block<5>(xs, ldx, K / 2, w, panel_stride, ys, ldy, cols); break;
            case 6: gated_block<6>(xs, ldx, K / 2, w, panel_stride, ys, ldy, cols); break;
            case 7: gated_block<7>(xs, ldx, K / 2, w, panel_stride, ys, ldy, cols); break;
            default: gated_block<8>(xs, ldx, K / 2, w, panel_stride, ys, ldy, cols); break;
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

// SwiGLU's first half: y[M, N] = silu(x . G^T) * (x . U^T) for a [2N, K] gate/up weight packed with its
// gate and up panels interleaved (G's panel q, then U's panel q).
void bf16_gemm_swiglu(const uint16_t* x, long ldx, int M, int K, const uint16_t* wp, int N, uint16_t* y, long ldy) {
    const int pairs_of_panels = (N + kPanel - 1) / kPanel;
    const bool parallel = 2L * M * N * K >= kSerialWork && omp_get_max_threads() > 1;
#pragma omp parallel for schedule(static) if (parallel)
    for (int q = 0; q < pairs_of_panels; q++) gated_pair(q, x, ldx, M, K, wp, N, y, ldy);
}

}  // extern "C"
