/* Products over packed weights on CPU, float32: a Linear's product for any number of rows, and
 * a decoding step of one or more sequences, one transformer block per call. See cpu_kernels.py for why this
 * is C and how it is built and loaded.
 *
 * A Linear's weight (n_out, n_in) is stored as panels of PANEL output columns: (panels, n_in, PANEL),
 * panels = ceil(n_out / PANEL), the last one padded with zeros. Input i's weights for a panel's
 * sixteen outputs are one 64-byte run, so a product broadcasts x[r][i], multiplies it by those
 * weights and adds the result to sixteen sums held in registers: no horizontal sums, the weights
 * read in order, each weight vector used for every row of a tile while it sits in a register. A
 * tile of TILE_ROWS rows and TILE_PANELS panels fills the registers with sums (16 ymm registers
 * with AVX2, 32 zmm with AVX-512). A lone row (a lone stream's step) takes LONE_PANELS panels at
 * a time: as many independent sums as keep up with memory.
 *
 * Weights may also stay int8 in memory (precision "q8"): the same panels hold int8 weights, and
 * each run of QK = 32 inputs of a panel has sixteen float scales, one an output (as GGUF's Q8_0,
 * a scale per 32 weights of an output). A tile loads sixteen int8 weights, widens them to floats
 * and multiplies them by their scales in registers, then goes on as with float weights: a
 * quarter of the bytes to read, for a few more instructions a weight vector. Precision "q4" keeps
 * four bits a weight (as GGUF's Q4_1: a scale d and a minimum m per 32 inputs of an output, a
 * weight is m + d q, q in 0..15): an input's sixteen weights of a panel are eight bytes, byte i
 * holding lane i in its low four bits and lane i + 8 in its high four.
 *
 * Row by row, as the weights' (n_out, n_in) layout asks, each output is a dot product whose
 * vector of sums ends in a horizontal sum, and a batch's rows each load every weight again;
 * torch's compiler gave each row one accumulator, a chain of dependent additions that capped a
 * core at 24-28 GB/s even from the cache (measured).
 */
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { PANEL = 16 };
#ifdef __AVX512F__
enum { TILE_ROWS = 8, TILE_PANELS = 2, FEW_PANELS = 4, LANES = 16 };
#else
enum { TILE_ROWS = 6, TILE_PANELS = 1, FEW_PANELS = 2, LANES = 8 };
#endif
enum { LONE_PANELS = 4, MOST_PANELS = 4, PER_PANEL = PANEL / LANES };
typedef float vec __attribute__((vector_size(LANES * 4)));
typedef int8_t bytes __attribute__((vector_size(LANES))); /* LANES int8 weights, widened to a vec */
enum { QK = 32 }; /* inputs that share one scale an output */

/* A Linear's packed weight: float panels f; or int8 panels q (panels, groups, QK, PANEL) with their
 * scales s (panels, groups, PANEL); or four-bit panels q4 (panels, groups, QK, PANEL / 2) with
 * scales s and minimums m (panels, groups, PANEL). groups = ceil(n_in / QK), the last one padded. */
typedef struct {
    const float *f;
    const int8_t *q;
    const float *s;
    const uint8_t *q4;
    const float *m;
} Mat;

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

/* LANES int8 weights at p as floats: sign-extend, convert (gcc's generic conversion of a byte
 * vector goes element by element, so x86 takes the two instructions by name) */
static inline vec widen(const int8_t *p) {
#if defined(__AVX512F__)
    return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    bytes b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vec);
#endif
}

/* The four-bit weights of one input of a panel at p (eight bytes) as floats: all sixteen lanes
 * with AVX-512; lanes 0-7 (part 0) or 8-15 (part 1) with eight lanes a vector. */
static inline vec widen4(const uint8_t *p, int part) {
#if defined(__AVX512F__)
    (void)part;
    const __m128i b = _mm_loadl_epi64((const __m128i *)p), low = _mm_set1_epi8(0x0F);
    const __m128i q = _mm_unpacklo_epi64(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
    return (vec)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
#elif defined(__AVX2__)
    const __m128i b = _mm_loadl_epi64((const __m128i *)p), low = _mm_set1_epi8(0x0F);
    const __m128i q = part ? _mm_and_si128(_mm_srli_epi16(b, 4), low) : _mm_and_si128(b, low);
    return (vec)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
#else
    vec v;
    for (int i = 0; i < LANES; i++) {
        const int lane = part * LANES + i;
        v[i] = (float)(lane < PANEL / 2 ? p[lane] & 0x0F : p[lane - PANEL / 2] >> 4);
    }
    return v;
#endif
}

static inline vec splat(float s) { /* a constructor of equal elements: one broadcast instruction */
#ifdef __AVX512F__
    return (vec){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
#else
    return (vec){s, s, s, s, s, s, s, s};
#endif
}

/* a . b over n floats: attention's scores */
static float dot(const float *a, const float *b, int64_t n) {
    vec sums = splat(0.0f);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) sums += load(a + i) * load(b + i);
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += sums[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

enum { STORE, ADD, GELU }; /* y = x W^T + b;  y += x W^T + b;  y = gelu_tanh(x W^T + b) */

/* tanh(u) as Eigen's rational approximation (odd degree 13 over even degree 6, on [-9, 9]): within
 * a few ulp of tanhf, and plain arithmetic that the compiler vectorizes; tanhf is a call per
 * element (with it, the shipped model's 16-row step took 1.90 ms instead of 1.14). */
static inline float tanh_rational(float u) {
    u = u < -9.0f ? -9.0f : u > 9.0f ? 9.0f : u;
    const float u2 = u * u;
    float p = -2.76076847742355e-16f;
    p = p * u2 + 2.00018790482477e-13f;
    p = p * u2 - 8.60467152213735e-11f;
    p = p * u2 + 5.12229709037114e-08f;
    p = p * u2 + 1.48572235717979e-05f;
    p = p * u2 + 6.37261928875436e-04f;
    p = p * u2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * u2 + 1.18534705686654e-04f;
    q = q * u2 + 2.26843463243900e-03f;
    q = q * u2 + 4.89352518554385e-03f;
    return u * p / q;
}

/* y[0..n) gets (or, ADD, adds) value[c] + b[c] (b NULL: none), through GELU where how says: loops
 * the compiler vectorizes. */
static void put(float *y, const float *value, const float *b, int64_t n, int how) {
    if (how == ADD) {
        for (int64_t c = 0; c < n; c++) y[c] += value[c] + (b ? b[c] : 0.0f);
    } else if (how == GELU) {
        for (int64_t c = 0; c < n; c++) {
            const float u = value[c] + (b ? b[c] : 0.0f);
            y[c] = 0.5f * u * (1.0f + tanh_rational(0.7978845608028654f * (u + 0.044715f * u * u * u)));
        }
    } else {
        for (int64_t c = 0; c < n; c++) y[c] = value[c] + (b ? b[c] : 0.0f);
    }
}

/* x's MR rows (ldx apart) times NP panels from p (n_in * PANEL floats apart) into out[r][j*PANEL + c]. */
#define TILE(MR, NP)                                                                                    \
    static void tile_##MR##_##NP(const float *x, int64_t ldx, const float *p, int64_t n_in,             \
                                 float out[][MOST_PANELS * PANEL]) {                                    \
        enum { V = NP * PER_PANEL };                                                                    \
        vec acc[MR][V];                                                                                 \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int j = 0; j < V; j++) acc[r][j] = splat(0.0f);                                        \
        for (int64_t k = 0; k < n_in; k++) {                                                            \
            vec w[V];                                                                                   \
            for (int j = 0; j < V; j++)                                                                 \
                w[j] = load(p + (j / PER_PANEL * n_in + k) * PANEL + j % PER_PANEL * LANES);            \
            for (int r = 0; r < MR; r++) {                                                              \
                const vec xb = splat(x[r * ldx + k]);                                                   \
                for (int j = 0; j < V; j++) acc[r][j] += xb * w[j];                                     \
            }                                                                                           \
        }                                                                                               \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int j = 0; j < V; j++) memcpy(out[r] + j * LANES, &acc[r][j], sizeof acc[r][j]);       \
    }
/* Every tile packed_rows takes: TILE_ROWS rows or fewer, by TILE_PANELS panels or one (the last
 * of an odd count); two or three rows by FEW_PANELS; one row by LONE_PANELS. */
/* As TILE, over int8 panels q with their scales sc (see Mat): each group's weight vectors are widened
 * and scaled once, then used for every row of the tile. */
#define QTILE(MR, NP)                                                                                   \
    static void qtile_##MR##_##NP(const float *x, int64_t ldx, const int8_t *q, const float *sc,        \
                                  int64_t n_in, float out[][MOST_PANELS * PANEL]) {                     \
        enum { V = NP * PER_PANEL };                                                                    \
        const int64_t groups = (n_in + QK - 1) / QK;                                                    \
        vec acc[MR][V];                                                                                 \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int j = 0; j < V; j++) acc[r][j] = splat(0.0f);                                        \
        for (int64_t g = 0; g < groups; g++) {                                                          \
            vec scale[V];                                                                               \
            for (int j = 0; j < V; j++)                                                                 \
                scale[j] = load(sc + (j / PER_PANEL * groups + g) * PANEL + j % PER_PANEL * LANES);     \
            const int64_t k0 = g * QK, kn = n_in - k0 < QK ? n_in - k0 : QK;                            \
            for (int64_t k = 0; k < kn; k++) {                                                          \
                vec w[V];                                                                               \
                for (int j = 0; j < V; j++)                                                             \
                    w[j] = widen(q + ((j / PER_PANEL * groups + g) * QK + k) * PANEL                    \
                                 + j % PER_PANEL * LANES) * scale[j];                                   \
                for (int r = 0; r < MR; r++) {                                                          \
                    const vec xb = splat(x[r * ldx + k0 + k]);                                          \
                    for (int j = 0; j < V; j++) acc[r][j] += xb * w[j];                                 \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int j = 0; j < V; j++) memcpy(out[r] + j * LANES, &acc[r][j], sizeof acc[r][j]);       \
    }
/* As QTILE, over four-bit panels q4 with their scales sc and minimums mn. */
#define Q4TILE(MR, NP)                                                                                  \
    static void q4tile_##MR##_##NP(const float *x, int64_t ldx, const uint8_t *q4, const float *sc,     \
                                   const float *mn, int64_t n_in, float out[][MOST_PANELS * PANEL]) {   \
        enum { V = NP * PER_PANEL };                                                                    \
        const int64_t groups = (n_in + QK - 1) / QK;                                                    \
        vec acc[MR][V];                                                                                 \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int j = 0; j < V; j++) acc[r][j] = splat(0.0f);                                        \
        for (int64_t g = 0; g < groups; g++) {                                                          \
            vec scale[V], least[V];                                                                     \
            for (int j = 0; j < V; j++) {                                                               \
                const int64_t at = (j / PER_PANEL * groups + g) * PANEL + j % PER_PANEL * LANES;        \
                scale[j] = load(sc + at);                                                               \
                least[j] = load(mn + at);                                                               \
            }                                                                                           \
            const int64_t k0 = g * QK, kn = n_in - k0 < QK ? n_in - k0 : QK;                            \
            for (int64_t k = 0; k < kn; k++) {                                                          \
                vec w[V];                                                                               \
                for (int j = 0; j < V; j++)                                                             \
                    w[j] = widen4(q4 + ((j / PER_PANEL * groups + g) * QK + k) * (PANEL / 2), j % PER_PANEL) \
                           * scale[j] + least[j];                                                       \
                for (int r = 0; r < MR; r++) {                                                          \
                    const vec xb = splat(x[r * ldx + k0 + k]);                                          \
                    for (int j = 0; j < V; j++) acc[r][j] += xb * w[j];                                 \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int j = 0; j < V; j++) memcpy(out[r] + j * LANES, &acc[r][j], sizeof acc[r][j]);       \
    }
#define TILES(MR, NP) TILE(MR, NP) QTILE(MR, NP) Q4TILE(MR, NP)
TILES(1, 1) TILES(2, 1) TILES(3, 1) TILES(4, 1) TILES(5, 1) TILES(6, 1) TILES(1, 4) TILES(2, 2) TILES(3, 2)
#ifdef __AVX512F__
TILES(7, 1) TILES(8, 1)
TILES(1, 2) TILES(4, 2) TILES(5, 2) TILES(6, 2) TILES(7, 2) TILES(8, 2) TILES(2, 4) TILES(3, 4)
#endif

typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, float[][MOST_PANELS * PANEL]);
typedef void (*qtile_fn)(const float *, int64_t, const int8_t *, const float *, int64_t,
                         float[][MOST_PANELS * PANEL]);
typedef void (*q4tile_fn)(const float *, int64_t, const uint8_t *, const float *, const float *, int64_t,
                          float[][MOST_PANELS * PANEL]);

#ifdef __AVX512F__
#define TILE_TABLES(P)                                                                                  \
    static const P##tile_fn one[] = {P##tile_1_1, P##tile_2_1, P##tile_3_1, P##tile_4_1,              \
                                     P##tile_5_1, P##tile_6_1, P##tile_7_1, P##tile_8_1};              \
    static const P##tile_fn two[] = {P##tile_1_2, P##tile_2_2, P##tile_3_2, P##tile_4_2,              \
                                     P##tile_5_2, P##tile_6_2, P##tile_7_2, P##tile_8_2};              \
    static const P##tile_fn four[] = {P##tile_1_4, P##tile_2_4, P##tile_3_4};                         \
    return np == 1 ? one[mr - 1] : np == 2 ? two[mr - 1] : four[mr - 1];
#else
#define TILE_TABLES(P)                                                                                  \
    static const P##tile_fn one[] = {P##tile_1_1, P##tile_2_1, P##tile_3_1,                            \
                                     P##tile_4_1, P##tile_5_1, P##tile_6_1};                           \
    static const P##tile_fn two[] = {NULL, P##tile_2_2, P##tile_3_2};                                 \
    return np == 1 ? one[mr - 1] : np == 2 ? two[mr - 1] : P##tile_1_4;
#endif

static tile_fn tile_for(int mr, int np) { TILE_TABLES() }
static qtile_fn qtile_for(int mr, int np) { TILE_TABLES(q) }
static q4tile_fn q4tile_for(int mr, int np) { TILE_TABLES(q4) }

/* One tile of mr rows by np panels from panel `first` of w (n_in inputs) into out. */
static void tile(const Mat *w, int64_t first, int mr, int np, const float *x, int64_t ldx, int64_t n_in,
                 float out[][MOST_PANELS * PANEL]) {
    const int64_t groups = (n_in + QK - 1) / QK;
    if (w->q4) {
        q4tile_for(mr, np)(x, ldx, w->q4 + first * groups * QK * (PANEL / 2), w->s + first * groups * PANEL,
                           w->m + first * groups * PANEL, n_in, out);
    } else if (w->q) {
        qtile_for(mr, np)(x, ldx, w->q + first * groups * QK * PANEL, w->s + first * groups * PANEL, n_in, out);
    } else {
        tile_for(mr, np)(x, ldx, w->f + first * n_in * PANEL, n_in, out);
    }
}

/* Panels per tile for m rows: enough independent sums to keep the multipliers busy. */
static int tile_panels(int64_t m) { return m == 1 ? LONE_PANELS : m <= 3 ? FEW_PANELS : TILE_PANELS; }

/* y (m rows, ldy apart) gets x (m rows, ldx apart) times packed weight w (n_out, n_in) plus b
 * (NULL: none), as `how` says. A worksharing loop: call it inside a parallel region; its threads
 * take contiguous runs of panels, each applied to every row while it sits in their cache. */
static void packed_rows(const float *x, int64_t m, int64_t ldx, const Mat *w, const float *b, float *y, int64_t ldy,
                        int64_t n_out, int64_t n_in, int how) {
    const int64_t panels = (n_out + PANEL - 1) / PANEL;
    const int np = tile_panels(m);
    const int64_t groups = (panels + np - 1) / np;
    const int64_t tiles = (m + TILE_ROWS - 1) / TILE_ROWS; /* rows split evenly: 8 as 4 + 4, not 6 + 2 */
    #pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t first = g * np;
        const int n = panels - first < np ? (int)(panels - first) : np;
        float out[TILE_ROWS][MOST_PANELS * PANEL];
        for (int64_t t = 0, row = 0; t < tiles; t++) {
            const int mr = (int)(m / tiles + (t < m % tiles));
            if (n == np) {
                tile(w, first, mr, np, x + row * ldx, ldx, n_in, out);
            } else { /* the last group's panels one by one */
                for (int j = 0; j < n; j++)
                    tile(w, first + j, mr, 1, x + row * ldx, ldx, n_in, (float(*)[MOST_PANELS * PANEL])(out[0] + j * PANEL));
            }
            const int64_t col0 = first * PANEL, cols = n_out - col0 < n * PANEL ? n_out - col0 : n * PANEL;
            for (int r = 0; r < mr; r++) put(y + (row + r) * ldy + col0, out[r], b ? b + col0 : NULL, cols, how);
            row += mr;
        }
    }
}

/* LayerNorm (bias: its bias) or, where rms, RMSNorm (no mean, no bias), of x (n) into y. */
static void norm(const float *x, const float *weight, const float *bias, float *y, int64_t n, double eps, int64_t rms) {
    double mean = 0.0, var = 0.0;
    if (!rms) {
        for (int64_t i = 0; i < n; i++) mean += x[i];
        mean /= (double)n;
    }
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float scale = (float)(1.0 / sqrt(var / (double)n + eps));
    for (int64_t i = 0; i < n; i++) y[i] = ((float)(x[i] - mean)) * scale * weight[i] + (rms ? 0.0f : bias[i]);
}

/* Rotary positions on one head's vector x (hd), Hugging Face's halves convention: dimension i pairs
 * with i + hd/2, rotated by the angle whose cos and sin are c[i], s[i]. */
static void rotate(float *x, const float *c, const float *s, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i] + a * s[i];
    }
}

/* Mirrored by cpu_kernels._Block: a block's sizes, options and weights (absent biases as zeros).
 * rms: RMSNorm, else LayerNorm; swiglu: fc gives the gate's n_inner outputs, then the up
 * projection's, else GELU; rope_cos, rope_sin: (n_pos, hd/2) rotary tables, or NULL. */
typedef struct {
    int64_t n_embd, n_head, n_kv_head, n_inner, rms, swiglu;
    double eps;
    const float *rope_cos, *rope_sin;
    const float *ln1_w, *ln1_b, *attn_b, *attn_proj_b, *ln2_w, *ln2_b, *fc_b, *mlp_proj_b;
    Mat attn, attn_proj, fc, mlp_proj;
} Block;

/* The key/value pool's element type, cpu_kernels.KV_TYPES: float32, or IEEE float16 (bits in a
 * uint16_t). float16 rather than bfloat16: F16C (AVX-512F) converts eight (sixteen) values either
 * way in one instruction, rounding to nearest even as torch's .to(torch.float16) does, where
 * bfloat16's rounding takes integer arithmetic in AVX2; its 11 significant bits keep keys and
 * values 8x closer than bfloat16's 8; and its range (65504) is far beyond the keys and values of
 * the models we run (SmolLM2's largest: 24). llama.cpp's cache is float16 by default too. */
enum { KV_F32, KV_F16 };

/* Where element `at` of a pool of kv_type lies. */
static inline void *kv_at(void *base, int kv_type, int64_t at) {
    return (char *)base + at * (kv_type == KV_F16 ? 2 : 4);
}

/* One float16 as a float and back (scalar; the compiler's _Float16 uses F16C where it has it). */
static inline float from_half(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, sizeof h);
    return (float)x;
}

static inline uint16_t to_half(float f) {
    const _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, sizeof h);
    return h;
}

/* LANES float16 values at p as floats. */
static inline vec load_half(const uint16_t *p) {
#if defined(__AVX512F__)
    return (vec)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__AVX2__) && defined(__F16C__)
    return (vec)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    vec v;
    for (int i = 0; i < LANES; i++) v[i] = from_half(p[i]);
    return v;
#endif
}

/* x (n) into dst as float16, rounded to nearest even. */
static void store_halves(uint16_t *dst, const float *x, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + LANES <= n; i += LANES)
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__AVX2__) && defined(__F16C__)
    for (; i + LANES <= n; i += LANES)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = to_half(x[i]);
}

/* The sum of v's lanes as a tree of halves: four shuffles and additions with AVX-512, where adding
 * lane by lane (as dot does) takes a shuffle and a dependent addition a lane. */
static inline float sum_lanes(vec v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__)
    __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += v[j];
    return s;
#endif
}

/* a . b over n values, b float16: dot's sibling for a float16 pool's keys */
static float dot_half(const float *a, const uint16_t *b, int64_t n) {
    vec sums = splat(0.0f);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) sums += load(a + i) * load_half(b + i);
    float s = sum_lanes(sums);
    for (; i < n; i++) s += a[i] * from_half(b[i]);
    return s;
}

/* out (n) += w * x, x float16: a float16 pool's values into an attention output */
static void add_scaled_halves(float *out, float w, const uint16_t *x, int64_t n) {
    const vec ws = splat(w);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const vec sum = load(out + i) + ws * load_half(x + i);
        memcpy(out + i, &sum, sizeof sum);
    }
    for (; i < n; i++) out[i] += w * from_half(x[i]);
}

/* One head of one row's attention: q (hd) against the keys and values of positions 0..S-1 at
 * kh, vh (pos_stride elements of kv_type apart), with p (S) for the scores, into out (hd). */
static void attend(const float *q, const void *kh, const void *vh, int kv_type, int64_t S, int64_t pos_stride,
                   int64_t hd, float scale, float *p, float *out) {
    const float *kf = kh, *vf = vh;
    const uint16_t *kb = kh, *vb = vh;
    float top = -INFINITY, total = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        p[s] = (kv_type == KV_F16 ? dot_half(q, kb + s * pos_stride, hd) : dot(q, kf + s * pos_stride, hd)) * scale;
        top = p[s] > top ? p[s] : top;
    }
    for (int64_t s = 0; s < S; s++) total += (p[s] = expf(p[s] - top));
    memset(out, 0, sizeof(float) * hd);
    if (kv_type == KV_F16) {
        for (int64_t s = 0; s < S; s++) add_scaled_halves(out, p[s] / total, vb + s * pos_stride, hd);
        return;
    }
    for (int64_t s = 0; s < S; s++) {
        const float weight = p[s] / total, *vs = vf + s * pos_stride;
        for (int64_t d = 0; d < hd; d++) out[d] += weight * vs[d];
    }
}

/* Block.decode_rows for one new token of each of B sequences, x (B, n_embd; updated in place):
 * row b's token at position pos[b], after positions 0..pos[b]-1, its keys and values (kv_type's
 * elements) at k + b * row_stride and v + b * row_stride, element [h, s, d] of key/value head h at
 * h * head_stride + s * pos_stride + d; the token's own go to position pos[b], below n_pos.
 * Query head h reads key/value head h / (n_head / n_kv_head) (grouped-query attention). The
 * products take all B rows at once; attention, one row and head at a time, sees each row's own
 * positions. Returns 0; -1 where memory ran out, -2 where a position lies outside 0..n_pos-1
 * (nothing changed either way). */
int block_rows(const Block *blk, float *x, int64_t B, const int64_t *pos, void *k, void *v, int kv_type,
               int64_t n_pos, int64_t row_stride, int64_t head_stride, int64_t pos_stride, int threads) {
    const int64_t C = blk->n_embd, n_head = blk->n_head, n_kv = blk->n_kv_head, hd = C / n_head;
    const int64_t kvC = n_kv * hd, qkvC = C + 2 * kvC, group = n_head / n_kv, half = hd / 2;
    const int64_t n_in = blk->n_inner, n_fc = blk->swiglu ? 2 * n_in : n_in;
    int64_t S = 1; /* the longest row's positions */
    for (int64_t b = 0; b < B; b++) {
        if (pos[b] < 0 || pos[b] >= n_pos) return -2;
        S = pos[b] + 1 > S ? pos[b] + 1 : S;
    }
    float *scratch = malloc(sizeof(float) * (B * (2 * C + qkvC + n_fc) + B * n_head * S));
    if (scratch == NULL) return -1;
    float *h = scratch, *qkv = h + B * C, *y = qkv + B * qkvC, *f = y + B * C, *scores = f + B * n_fc;
    const float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) norm(x + b * C, blk->ln1_w, blk->ln1_b, h + b * C, C, blk->eps, blk->rms);
        packed_rows(h, B, C, &blk->attn, blk->attn_b, qkv, qkvC, qkvC, C, STORE);
        /* each row's new key (rotated) and value into the cache, before any query reads them */
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B * n_kv; i++) {
            const int64_t b = i / n_kv, head = i % n_kv;
            float *key = qkv + b * qkvC + C + head * hd, *value = key + kvC;
            if (blk->rope_cos) rotate(key, blk->rope_cos + pos[b] * half, blk->rope_sin + pos[b] * half, hd);
            const int64_t at = b * row_stride + head * head_stride + pos[b] * pos_stride;
            if (kv_type == KV_F16) {
                store_halves(kv_at(k, kv_type, at), key, hd);
                store_halves(kv_at(v, kv_type, at), value, hd);
            } else {
                memcpy(kv_at(k, kv_type, at), key, sizeof(float) * hd);
                memcpy(kv_at(v, kv_type, at), value, sizeof(float) * hd);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B * n_head; i++) {
            const int64_t b = i / n_head, head = i % n_head, kv_head = head / group;
            float *q = qkv + b * qkvC + head * hd;
            if (blk->rope_cos) rotate(q, blk->rope_cos + pos[b] * half, blk->rope_sin + pos[b] * half, hd);
            const int64_t at = b * row_stride + kv_head * head_stride;
            attend(q, kv_at(k, kv_type, at), kv_at(v, kv_type, at), kv_type, pos[b] + 1, pos_stride, hd, scale,
                   scores + i * S, y + b * C + head * hd);
        }
        packed_rows(y, B, C, &blk->attn_proj, blk->attn_proj_b, x, C, C, C, ADD);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) norm(x + b * C, blk->ln2_w, blk->ln2_b, h + b * C, C, blk->eps, blk->rms);
        packed_rows(h, B, C, &blk->fc, blk->fc_b, f, n_fc, n_fc, C, blk->swiglu ? STORE : GELU);
        if (blk->swiglu) { /* silu(gate) * up into the gate's place: silu(g) = g/2 (1 + tanh(g/2)) */
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                float *gate = f + b * n_fc;
                const float *up = gate + n_in;
                for (int64_t c = 0; c < n_in; c++)
                    gate[c] = 0.5f * gate[c] * (1.0f + tanh_rational(0.5f * gate[c])) * up[c];
            }
        }
        packed_rows(f, B, n_fc, &blk->mlp_proj, blk->mlp_proj_b, x, C, C, n_in, ADD);
    }
    free(scratch);
    return 0;
}

/* y (m, n_out) = x (m, n_in) times packed weight w plus b (NULL: none): a Linear on any number of rows. */
void packed_product(const float *x, int64_t m, const Mat *w, const float *b, float *y, int64_t n_out, int64_t n_in,
                    int threads) {
    #pragma omp parallel num_threads(threads)
    packed_rows(x, m, n_in, w, b, y, n_out, n_out, n_in, STORE);
}
