/* A lone sequence's decoding step on CPU, float32: one transformer block per call, and one-row
 * products (the LM head). See row_step.py for why this is C and how it is built and loaded.
 *
 * A step for one token reads every weight once, so it runs at the speed the weights stream
 * from memory, provided the arithmetic keeps up. Each weight row's dot product with x is a
 * chain of dependent additions; torch's compiler gives every row one accumulator, which caps
 * a core near 24-28 GB/s even from the cache (measured), below what this machine's memory
 * delivers. Here four rows are summed at once with two accumulators each: eight independent
 * chains, which keep up with memory (59 GB/s for one core from the cache, measured).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float *p) {
    vec8 v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

static inline float lanes_sum(vec8 v) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += v[i];
    return s;
}

static float dot(const float *a, const float *b, int64_t n) {
    vec8 s0 = {0}, s1 = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 += load8(a + i) * load8(b + i);
        s1 += load8(a + i + 8) * load8(b + i + 8);
    }
    float s = lanes_sum(s0 + s1);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

enum { STORE, ADD, GELU }; /* y = x W^T + b;  y += x W^T + b;  y = gelu_tanh(x W^T + b) */

static inline void put(float *y, int64_t o, float value, int how) {
    if (how == ADD) {
        y[o] += value;
    } else if (how == GELU) {
        y[o] = 0.5f * value * (1.0f + tanhf(0.7978845608028654f * (value + 0.044715f * value * value * value)));
    } else {
        y[o] = value;
    }
}

/* x (n_in) times w (n_out, n_in, rows contiguous) plus b (NULL: none), into y as `how` says. A worksharing
 * loop: call it inside a parallel region, which it splits into contiguous runs of rows. */
static void rows(const float *x, const float *w, const float *b, float *y, int64_t n_out, int64_t n_in, int how) {
    int64_t quads = n_out / 4;
    #pragma omp for schedule(static)
    for (int64_t q = 0; q < quads; q++) {
        const float *r0 = w + 4 * q * n_in, *r1 = r0 + n_in, *r2 = r1 + n_in, *r3 = r2 + n_in;
        vec8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
        int64_t i = 0;
        for (; i + 16 <= n_in; i += 16) {
            vec8 xa = load8(x + i), xc = load8(x + i + 8);
            a0 += xa * load8(r0 + i); c0 += xc * load8(r0 + i + 8);
            a1 += xa * load8(r1 + i); c1 += xc * load8(r1 + i + 8);
            a2 += xa * load8(r2 + i); c2 += xc * load8(r2 + i + 8);
            a3 += xa * load8(r3 + i); c3 += xc * load8(r3 + i + 8);
        }
        float s[4] = {lanes_sum(a0 + c0), lanes_sum(a1 + c1), lanes_sum(a2 + c2), lanes_sum(a3 + c3)};
        for (; i < n_in; i++) {
            s[0] += x[i] * r0[i]; s[1] += x[i] * r1[i]; s[2] += x[i] * r2[i]; s[3] += x[i] * r3[i];
        }
        for (int j = 0; j < 4; j++) put(y, 4 * q + j, s[j] + (b ? b[4 * q + j] : 0.0f), how);
    }
    #pragma omp for schedule(static)
    for (int64_t o = 4 * quads; o < n_out; o++) put(y, o, dot(x, w + o * n_in, n_in) + (b ? b[o] : 0.0f), how);
}

static void layer_norm(const float *x, const float *weight, const float *bias, float *y, int64_t n) {
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (double)n;
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float scale = (float)(1.0 / sqrt(var / (double)n + 1e-5)); /* nn.LayerNorm's default eps */
    for (int64_t i = 0; i < n; i++) y[i] = ((float)(x[i] - mean)) * scale * weight[i] + bias[i];
}

/* Mirrored by row_step._Block: a block's sizes and weights (absent biases as zeros). */
typedef struct {
    int64_t n_embd, n_head;
    const float *ln1_w, *ln1_b, *attn_w, *attn_b, *attn_proj_w, *attn_proj_b;
    const float *ln2_w, *ln2_b, *fc_w, *fc_b, *mlp_proj_w, *mlp_proj_b;
} Block;

/* Block.forward for one token x (n_embd, updated in place) at position pos of one sequence.
 * k and v hold its keys and values, element [h, s, d] at h * head_stride + s * pos_stride + d;
 * the token's own go to position pos. Returns 0, or -1 where memory ran out (x unchanged). */
int block_step(const Block *blk, float *x, float *k, float *v, int64_t pos, int64_t head_stride,
               int64_t pos_stride, int threads) {
    const int64_t C = blk->n_embd, n_head = blk->n_head, hd = C / n_head, S = pos + 1;
    float *scratch = malloc(sizeof(float) * (9 * C + n_head * S));
    if (scratch == NULL) return -1;
    float *h = scratch, *qkv = h + C, *y = qkv + 3 * C, *f = y + C, *scores = f + 4 * C;
    const float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp single
        layer_norm(x, blk->ln1_w, blk->ln1_b, h, C);
        rows(h, blk->attn_w, blk->attn_b, qkv, 3 * C, C, STORE);
        #pragma omp for schedule(static)
        for (int64_t head = 0; head < n_head; head++) {
            const float *q = qkv + head * hd;
            float *kh = k + head * head_stride, *vh = v + head * head_stride, *p = scores + head * S, *out = y + head * hd;
            memcpy(kh + pos * pos_stride, qkv + C + head * hd, sizeof(float) * hd);
            memcpy(vh + pos * pos_stride, qkv + 2 * C + head * hd, sizeof(float) * hd);
            float top = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                p[s] = dot(q, kh + s * pos_stride, hd) * scale;
                top = p[s] > top ? p[s] : top;
            }
            for (int64_t s = 0; s < S; s++) total += (p[s] = expf(p[s] - top));
            memset(out, 0, sizeof(float) * hd);
            for (int64_t s = 0; s < S; s++) {
                const float weight = p[s] / total, *vs = vh + s * pos_stride;
                for (int64_t d = 0; d < hd; d++) out[d] += weight * vs[d];
            }
        }
        rows(y, blk->attn_proj_w, blk->attn_proj_b, x, C, C, ADD);
        #pragma omp single
        layer_norm(x, blk->ln2_w, blk->ln2_b, h, C);
        rows(h, blk->fc_w, blk->fc_b, f, 4 * C, C, GELU);
        rows(f, blk->mlp_proj_w, blk->mlp_proj_b, x, C, 4 * C, ADD);
    }
    free(scratch);
    return 0;
}

/* Three rows of x (at x[0..2]) times four rows of w (from r0, n_in apart): twelve dot products,
 * twelve independent sums, each weight vector read once from the cache for the three. */
static void quad_triple(const float *const x[3], const float *r0, int64_t n_in, float out[3][4]) {
    const float *r1 = r0 + n_in, *r2 = r1 + n_in, *r3 = r2 + n_in;
    vec8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    vec8 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
    int64_t i = 0;
    for (; i + 8 <= n_in; i += 8) {
        vec8 v = load8(x[0] + i);
        a0 += v * load8(r0 + i); a1 += v * load8(r1 + i); a2 += v * load8(r2 + i); a3 += v * load8(r3 + i);
        v = load8(x[1] + i);
        b0 += v * load8(r0 + i); b1 += v * load8(r1 + i); b2 += v * load8(r2 + i); b3 += v * load8(r3 + i);
        v = load8(x[2] + i);
        c0 += v * load8(r0 + i); c1 += v * load8(r1 + i); c2 += v * load8(r2 + i); c3 += v * load8(r3 + i);
    }
    float s[3][4] = {{lanes_sum(a0), lanes_sum(a1), lanes_sum(a2), lanes_sum(a3)},
                     {lanes_sum(b0), lanes_sum(b1), lanes_sum(b2), lanes_sum(b3)},
                     {lanes_sum(c0), lanes_sum(c1), lanes_sum(c2), lanes_sum(c3)}};
    for (; i < n_in; i++)
        for (int k = 0; k < 3; k++)
            for (int j = 0; j < 4; j++) s[k][j] += x[k][i] * (r0 + j * n_in)[i];
    memcpy(out, s, sizeof s);
}

/* y (m, n_out) = x (m, n_in) times w (n_out, n_in) plus b (NULL: none): a Linear for a few rows,
 * such as a batched decoding step (or one row: the LM head). Each thread takes a run of four
 * weight rows at a time and applies them to every row of x, three at a time, while they sit in
 * its cache: the weights stream from memory once. */
void row_product(const float *x, int64_t m, const float *w, const float *b, float *y, int64_t n_out, int64_t n_in,
                 int threads) {
    if (m == 1) {
        #pragma omp parallel num_threads(threads)
        rows(x, w, b, y, n_out, n_in, STORE);
        return;
    }
    int64_t quads = n_out / 4;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t q = 0; q < quads; q++) {
            const float *r0 = w + 4 * q * n_in;
            float s[3][4];
            for (int64_t row = 0; row < m; row += 3) {
                /* the last group may repeat its first row, not stored twice */
                const float *xs[3] = {x + row * n_in, x + (row + 1 < m ? row + 1 : row) * n_in,
                                      x + (row + 2 < m ? row + 2 : row) * n_in};
                quad_triple(xs, r0, n_in, s);
                for (int k = 0; k < 3 && row + k < m; k++)
                    for (int j = 0; j < 4; j++) y[(row + k) * n_out + 4 * q + j] = s[k][j] + (b ? b[4 * q + j] : 0.0f);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t o = 4 * quads; o < n_out; o++)
            for (int64_t row = 0; row < m; row++)
                y[row * n_out + o] = dot(x + row * n_in, w + o * n_in, n_in) + (b ? b[o] : 0.0f);
    }
}
