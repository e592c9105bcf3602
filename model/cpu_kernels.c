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
 * Weights may also stay quantized in memory, in runs of QK = 32 inputs of an output, each run with a
 * half-precision scale d: precision "q8" keeps a weight as d q with q an int8 (GGUF's Q8_0), "q4" as
 * m + d q with q in 0..15 and a half-precision minimum m per run (GGUF's Q4_1). Their products are
 * integer products, as llama.cpp's: each row of x is quantized per run of 32 inputs to int8 (a
 * float scale dx per run, dx = largest magnitude / 127), and a run's 32 weights times its 32
 * inputs is an int32 sum of products of bytes, which VNNI's vpdpbusd adds up four at a time, 64
 * products an instruction (without VNNI: vpmaddubsw and vpmaddwd, 32 or 64 products in three);
 * per run that sum is scaled by d dx, in float. Widening each weight to a float instead cost about
 * eight instructions per sixteen weights, which held a lone stream to 35-49 % of the memory
 * bandwidth (measured). The int8 weights of a panel are (groups, QK / 4, PANEL, 4): for four
 * inputs, each output's four weights side by side, as vpdpbusd takes them; four-bit ones are
 * (groups, QK / 8, PANEL * 4) bytes, byte 4 o + i of run t holding input 8 t + i of output o
 * in its low four bits and input 8 t + 4 + i in its high four.
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
enum { QTILE_ROWS = 4, QTILE_PANELS = 2, QLONE_PANELS = 4 };
#else
enum { TILE_ROWS = 6, TILE_PANELS = 1, FEW_PANELS = 2, LANES = 8 };
enum { QTILE_ROWS = 2, QTILE_PANELS = 1, QLONE_PANELS = 2 };
#endif
enum { LONE_PANELS = 4, MOST_PANELS = 4, PER_PANEL = PANEL / LANES };
enum { QK = 32, QSTEPS = QK / 4 }; /* inputs that share one scale an output; the products' steps of four inputs */
typedef float vec __attribute__((vector_size(LANES * 4)));
typedef int32_t ivec __attribute__((vector_size(LANES * 4))); /* LANES sums, or LANES runs of four bytes */
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define Q8_OFFSET 1 /* q8 products take x + 128 unsigned (vpdpbusd multiplies unsigned by signed bytes) */
#else
#define Q8_OFFSET 0 /* q8 products take |x| and the weights with x's signs (vpmaddubsw's int16 sums cannot overflow) */
#endif

/* A Linear's packed weight: float panels f; or int8 panels q (panels, groups, QK / 4, PANEL, 4) with half
 * scales s and each run's sum of weights sums (panels, groups, PANEL); or four-bit panels q4 (panels,
 * groups, QK / 8, PANEL * 4) with half scales s and minimums m (panels, groups, PANEL). groups = ceil(n_in
 * / QK), the last one padded with zero weights (q8) or zero levels (q4: m, times the zero inputs past n_in). */
typedef struct {
    const float *f;
    const int8_t *q;
    const uint8_t *q4;
    const uint16_t *s;
    const uint16_t *m;
    const int16_t *sums;
} Mat;

/* Rows of x quantized for the integer products: q (rows, groups * QK) int8, zero past n_in; per row and
 * run its scale d (rows, groups) and the sum of its q (rows, groups). */
typedef struct {
    int8_t *q;
    float *d;
    int32_t *sum;
    int64_t groups;
} Act;

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

static inline ivec loadi(const void *p) {
    ivec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline ivec splati(int32_t s) { return (ivec){0} + s; }

static inline vec splat(float s) { return (vec){0} + s; } /* one broadcast instruction */

/* LANES half-precision floats (IEEE binary16) at p as floats */
static inline vec halves(const uint16_t *p) {
#if defined(__AVX512F__)
    return (vec)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__) && defined(__AVX2__)
    return (vec)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    vec v;
    for (int i = 0; i < LANES; i++) {
        const int exp = (p[i] >> 10) & 31, man = p[i] & 1023;
        const float f = exp == 0 ? ldexpf((float)man, -24) : exp == 31 ? (man ? NAN : INFINITY)
                                                                         : ldexpf((float)(man | 1024), exp - 25);
        v[i] = p[i] >> 15 ? -f : f;
    }
    return v;
#endif
}

/* LANES int16 at p as int32 lanes */
static inline ivec widen16(const int16_t *p) {
#if defined(__AVX512F__)
    return (ivec)_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__AVX2__)
    return (ivec)_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)p));
#else
    ivec v;
    for (int i = 0; i < LANES; i++) v[i] = p[i];
    return v;
#endif
}

/* acc plus, in each lane, the sum of its four unsigned bytes of u times the four signed bytes of s (no
 * pair of products may exceed the int16 range without VNNI). */
static inline ivec dot4(ivec acc, ivec u, ivec s) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    return (ivec)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)u, (__m512i)s);
#elif defined(__AVX512F__) && defined(__AVX512BW__)
    return acc + (ivec)_mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)u, (__m512i)s), _mm512_set1_epi16(1));
#elif !defined(__AVX512F__) && defined(__AVXVNNI__)
    return (ivec)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)u, (__m256i)s);
#elif !defined(__AVX512F__) && defined(__AVX2__)
    return acc + (ivec)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)u, (__m256i)s), _mm256_set1_epi16(1));
#else
    uint8_t ub[sizeof(ivec)];
    int8_t sb[sizeof(ivec)];
    memcpy(ub, &u, sizeof ub);
    memcpy(sb, &s, sizeof sb);
    for (int l = 0; l < LANES; l++)
        for (int i = 0; i < 4; i++) acc[l] += ub[4 * l + i] * sb[4 * l + i];
    return acc;
#endif
}

#if !Q8_OFFSET
/* x's bytes' magnitudes, and w's bytes negated where x's are negative: |x| w' = x w, a product of an
 * unsigned byte and a signed one. */
static inline ivec magnitudes(ivec x) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return (ivec)_mm512_abs_epi8((__m512i)x);
#elif !defined(__AVX512F__) && defined(__AVX2__)
    return (ivec)_mm256_abs_epi8((__m256i)x);
#else
    int8_t b[sizeof(ivec)];
    memcpy(b, &x, sizeof b);
    for (size_t i = 0; i < sizeof b; i++) b[i] = (int8_t)(b[i] < 0 ? -b[i] : b[i]);
    return loadi(b);
#endif
}

static inline ivec signed_as(ivec w, ivec x) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return (ivec)_mm512_mask_sub_epi8((__m512i)w, _mm512_movepi8_mask((__m512i)x), _mm512_setzero_si512(), (__m512i)w);
#elif !defined(__AVX512F__) && defined(__AVX2__)
    return (ivec)_mm256_sign_epi8((__m256i)w, (__m256i)x);
#else
    int8_t wb[sizeof(ivec)], xb[sizeof(ivec)];
    memcpy(wb, &w, sizeof wb);
    memcpy(xb, &x, sizeof xb);
    for (size_t i = 0; i < sizeof wb; i++) wb[i] = (int8_t)(xb[i] < 0 ? -wb[i] : wb[i]);
    return loadi(wb);
#endif
}
#endif

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
/* As TILE over int8 panels from panel `first` of w, for a's rows row..row+MR-1: each run's int32 sums
 * (with VNNI from -128 times the run's weights' sum, for x + 128) scaled by d dx into float sums. */
#define Q8TILE(MR, NP)                                                                                  \
    static void q8tile_##MR##_##NP(const Act *a, int64_t row, const Mat *w, int64_t first,              \
                                   float out[][MOST_PANELS * PANEL]) {                                  \
        enum { V = NP * PER_PANEL };                                                                    \
        const int64_t groups = a->groups;                                                               \
        vec acc[MR][V];                                                                                 \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int j = 0; j < V; j++) acc[r][j] = splat(0.0f);                                        \
        for (int64_t g = 0; g < groups; g++) {                                                          \
            vec scale[V];                                                                               \
            ivec sums[MR][V];                                                                           \
            for (int j = 0; j < V; j++) {                                                               \
                const int64_t at = ((first + j / PER_PANEL) * groups + g) * PANEL + j % PER_PANEL * LANES; \
                scale[j] = halves(w->s + at);                                                           \
                const ivec start = Q8_OFFSET ? widen16(w->sums + at) * -128 : splati(0);                \
                for (int r = 0; r < MR; r++) sums[r][j] = start;                                        \
            }                                                                                           \
            for (int s = 0; s < QSTEPS; s++) {                                                          \
                ivec wv[V];                                                                             \
                for (int j = 0; j < V; j++)                                                             \
                    wv[j] = loadi(w->q + (((first + j / PER_PANEL) * groups + g) * QSTEPS + s) * PANEL * 4 \
                                  + j % PER_PANEL * LANES * 4);                                         \
                for (int r = 0; r < MR; r++) {                                                          \
                    int32_t four;                                                                       \
                    memcpy(&four, a->q + ((row + r) * groups + g) * QK + 4 * s, 4);                     \
                    if (Q8_OFFSET) {                                                                    \
                        const ivec xu = splati(four ^ (int32_t)0x80808080);                             \
                        for (int j = 0; j < V; j++) sums[r][j] = dot4(sums[r][j], xu, wv[j]);           \
                    } else {                                                                            \
                        Q8_SIGNED_STEP                                                                  \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < MR; r++) {                                                              \
                const float dx = a->d[(row + r) * groups + g];                                          \
                for (int j = 0; j < V; j++)                                                             \
                    acc[r][j] += __builtin_convertvector(sums[r][j], vec) * (scale[j] * dx);            \
            }                                                                                           \
        }                                                                                               \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int j = 0; j < V; j++) memcpy(out[r] + j * LANES, &acc[r][j], sizeof acc[r][j]);       \
    }
#if Q8_OFFSET
#define Q8_SIGNED_STEP
#else
#define Q8_SIGNED_STEP                                                                                  \
    const ivec xb = splati(four), xm = magnitudes(xb);                                                  \
    for (int j = 0; j < V; j++) sums[r][j] = dot4(sums[r][j], xm, signed_as(wv[j], xb));
#endif
/* As Q8TILE over four-bit panels: a run's sum of levels times inputs scaled by d dx, plus m dx times
 * the sum of the run's quantized inputs. */
#define Q4TILE(MR, NP)                                                                                  \
    static void q4tile_##MR##_##NP(const Act *a, int64_t row, const Mat *w, int64_t first,              \
                                   float out[][MOST_PANELS * PANEL]) {                                  \
        enum { V = NP * PER_PANEL };                                                                    \
        const int64_t groups = a->groups;                                                               \
        const ivec low = splati(0x0F0F0F0F);                                                            \
        vec acc[MR][V];                                                                                 \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int j = 0; j < V; j++) acc[r][j] = splat(0.0f);                                        \
        for (int64_t g = 0; g < groups; g++) {                                                          \
            ivec sums[MR][V];                                                                           \
            for (int r = 0; r < MR; r++)                                                                \
                for (int j = 0; j < V; j++) sums[r][j] = splati(0);                                     \
            for (int t = 0; t < QSTEPS / 2; t++) {                                                      \
                ivec lo[V], hi[V];                                                                      \
                for (int j = 0; j < V; j++) {                                                           \
                    const ivec b = loadi(w->q4 + (((first + j / PER_PANEL) * groups + g) * (QSTEPS / 2) + t) \
                                         * PANEL * 4 + j % PER_PANEL * LANES * 4);                      \
                    lo[j] = b & low;                                                                    \
                    hi[j] = (b >> 4) & low;                                                             \
                }                                                                                       \
                for (int r = 0; r < MR; r++) {                                                          \
                    int32_t eight[2];                                                                   \
                    memcpy(eight, a->q + ((row + r) * groups + g) * QK + 8 * t, 8);                     \
                    const ivec x0 = splati(eight[0]), x1 = splati(eight[1]);                            \
                    for (int j = 0; j < V; j++) sums[r][j] = dot4(dot4(sums[r][j], lo[j], x0), hi[j], x1); \
                }                                                                                       \
            }                                                                                           \
            vec scale[V], least[V];                                                                     \
            for (int j = 0; j < V; j++) {                                                               \
                const int64_t at = ((first + j / PER_PANEL) * groups + g) * PANEL + j % PER_PANEL * LANES; \
                scale[j] = halves(w->s + at);                                                           \
                least[j] = halves(w->m + at);                                                           \
            }                                                                                           \
            for (int r = 0; r < MR; r++) {                                                              \
                const float dx = a->d[(row + r) * groups + g], mx = dx * (float)a->sum[(row + r) * groups + g]; \
                for (int j = 0; j < V; j++)                                                             \
                    acc[r][j] += __builtin_convertvector(sums[r][j], vec) * (scale[j] * dx) + least[j] * mx; \
            }                                                                                           \
        }                                                                                               \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int j = 0; j < V; j++) memcpy(out[r] + j * LANES, &acc[r][j], sizeof acc[r][j]);       \
    }
/* Every tile packed_rows takes: float tiles of TILE_ROWS rows or fewer, by TILE_PANELS panels or one
 * (the last of an odd count), two or three rows by FEW_PANELS, one row by LONE_PANELS; quantized tiles
 * of QTILE_ROWS rows or fewer, by QTILE_PANELS panels or one, one row by QLONE_PANELS. */
TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1) TILE(5, 1) TILE(6, 1) TILE(1, 4) TILE(2, 2) TILE(3, 2)
#define QTILES(MR, NP) Q8TILE(MR, NP) Q4TILE(MR, NP)
QTILES(1, 1) QTILES(2, 1)
#ifdef __AVX512F__
TILE(7, 1) TILE(8, 1)
TILE(1, 2) TILE(4, 2) TILE(5, 2) TILE(6, 2) TILE(7, 2) TILE(8, 2) TILE(2, 4) TILE(3, 4)
QTILES(3, 1) QTILES(4, 1) QTILES(1, 2) QTILES(2, 2) QTILES(3, 2) QTILES(4, 2) QTILES(1, 4)
#else
QTILES(1, 2)
#endif

typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, float[][MOST_PANELS * PANEL]);
typedef void (*qtile_fn)(const Act *, int64_t, const Mat *, int64_t, float[][MOST_PANELS * PANEL]);

#ifdef __AVX512F__
static tile_fn tile_for(int mr, int np) {
    static const tile_fn one[] = {tile_1_1, tile_2_1, tile_3_1, tile_4_1, tile_5_1, tile_6_1, tile_7_1, tile_8_1};
    static const tile_fn two[] = {tile_1_2, tile_2_2, tile_3_2, tile_4_2, tile_5_2, tile_6_2, tile_7_2, tile_8_2};
    static const tile_fn four[] = {tile_1_4, tile_2_4, tile_3_4};
    return np == 1 ? one[mr - 1] : np == 2 ? two[mr - 1] : four[mr - 1];
}
#define QTILE_TABLE(P)                                                                                  \
    static const qtile_fn one[] = {P##tile_1_1, P##tile_2_1, P##tile_3_1, P##tile_4_1};                \
    static const qtile_fn two[] = {P##tile_1_2, P##tile_2_2, P##tile_3_2, P##tile_4_2};                \
    return np == 1 ? one[mr - 1] : np == 2 ? two[mr - 1] : P##tile_1_4;
#else
static tile_fn tile_for(int mr, int np) {
    static const tile_fn one[] = {tile_1_1, tile_2_1, tile_3_1, tile_4_1, tile_5_1, tile_6_1};
    static const tile_fn two[] = {NULL, tile_2_2, tile_3_2};
    return np == 1 ? one[mr - 1] : np == 2 ? two[mr - 1] : tile_1_4;
}
#define QTILE_TABLE(P)                                                                                  \
    static const qtile_fn one[] = {P##tile_1_1, P##tile_2_1};                                          \
    return np == 1 ? one[mr - 1] : P##tile_1_2;
#endif
static qtile_fn q8tile_for(int mr, int np) { QTILE_TABLE(q8) }
static qtile_fn q4tile_for(int mr, int np) { QTILE_TABLE(q4) }

static int quantized(const Mat *w) { return w->q != NULL || w->q4 != NULL; }

/* x's m rows (ldx apart, n_in each) into a for the integer products: a worksharing loop, as packed_rows. */
static void quantize_rows(const float *x, int64_t m, int64_t ldx, int64_t n_in, const Act *a) {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < a->groups; g++) {
            const int64_t k0 = g * QK, kn = n_in - k0 < QK ? n_in - k0 : QK;
            const float *xs = x + r * ldx + k0;
            float top = 0.0f;
            for (int64_t k = 0; k < kn; k++) top = fabsf(xs[k]) > top ? fabsf(xs[k]) : top;
            const float d = top / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            int8_t *q = a->q + (r * a->groups + g) * QK;
            int32_t sum = 0;
            for (int64_t k = 0; k < QK; k++) {
                q[k] = (int8_t)(k < kn ? nearbyintf(xs[k] * inv) : 0.0f); /* to nearest, ties to even */
                sum += q[k];
            }
            a->d[r * a->groups + g] = d;
            a->sum[r * a->groups + g] = sum;
        }
    }
}

/* Panels per tile for m rows: enough independent sums to keep the multipliers busy. */
static int tile_panels(const Mat *w, int64_t m) {
    if (quantized(w)) return m == 1 ? QLONE_PANELS : QTILE_PANELS;
    return m == 1 ? LONE_PANELS : m <= 3 ? FEW_PANELS : TILE_PANELS;
}

/* One tile of mr rows (x's from row, ldx apart; or a's) by np panels from panel `first` of w into out. */
static void tile(const Mat *w, int64_t first, int mr, int np, const float *x, int64_t ldx, int64_t n_in,
                 const Act *a, int64_t row, float out[][MOST_PANELS * PANEL]) {
    if (w->q4) {
        q4tile_for(mr, np)(a, row, w, first, out);
    } else if (w->q) {
        q8tile_for(mr, np)(a, row, w, first, out);
    } else {
        tile_for(mr, np)(x + row * ldx, ldx, w->f + first * n_in * PANEL, n_in, out);
    }
}

/* y (m rows, ldy apart) gets x (m rows, ldx apart) times packed weight w (n_out, n_in) plus b
 * (NULL: none), as `how` says; a quantized w's products take x's rows quantized into a. A
 * worksharing loop: call it inside a parallel region; its threads take contiguous runs of panels,
 * each applied to every row while it sits in their cache. */
static void packed_rows(const float *x, int64_t m, int64_t ldx, const Mat *w, const float *b, float *y, int64_t ldy,
                        int64_t n_out, int64_t n_in, int how, const Act *room) {
    Act act = room ? *room : (Act){0}, *a = &act;
    act.groups = (n_in + QK - 1) / QK;
    if (quantized(w)) quantize_rows(x, m, ldx, n_in, a); /* its loop's barrier: every row done before any tile */
    const int64_t panels = (n_out + PANEL - 1) / PANEL;
    const int np = tile_panels(w, m), most_rows = quantized(w) ? QTILE_ROWS : TILE_ROWS;
    const int64_t groups = (panels + np - 1) / np;
    const int64_t tiles = (m + most_rows - 1) / most_rows; /* rows split evenly: 8 as 4 + 4, not 6 + 2 */
    #pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t first = g * np;
        const int n = panels - first < np ? (int)(panels - first) : np;
        float out[TILE_ROWS][MOST_PANELS * PANEL];
        for (int64_t t = 0, row = 0; t < tiles; t++) {
            const int mr = (int)(m / tiles + (t < m % tiles));
            if (n == np) {
                tile(w, first, mr, np, x, ldx, n_in, a, row, out);
            } else { /* the last group's panels one by one */
                for (int j = 0; j < n; j++)
                    tile(w, first + j, mr, 1, x, ldx, n_in, a, row, (float(*)[MOST_PANELS * PANEL])(out[0] + j * PANEL));
            }
            const int64_t col0 = first * PANEL, cols = n_out - col0 < n * PANEL ? n_out - col0 : n * PANEL;
            for (int r = 0; r < mr; r++) put(y + (row + r) * ldy + col0, out[r], b ? b + col0 : NULL, cols, how);
            row += mr;
        }
    }
}

/* Room for m rows of up to n_in inputs quantized (Act), or NULL where memory ran out; free() it. */
static void *act_alloc(Act *a, int64_t m, int64_t n_in) {
    const int64_t groups = (n_in + QK - 1) / QK;
    char *room = malloc((size_t)(m * groups * (QK + sizeof(float) + sizeof(int32_t))));
    if (room != NULL) {
        a->d = (float *)room;
        a->sum = (int32_t *)(a->d + m * groups);
        a->q = (int8_t *)(a->sum + m * groups);
    }
    return room;
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
    for (; i + LANES <= n; i += LANES) sums += load(a + i) * halves(b + i);
    float s = sum_lanes(sums);
    for (; i < n; i++) s += a[i] * from_half(b[i]);
    return s;
}

/* out (n) += w * x, x float16: a float16 pool's values into an attention output */
static void add_scaled_halves(float *out, float w, const uint16_t *x, int64_t n) {
    const vec ws = splat(w);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const vec sum = load(out + i) + ws * halves(x + i);
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
    Act act;
    void *room = act_alloc(&act, B, n_in > C ? n_in : C); /* the quantized products' inputs */
    if (scratch == NULL || room == NULL) {
        free(scratch);
        free(room);
        return -1;
    }
    float *h = scratch, *qkv = h + B * C, *y = qkv + B * qkvC, *f = y + B * C, *scores = f + B * n_fc;
    const float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) norm(x + b * C, blk->ln1_w, blk->ln1_b, h + b * C, C, blk->eps, blk->rms);
        packed_rows(h, B, C, &blk->attn, blk->attn_b, qkv, qkvC, qkvC, C, STORE, &act);
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
        packed_rows(y, B, C, &blk->attn_proj, blk->attn_proj_b, x, C, C, C, ADD, &act);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) norm(x + b * C, blk->ln2_w, blk->ln2_b, h + b * C, C, blk->eps, blk->rms);
        packed_rows(h, B, C, &blk->fc, blk->fc_b, f, n_fc, n_fc, C, blk->swiglu ? STORE : GELU, &act);
        if (blk->swiglu) { /* silu(gate) * up into the gate's place: silu(g) = g/2 (1 + tanh(g/2)) */
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++) {
                float *gate = f + b * n_fc;
                const float *up = gate + n_in;
                for (int64_t c = 0; c < n_in; c++)
                    gate[c] = 0.5f * gate[c] * (1.0f + tanh_rational(0.5f * gate[c])) * up[c];
            }
        }
        packed_rows(f, B, n_fc, &blk->mlp_proj, blk->mlp_proj_b, x, C, C, n_in, ADD, &act);
    }
    free(scratch);
    free(room);
    return 0;
}

/* y (m, n_out) = x (m, n_in) times packed weight w plus b (NULL: none): a Linear on any number of rows.
 * Returns 0, or -1 where memory ran out. */
int packed_product(const float *x, int64_t m, const Mat *w, const float *b, float *y, int64_t n_out, int64_t n_in,
                   int threads) {
    Act act;
    void *room = quantized(w) ? act_alloc(&act, m, n_in) : NULL;
    if (quantized(w) && room == NULL) return -1;
    #pragma omp parallel num_threads(threads)
    packed_rows(x, m, n_in, w, b, y, n_out, n_out, n_in, STORE, room ? &act : NULL);
    free(room);
    return 0;
}
