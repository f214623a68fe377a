/* Fused CPU kernels for the float32 training step of `--cpu_kernels on` (see kernels.py, which
 * builds this file with the machine's C compiler; where it cannot, the run uses torch ops).
 *
 * Why C: at the bench size (T = 13 tokens per row, head dim 64) torch's attention is a chain
 * of small batched GEMMs, transposes, a mask, a softmax and a dropout, each a pass over
 * memory with its own dispatch; GPT-2's tanh-GELU is one compute-bound pass each way, and the
 * biases, residual adds, dropout masks and the LM head's softmax are more passes. Here each
 * of them is one pass each way (bias gradients included), parallel over (row, head), rows or
 * elements with the OpenMP runtime that torch itself uses (the library links the same
 * libgomp).
 *
 * All tensors are contiguous float32 (masks: bool bytes; dropout draws: int16 uniforms, as in
 * fastpath._keep_mask). No function allocates memory or keeps state.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------ attention
 * qkv (R, T, 3d): the c_attn output; head h of q / k / v is columns
 *   [h*hd, (h+1)*hd) of the first / second / third d columns.
 * mask (R, T, T): 1 = query i may attend to key j.
 * bits (R, H, T, T) int16 uniforms or NULL (no dropout): a softmax weight is kept when its
 *   draw is < keep_below, and kept weights are multiplied by drop_scale.
 * prob (R, H, T, T): the softmax before dropout, written by the forward for the backward.
 * y (R, T, d): the heads' outputs side by side, the layout c_proj reads.
 */

static inline float keep_factor(const int16_t *bits, int64_t at, int32_t keep_below,
                                float drop_scale) {
    if (!bits) return 1.0f;
    return bits[at] < keep_below ? drop_scale : 0.0f;
}

void attention_forward(const float *qkv, const uint8_t *mask, const int16_t *bits,
                       int32_t keep_below, float drop_scale, float *prob, float *y, int64_t R,
                       int64_t T, int64_t H, int64_t hd, float scale, int32_t threads) {
    const int64_t d = H * hd, ld = 3 * d;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t rh = 0; rh < R * H; rh++) {
        const int64_t r = rh / H, h = rh % H;
        const float *row = qkv + r * T * ld;
        const uint8_t *m = mask + r * T * T;
        float *p = prob + rh * T * T;
        for (int64_t i = 0; i < T; i++) {
            const float *q = row + i * ld + h * hd;
            float *pi = p + i * T;
            float top = -INFINITY;
            for (int64_t j = 0; j < T; j++) {
                if (!m[i * T + j]) continue;
                const float *k = row + j * ld + d + h * hd;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t c = 0; c < hd; c++) s += q[c] * k[c];
                pi[j] = s * scale;
                top = pi[j] > top ? pi[j] : top;
            }
            float total = 0.0f;
            for (int64_t j = 0; j < T; j++) {
                pi[j] = m[i * T + j] ? expf(pi[j] - top) : 0.0f;
                total += pi[j];
            }
            /* a query that may attend to nothing gets zero weights (and a zero output) */
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            float *yi = y + (r * T + i) * d + h * hd;
            memset(yi, 0, (size_t)hd * sizeof(float));
            for (int64_t j = 0; j < T; j++) {
                pi[j] *= inv;
                const float w = pi[j] * keep_factor(bits, (rh * T + i) * T + j, keep_below,
                                                    drop_scale);
                if (w == 0.0f) continue;
                const float *v = row + j * ld + 2 * d + h * hd;
#pragma omp simd
                for (int64_t c = 0; c < hd; c++) yi[c] += w * v[c];
            }
        }
    }
}

/* dqkv (R, T, 3d) is written whole: every (row, head) owns its columns of q, k and v. */
void attention_backward(const float *qkv, const float *prob, const int16_t *bits,
                        int32_t keep_below, float drop_scale, const float *dy, float *dqkv,
                        int64_t R, int64_t T, int64_t H, int64_t hd, float scale,
                        int32_t threads) {
    const int64_t d = H * hd, ld = 3 * d;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t rh = 0; rh < R * H; rh++) {
        const int64_t r = rh / H, h = rh % H;
        const float *row = qkv + r * T * ld;
        float *drow = dqkv + r * T * ld;
        const float *p = prob + rh * T * T;
        for (int64_t j = 0; j < T; j++) {
            memset(drow + j * ld + d + h * hd, 0, (size_t)hd * sizeof(float));
            memset(drow + j * ld + 2 * d + h * hd, 0, (size_t)hd * sizeof(float));
        }
        float dp[T > 0 ? T : 1];
        for (int64_t i = 0; i < T; i++) {
            const float *pi = p + i * T;
            const float *dyi = dy + (r * T + i) * d + h * hd;
            const float *q = row + i * ld + h * hd;
            float *dq = drow + i * ld + h * hd;
            float weighted = 0.0f;
            for (int64_t j = 0; j < T; j++) {
                dp[j] = 0.0f;
                if (pi[j] == 0.0f) continue; /* masked (or underflowed): no gradient */
                const float keep = keep_factor(bits, (rh * T + i) * T + j, keep_below, drop_scale);
                if (keep == 0.0f) continue;
                const float *v = row + j * ld + 2 * d + h * hd;
                float *dv = drow + j * ld + 2 * d + h * hd;
                const float w = pi[j] * keep;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t c = 0; c < hd; c++) {
                    s += dyi[c] * v[c];
                    dv[c] += w * dyi[c];
                }
                dp[j] = s * keep;
                weighted += pi[j] * dp[j];
            }
            memset(dq, 0, (size_t)hd * sizeof(float));
            for (int64_t j = 0; j < T; j++) {
                if (pi[j] == 0.0f) continue;
                const float ds = pi[j] * (dp[j] - weighted) * scale;
                const float *k = row + j * ld + d + h * hd;
                float *dk = drow + j * ld + d + h * hd;
#pragma omp simd
                for (int64_t c = 0; c < hd; c++) {
                    dq[c] += ds * k[c];
                    dk[c] += ds * q[c];
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ tanh-GELU
 * GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). tanh comes from an exp
 * written so that the compiler vectorises it (range reduction to [-ln2/2, ln2/2], a degree-7
 * Taylor polynomial, 2^n from the exponent bits): within a few float ulps of float64 (tests). */

static inline float exp_clamped(float a) {
    const int underflow = a < -87.0f; /* below FLT_MIN: the 2^n trick needs n >= -126 */
    a = a < -87.0f ? -87.0f : (a > 80.0f ? 80.0f : a);
    const float n = rintf(a * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, a);
    r = fmaf(n, 2.12194440e-4f, r);
    float poly = 1.0f / 5040.0f;
    poly = fmaf(poly, r, 1.0f / 720.0f);
    poly = fmaf(poly, r, 1.0f / 120.0f);
    poly = fmaf(poly, r, 1.0f / 24.0f);
    poly = fmaf(poly, r, 1.0f / 6.0f);
    poly = fmaf(poly, r, 0.5f);
    poly = fmaf(poly, r, 1.0f);
    poly = fmaf(poly, r, 1.0f);
    union {
        int32_t i;
        float f;
    } two_n = {.i = ((int32_t)n + 127) << 23};
    return underflow ? 0.0f : poly * two_n.f;
}

/* 1 + tanh(u) = 2e / (1 + e) and 1 - tanh(u) = 2 / (1 + e), e = exp(2u): neither cancels
 * (1 +- t computed from t rounds to 0 for |u| > ~8, where GELU and its slope still differ
 * from 0 and x by more than an ulp). */
static inline float one_plus_tanh(float u, float *one_minus) {
    const float e = exp_clamped(2.0f * u);
    const float s = 2.0f / (1.0f + e);
    *one_minus = s;
    return e * s;
}

#define GELU_C 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_A 0.044715f

/* y = gelu(x + b) for x (rows, cols) and a bias b (cols) or NULL */
static inline float gelu_value(float v) {
    float minus;
    return 0.5f * v * one_plus_tanh(GELU_C * fmaf(GELU_A * v * v, v, v), &minus);
}

/* dy * gelu'(v): d/dv 0.5 v (1 + t) = 0.5 (1 + t) + 0.5 v (1 + t)(1 - t) du/dv */
static inline float gelu_grad(float v, float dy) {
    const float v2 = v * v;
    float minus;
    const float plus = one_plus_tanh(GELU_C * fmaf(GELU_A * v2, v, v), &minus);
    const float inner = GELU_C * fmaf(3.0f * GELU_A, v2, 1.0f); /* du/dv */
    return dy * 0.5f * plus * fmaf(v * minus, inner, 1.0f);
}

/* y = gelu(x + b) for x (rows, cols) and a bias b (cols) or NULL. The branch on b is outside
 * the loops: inside, it kept the compiler from vectorising the NULL case (7x slower). */
void gelu_forward(const float *x, const float *b, float *y, int64_t rows, int64_t cols,
                  int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        if (b) {
#pragma omp simd
            for (int64_t c = 0; c < cols; c++) yr[c] = gelu_value(xr[c] + b[c]);
        } else {
#pragma omp simd
            for (int64_t c = 0; c < cols; c++) yr[c] = gelu_value(xr[c]);
        }
    }
}

/* Column sums of a (rows, cols) matrix that a parallel region writes row by row: thread t of
 * nt sums its rows [r0, r1) into partial[t] (cols floats), then the threads add the partials
 * up by columns, in thread order. Threads own whole rows, so each streams through
 * contiguous memory (owning columns instead made every thread read half of each row). */
#define ROW_RANGE(rows, t, nt, r0, r1)                                                         \
    const int64_t r0 = (rows) * (t) / (nt), r1 = (rows) * ((t) + 1) / (nt)

static void reduce_partials(const float *partial, float *db, int64_t cols, int64_t t,
                            int64_t nt) {
#pragma omp barrier
    const int64_t c0 = cols * t / nt, c1 = cols * (t + 1) / nt;
    for (int64_t c = c0; c < c1; c++) db[c] = 0.0f;
    for (int64_t u = 0; u < nt; u++)
#pragma omp simd
        for (int64_t c = c0; c < c1; c++) db[c] += partial[u * cols + c];
}

/* dx = dy * gelu'(x + b); db (cols) = the column sums of dx, when not NULL (partial: threads x
 * cols floats of scratch, see reduce_partials). */
void gelu_backward(const float *x, const float *b, const float *dy, float *dx, float *db,
                   float *partial, int64_t rows, int64_t cols, int32_t threads) {
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        ROW_RANGE(rows, t, nt, r0, r1);
        float *acc = partial ? partial + t * cols : NULL;
        if (acc) memset(acc, 0, (size_t)cols * sizeof(float));
        for (int64_t r = r0; r < r1; r++) {
            const float *xr = x + r * cols, *gr = dy + r * cols;
            float *dr = dx + r * cols;
            if (b) {
#pragma omp simd
                for (int64_t c = 0; c < cols; c++) dr[c] = gelu_grad(xr[c] + b[c], gr[c]);
            } else {
#pragma omp simd
                for (int64_t c = 0; c < cols; c++) dr[c] = gelu_grad(xr[c], gr[c]);
            }
            if (acc)
#pragma omp simd
                for (int64_t c = 0; c < cols; c++) acc[c] += dr[c];
        }
        if (db) reduce_partials(partial, db, cols, t, nt);
    }
}

/* ------------------------------------------------------------------ dropout draws
 * n int16 uniforms on [-32768, 32767]: the 64-bit word w of the output is splitmix64's
 * finaliser applied to seed + (w + 1) * golden ratio, a counter-based generator (any word can
 * be computed alone, so threads split the output freely and the result does not depend on
 * their number). The seed is one draw of torch's generator, so runs stay reproducible from
 * torch's RNG state. */
static inline uint64_t draw64(uint64_t seed, int64_t word) {
    uint64_t z = seed + (uint64_t)(word + 1) * 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void uniform16(uint64_t seed, int16_t *out, int64_t n, int32_t threads) {
    const int64_t words = n / 4;
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (int64_t w = 0; w < words; w++) {
        const uint64_t z = draw64(seed, w);
        memcpy(out + 4 * w, &z, sizeof z);
    }
    if (words * 4 < n) { /* the last, partial word */
        const uint64_t z = draw64(seed, words);
        memcpy(out + 4 * words, &z, (size_t)(n - 4 * words) * sizeof(int16_t));
    }
}

/* ------------------------------------------------------------------ softmax cross-entropy
 * logits (n, V) are overwritten by their softmax; loss[i] = -log softmax(logits_i)[target_i].
 * One row (64 KB at V = 16,015) stays in L2 across the three passes, so memory sees one read
 * and one write of the logits. */
void softmax_cross_entropy(float *logits, const int64_t *target, float *loss, int64_t n,
                           int64_t V, int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float *x = logits + i * V;
        float top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < V; j++) top = x[j] > top ? x[j] : top;
        const float picked = x[target[i]] - top;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < V; j++) {
            x[j] = exp_clamped(x[j] - top);
            total += x[j];
        }
        const float inv = 1.0f / total;
#pragma omp simd
        for (int64_t j = 0; j < V; j++) x[j] *= inv;
        loss[i] = logf(total) - picked;
    }
}

/* ------------------------------------------------------------------ residual + bias + dropout
 * out = h + keep * scale * (x + b) for h, x (rows, cols), b (cols): a residual branch after its
 * output projection (GPT-2's c_proj, whose GEMM then writes no bias). bits (rows, cols) int16
 * uniforms as in the attention, or NULL for no dropout. */
void residual_forward(const float *h, const float *x, const float *b, const int16_t *bits,
                      int32_t keep_below, float drop_scale, float *out, int64_t rows,
                      int64_t cols, int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t o = r * cols;
        if (bits) {
#pragma omp simd
            for (int64_t c = 0; c < cols; c++)
                out[o + c] = h[o + c] + (bits[o + c] < keep_below ? drop_scale : 0.0f) *
                                            (x[o + c] + b[c]);
        } else {
#pragma omp simd
            for (int64_t c = 0; c < cols; c++) out[o + c] = h[o + c] + (x[o + c] + b[c]);
        }
    }
}

/* dx = keep * scale * dout (dx may be NULL when bits is NULL: then dx is dout itself), and
 * db = the column sums of dx (partial: threads x cols floats of scratch, see reduce_partials). */
void residual_backward(const float *dout, const int16_t *bits, int32_t keep_below,
                       float drop_scale, float *dx, float *db, float *partial, int64_t rows,
                       int64_t cols, int32_t threads) {
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        ROW_RANGE(rows, t, nt, r0, r1);
        float *acc = partial + t * cols;
        memset(acc, 0, (size_t)cols * sizeof(float));
        for (int64_t r = r0; r < r1; r++) {
            const int64_t o = r * cols;
            if (bits) {
#pragma omp simd
                for (int64_t c = 0; c < cols; c++) {
                    dx[o + c] = (bits[o + c] < keep_below ? drop_scale : 0.0f) * dout[o + c];
                    acc[c] += dx[o + c];
                }
            } else {
#pragma omp simd
                for (int64_t c = 0; c < cols; c++) acc[c] += dout[o + c];
            }
        }
        reduce_partials(partial, db, cols, t, nt);
    }
}
