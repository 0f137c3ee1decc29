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
//
// On CPUs with AMX (`bf16_gemm_set_amx`), K a multiple of 32, the same panels feed AMX tiles instead: 16 k
// pairs of one panel are 16 lines of 64 bytes, exactly one B tile (tdpbf16ps), so nothing is repacked. A
// block is up to 2 x 16 rows (A tiles) by 2 panels (B tiles) in 4 float32 accumulator tiles. Each output
// element is again one accumulator's k-ordered chain, so rows stay independent of their neighbours and of
// the thread count; the bits differ from the pair-dot path's (another instruction), so a process uses one
// path for all its GEMMs. Rows past M in a block of 16 come from a zero-padded copy of the last rows.
//
// `bf16_rms_norm` is the models' RMSNorm over bfloat16 rows in one pass, with no float32 temporaries: torch's
// ops write four of them, each a fresh allocation that a large prefill step pays page faults for.
//
// `bf16_moe` runs one MoE layer's routed experts (moe_core/experts.py) in one call: the grouping of
// (row, expert) pairs, each expert's gate/up GEMM, SwiGLU, down GEMM and gate weight, and the weighted
// sum per row. It computes the same bits as the torch ops it replaces, which cost about 40 us of Python
// and dispatch per expert; built with -ffp-contract=off so that no multiply and add fuse where torch's
// don't.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

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

inline __mmask16 first(int cols) { return cols >= kPanel ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1); }

// float32 -> bfloat16 as torch's vectorised conversion rounds a tensor: to nearest, ties to even, NaN to
// 0xFFFF, denormals kept (vcvtneps2bf16, used for the GEMM's own output, flushes them).
inline __m256i to_bf16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0xFFFF));
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

// act[i, :I] = silu(gu[i, :I]) * gu[i, I:], rounded as torch rounds the bfloat16 tensors of
// `F.silu(gate) * up`: silu in float32 (x / (1 + e^-x)) to bfloat16, the product in float32 to bfloat16.
void swiglu_row(const uint16_t* gu, int I, uint16_t* act) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int c = 0; c < I; c += kPanel) {
        const __mmask16 mask = first(I - c);
        const __m512 gate = widen(_mm256_maskz_loadu_epi16(mask, gu + c));
        const __m512 up = widen(_mm256_maskz_loadu_epi16(mask, gu + I + c));
        const __m512 silu = widen(to_bf16(_mm512_div_ps(gate, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate))))));
        _mm256_mask_storeu_epi16(act + c, mask, to_bf16(_mm512_mul_ps(silu, up)));
    }
}

// acc[:H] += float(y[:H]) * w, the product rounded to float32 before the sum (torch's mul, then index_add_).
void add_weighted(const uint16_t* y, int H, float w, float* acc) {
    const __m512 wv = _mm512_set1_ps(w);
    for (int c = 0; c < H; c += kPanel) {
        const __mmask16 mask = first(H - c);
        const __m512 product = _mm512_mul_ps(widen(_mm256_maskz_loadu_epi16(mask, y + c)), wv);
        _mm512_mask_storeu_ps(acc + c, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, acc + c), product));
    }
}

// ---- AMX ----

bool g_amx = false;  // set by bf16_gemm_set_amx once the kernel granted this process the tile state

constexpr int kTileRows = 16;  // rows of every tile: A rows, B k pairs, C rows
constexpr int kStepK = 32;     // k per A tile (64 bytes of bfloat16)

struct TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Tile state is per thread, and torch's oneDNN kernels load their own on the same threads: every thread
// loads ours before a run of blocks and releases it after.
inline void amx_begin() {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = kTileRows;
    }
    _tile_loadconfig(&cfg);
}

// C tiles 0-3 (row tile i, panel j at 2i + j), A tiles 4-5, B tiles 6-7. x: MR x 16 rows of K, all readable;
// w: the first of NR panels; c: the float32 results, MR x 16 rows of NR x 16.
template <int MR, int NR>
inline __attribute__((always_inline)) void amx_block(const uint16_t* x, long ldx, int steps, const uint16_t* w,
                                                     long panel_stride, float* c) {
    _tile_zero(0);
    if (NR > 1) _tile_zero(1);
    if (MR > 1) _tile_zero(2);
    if (MR > 1 && NR > 1) _tile_zero(3);
    const long xstride = ldx * (long)sizeof(uint16_t);
    for (int s = 0; s < steps; s++) {
        const uint16_t* ws = w + (long)s * kTileRows * 2 * kPanel;
        _tile_loadd(6, ws, 64);
        if (NR > 1) _tile_loadd(7, ws + panel_stride, 64);
        _tile_loadd(4, x + (long)s * kStepK, xstride);
        _tile_dpbf16ps(0, 4, 6);
        if (NR > 1) _tile_dpbf16ps(1, 4, 7);
        if (MR > 1) {
            _tile_loadd(5, x + kTileRows * ldx + (long)s * kStepK, xstride);
            _tile_dpbf16ps(2, 5, 6);
            if (NR > 1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    const long ldc = NR * kPanel * (long)sizeof(float);
    _tile_stored(0, c, ldc);
    if (NR > 1) _tile_stored(1, c + kPanel, ldc);
    if (MR > 1) _tile_stored(2, c + kTileRows * NR * kPanel, ldc);
    if (MR > 1 && NR > 1) _tile_stored(3, c + kTileRows * NR * kPanel + kPanel, ldc);
}

// Rows [m0, m0 + mr) of panels [p, p + nr): x points at row m0 (or at its padded copy).
void amx_rows(int mr, int nr, int p, const uint16_t* x, long ldx, int K, const uint16_t* wp, const float* bias,
              int N, uint16_t* y, long ldy, float* c) {
    const long panel_stride = (long)K * kPanel;
    const uint16_t* w = wp + p * panel_stride;
    const int tiles = mr > kTileRows ? 2 : 1;
    const int steps = K / kStepK;
    if (tiles == 2)
        nr == 2 ? amx_block<2, 2>(x, ldx, steps, w, panel_stride, c) : amx_block<2, 1>(x, ldx, steps, w, panel_stride, c);
    else
        nr == 2 ? amx_block<1, 2>(x, ldx, steps, w, panel_stride, c) : amx_block<1, 1>(x, ldx, steps, w, panel_stride, c);
    for (int j = 0; j < nr; j++) {
        const int col = (p + j) * kPanel;
        const __mmask16 mask = first(N - col);
        const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, bias + col);
        for (int i = 0; i < mr; i++) {
            const __m512 acc = _mm512_loadu_ps(c + (long)i * nr * kPanel + j * kPanel);
            const __m512 v = bias == nullptr ? acc : _mm512_add_ps(acc, b);
            _mm256_mask_storeu_epi16(y + i * ldy + col, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

void amx_gemm(const uint16_t* x, long ldx, int M, int K, const uint16_t* wp, const float* bias, int N, uint16_t* y,
              long ldy) {
    constexpr int kBlock = 2 * kTileRows;
    const int full = M / kTileRows * kTileRows;  // rows read in place
    const int tail = M - full;
    uint16_t* pad = nullptr;
    if (tail) {  // the last rows, zero-padded to a whole tile
        pad = new uint16_t[(long)kTileRows * K]();
        for (int i = 0; i < tail; i++) memcpy(pad + (long)i * K, x + (long)(full + i) * ldx, K * sizeof(uint16_t));
    }
    const int panels = (N + kPanel - 1) / kPanel;
    const int pairs = (panels + 1) / 2;
    const bool parallel = (long)M * N * K >= kSerialWork && omp_get_max_threads() > 1;
#pragma omp parallel if (parallel)
    {
        alignas(64) float c[kBlock * 2 * kPanel];
        amx_begin();
#pragma omp for schedule(static)
        for (int g = 0; g < pairs; g++) {
            const int p = 2 * g;
            const int nr = panels - p < 2 ? 1 : 2;
            for (int m0 = 0; m0 < full; m0 += kBlock) {
                const int mr = full - m0 < kBlock ? full - m0 : kBlock;
                amx_rows(mr, nr, p, x + (long)m0 * ldx, ldx, K, wp, bias, N, y + (long)m0 * ldy, ldy, c);
            }
            if (tail) amx_rows(tail, nr, p, pad, K, K, wp, bias, N, y + (long)full * ldy, ldy, c);
        }
        _tile_release();
    }
    delete[] pad;
}

}  // namespace

extern "C" {

int bf16_gemm_panel_width() { return kPanel; }

// Whether this process's GEMMs run on AMX tiles: on = 1 asks the kernel for the tile state (Linux's
// arch_prctl; refused on CPUs without AMX and on kernels before 5.16), on = 0 goes back to the pair dot,
// on = -1 changes nothing. Returns whether AMX is now in use. Change it before any GEMM runs, not while one
// does.
int bf16_gemm_set_amx(int on) {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (on >= 0) g_amx = on && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
    return g_amx;
}

// x: M rows of K bfloat16 (K even), row stride ldx; wp: the packed panels; bias: N float32 or null;
// y: M rows of N bfloat16, row stride ldy.
void bf16_gemm(const uint16_t* x, long ldx, int M, int K, const uint16_t* wp, const float* bias, int N, uint16_t* y,
               long ldy) {
    if (g_amx && K % kStepK == 0) return amx_gemm(x, ldx, M, K, wp, bias, N, y, ldy);
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

// One MoE layer's routed experts over T rows x[T, H] (row stride ldx): ids and weights [T, k] (int64 global
// expert ids, -1 for an empty slot; float32 gate weights); local_of[known] maps a global id to this
// process's expert index (-1: not held); gate_up[e] packs expert e's [2I, H] weight, down[e] its [H, I].
// out[T, H] (bfloat16) gets each row's sum over its pairs, in expert order, of the expert's output times
// the gate weight, accumulated in float32 from zero; counts[E] each expert's pairs. Returns 0, or -1
// (nothing written) when a row names an expert not held here.
int bf16_moe(const uint16_t* x, long ldx, int T, int H, int I, int k, const int64_t* ids, const float* weights,
             const int64_t* local_of, int known, int E, const uint16_t* const* gate_up,
             const uint16_t* const* down, uint16_t* out, int64_t* counts) {
    const long pairs = (long)T * k;
    for (int e = 0; e < E; e++) counts[e] = 0;
    for (long p = 0; p < pairs; p++) {
        const int64_t id = ids[p];
        if (id < 0) continue;
        if (id >= known || local_of[id] < 0) return -1;
        counts[local_of[id]]++;
    }
    // pair positions grouped by expert, in position order within each (a stable counting sort)
    long* order = new long[pairs > 0 ? pairs : 1];
    long* start = new long[E + 1];
    start[0] = 0;
    long widest = 0;
    for (int e = 0; e < E; e++) {
        start[e + 1] = start[e] + counts[e];
        if (counts[e] > widest) widest = counts[e];
    }
    long* next = new long[E];
    for (int e = 0; e < E; e++) next[e] = start[e];
    for (long p = 0; p < pairs; p++)
        if (ids[p] >= 0) order[next[local_of[ids[p]]]++] = p;
    float* acc = new float[(long)T * H]();
    uint16_t* xs = new uint16_t[widest * H + 1];
    uint16_t* gu = new uint16_t[widest * 2 * I + 1];
    uint16_t* act = new uint16_t[widest * I + 1];
    uint16_t* y = new uint16_t[widest * H + 1];
    const bool parallel_rows = widest * I >= (1L << 15) && omp_get_max_threads() > 1;
    for (int e = 0; e < E; e++) {
        const int m = (int)counts[e];
        if (m == 0) continue;
        const long* mine = order + start[e];
        for (int i = 0; i < m; i++) memcpy(xs + (long)i * H, x + (mine[i] / k) * ldx, H * sizeof(uint16_t));
        bf16_gemm(xs, H, m, H, gate_up[e], nullptr, 2 * I, gu, 2 * I);
#pragma omp parallel for schedule(static) if (parallel_rows)
        for (int i = 0; i < m; i++) swiglu_row(gu + (long)i * 2 * I, I, act + (long)i * I);
        bf16_gemm(act, I, m, I, down[e], nullptr, H, y, H);
        for (int i = 0; i < m; i++) add_weighted(y + (long)i * H, H, weights[mine[i]], acc + (mine[i] / k) * H);
    }
    const long n = (long)T * H;
#pragma omp parallel for schedule(static) if (n >= (1L << 16) && omp_get_max_threads() > 1)
    for (long c = 0; c < n; c += kPanel) {
        const __mmask16 mask = first((int)(n - c < kPanel ? n - c : kPanel));
        _mm256_mask_storeu_epi16(out + c, mask, to_bf16(_mm512_maskz_loadu_ps(mask, acc + c)));
    }
    delete[] order;
    delete[] start;
    delete[] next;
    delete[] acc;
    delete[] xs;
    delete[] gu;
    delete[] act;
    delete[] y;
    return 0;
}

// y[r, :H] = w * bf16(x[r, :H] / sqrt(mean(x[r]^2) + eps)), as Hugging Face's RMSNorm rounds: the sum of
// squares in float32 (16 lanes, then the lanes' sum: not torch's order, so the last bit of a row's scale
// can differ from torch's), the normalised row rounded to bfloat16, times the weight rounded again. x: rows
// of H bfloat16 with row stride ldx; w: H bfloat16; y: rows x H, contiguous. A row never depends on another.
void bf16_rms_norm(const uint16_t* x, long ldx, int rows, int H, const uint16_t* w, float eps, uint16_t* y) {
#pragma omp parallel for schedule(static) if ((long)rows * H >= (1L << 16) && omp_get_max_threads() > 1)
    for (int r = 0; r < rows; r++) {
        const uint16_t* xr = x + (long)r * ldx;
        uint16_t* yr = y + (long)r * H;
        __m512 squares = _mm512_setzero_ps();
        for (int c = 0; c < H; c += kPanel) {
            const __m512 v = widen(_mm256_maskz_loadu_epi16(first(H - c), xr + c));
            squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
        }
        const float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)H + eps);
        const __m512 s = _mm512_set1_ps(scale);
        for (int c = 0; c < H; c += kPanel) {
            const __mmask16 mask = first(H - c);
            const __m512 normed = widen(to_bf16(_mm512_mul_ps(widen(_mm256_maskz_loadu_epi16(mask, xr + c)), s)));
            const __m512 weight = widen(_mm256_maskz_loadu_epi16(mask, w + c));
            _mm256_mask_storeu_epi16(yr + c, mask, to_bf16(_mm512_mul_ps(weight, normed)));
        }
    }
}

}  // extern "C"
