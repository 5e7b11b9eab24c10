/* Decode attention on the CPU: the two products of one decode step over a KV cache, fp32.
 *
 * Groups i in [i0, i1) (one key/value head of one row each), P query heads per group, T key
 * columns, head dim D (a multiple of 16, at most 256), 1 <= P <= 16:
 *
 *   s[i, p, t] = scale * (q[i, p] . k[i, t]) + bias[i / G, t]
 *   o[i, p]    = sum_t softmax_t(s[i, p])[t] * v[i, t]
 *
 * one group after the other, its scores in the workspace s ([P, T], reused by every group: it
 * stays in the cache between the three passes). q / o rows are contiguous ([P, D] per group);
 * k / v rows ([T, D] per group) are contiguous with group stride kv_si; bias rows (one per G
 * groups) have stride b_si.
 * Every key and value row is loaded from memory once: the scores accumulate R = 16 / P rows x P
 * queries in 16 registers of 16 lanes and sum their lanes together (a transpose of the 16
 * accumulators); the values accumulate 16 / (D / 16) queries' rows in registers per pass.
 * Sums are fp32 in another order than a BLAS GEMM (differences of a few ulp); exp is a polynomial
 * (below).
 *
 * Built and loaded by vigos_megatron/rollout/cpu_attention.py (GCC: its vector extensions and
 * __builtin_shuffle; another compiler fails the build and the torch path runs). */
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t m16 __attribute__((vector_size(64)));

/* lane c of the result: the sum of the 16 lanes of v[c] */
static inline v16 transpose_sum16(const v16 *v) {
    const m16 a1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const m16 b1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const m16 a2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const m16 b2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const m16 a3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const m16 b3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const m16 a4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const m16 b4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    v16 w[8], x[4], y[2];
    for (int c = 0; c < 8; c++)
        w[c] = __builtin_shuffle(v[2 * c], v[2 * c + 1], a1) + __builtin_shuffle(v[2 * c], v[2 * c + 1], b1);
    for (int c = 0; c < 4; c++)
        x[c] = __builtin_shuffle(w[2 * c], w[2 * c + 1], a2) + __builtin_shuffle(w[2 * c], w[2 * c + 1], b2);
    for (int c = 0; c < 2; c++)
        y[c] = __builtin_shuffle(x[2 * c], x[2 * c + 1], a3) + __builtin_shuffle(x[2 * c], x[2 * c + 1], b3);
    return __builtin_shuffle(y[0], y[1], a4) + __builtin_shuffle(y[0], y[1], b4);
}

/* one group's scores for PP queries, R = 16 / PP key rows per tile (rows past T read as zeros) */
#define SCORES_P(PP)                                                                                   \
    static void scores_p##PP(const float *q, const float *k, const float *bias, float *s, int64_t T,  \
                             int64_t D, float scale) {                                                \
        enum { R = 16 / PP };                                                                          \
        const int64_t nv = D / 16;                                                                     \
        float pad[R * 256];                                                                            \
        float dots[16];                                                                                \
        for (int64_t t0 = 0; t0 < T; t0 += R) {                                                        \
            const int64_t nr = T - t0 < R ? T - t0 : R;                                                \
            const float *kt = k + t0 * D;                                                              \
            if (nr < R) {                                                                              \
                memset(pad, 0, sizeof(float) * R * D);                                                 \
                memcpy(pad, kt, sizeof(float) * nr * D);                                               \
                kt = pad;                                                                              \
            }                                                                                          \
            v16 acc[16] = {{0}};                                                                       \
            for (int64_t j = 0; j < nv; j++) {                                                         \
                v16 kx[R];                                                                             \
                _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) memcpy(&kx[r], kt + r * D + 16 * j, 64); \
                _Pragma("GCC unroll 16") for (int p = 0; p < PP; p++) {                                \
                    v16 qv;                                                                            \
                    memcpy(&qv, q + p * D + 16 * j, 64);                                               \
                    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) acc[r * PP + p] += kx[r] * qv; \
                }                                                                                      \
            }                                                                                          \
            v16 sums = transpose_sum16(acc);                                                           \
            memcpy(dots, &sums, sizeof dots);                                                          \
            for (int p = 0; p < PP; p++)                                                               \
                for (int64_t r = 0; r < nr; r++) s[p * T + t0 + r] = scale * dots[r * PP + p] + bias[t0 + r]; \
        }                                                                                              \
    }

SCORES_P(1) SCORES_P(2) SCORES_P(3) SCORES_P(4) SCORES_P(5) SCORES_P(6) SCORES_P(7) SCORES_P(8)
SCORES_P(9) SCORES_P(10) SCORES_P(11) SCORES_P(12) SCORES_P(13) SCORES_P(14) SCORES_P(15) SCORES_P(16)

typedef void (*scores_fn)(const float *, const float *, const float *, float *, int64_t, int64_t, float);
static const scores_fn SCORES[17] = {0, scores_p1, scores_p2, scores_p3, scores_p4, scores_p5, scores_p6,
                                     scores_p7, scores_p8, scores_p9, scores_p10, scores_p11, scores_p12,
                                     scores_p13, scores_p14, scores_p15, scores_p16};

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
/* Scores for PP = 16 / W in {1, 2, 4} queries: lanes (p, e) of a register hold query p's elements
 * j * W + e (qq[j]), each key row's W elements are broadcast to all PP lane groups, and R = W rows
 * accumulate in R registers; lane groups are then summed in log2(W) rounds of shuffles (two
 * registers into one per round), which leaves row r's dot with query p in lane p * W + bitrev(r).
 * Fewer shuffles than the tile kernel above: 9 instead of 45 per 16 dots at PP = 4. */
#define BCAST_P(PP, W, LOAD)                                                                           \
    static void bcast_p##PP(const float *q, const float *k, const float *bias, float *s, int64_t T,   \
                            int64_t D, float scale) {                                                  \
        enum { R = W };                                                                                \
        const int64_t nj = D / W;                                                                      \
        v16 qq[256];                                                                                   \
        for (int64_t j = 0; j < nj; j++)                                                               \
            for (int l = 0; l < 16; l++) qq[j][l] = q[(l / W) * D + j * W + l % W];                    \
        m16 ma[4], mb[4], order;                                                                       \
        int rounds = 0;                                                                                \
        for (int e = W; e > 1; e /= 2, rounds++)                                                       \
            for (int l = 0; l < 16; l++) {                                                             \
                const int rem = l % W, half = e / 2;                                                   \
                const int a = (rem % e) / half * 16 + (l - rem) + (rem - rem % e) + rem % half;        \
                ma[rounds][l] = a;                                                                     \
                mb[rounds][l] = a + half;                                                              \
            }                                                                                          \
        for (int l = 0; l < 16; l++) { /* lane p * W + r <- lane p * W + bitrev(r) */                  \
            int r = l % W, rev = 0;                                                                    \
            for (int b = 0; b < rounds; b++) rev |= ((r >> b) & 1) << (rounds - 1 - b);                \
            order[l] = l - r + rev;                                                                    \
        }                                                                                              \
        const v16 vscale = (v16){0} + scale;                                                           \
        float pad[R * 256 + 16], out[16], stage[16 * 16];                                              \
        for (int64_t t0 = 0; t0 < T; t0 += R) {                                                        \
            const int64_t nr = T - t0 < R ? T - t0 : R;                                                \
            const float *kt = k + t0 * D, *bt = bias + t0;                                             \
            if (nr < R) {                                                                              \
                memset(pad, 0, sizeof(float) * (R * D + 16));                                          \
                memcpy(pad, kt, sizeof(float) * nr * D);                                               \
                memcpy(pad + R * D, bt, sizeof(float) * nr);                                           \
                kt = pad, bt = pad + R * D;                                                            \
            }                                                                                          \
            v16 acc[R];                                                                                \
            _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) acc[r] = (v16){0};                    \
            for (int64_t j = 0; j < nj; j++) {                                                         \
                _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {                                 \
                    const float *x = kt + r * D + j * W;                                               \
                    acc[r] = (v16)_mm512_fmadd_ps(LOAD, (__m512)qq[j], (__m512)acc[r]);                \
                }                                                                                      \
            }                                                                                          \
            _Pragma("GCC unroll 4") for (int n = R, b = 0; n > 1; n /= 2, b++)                         \
                _Pragma("GCC unroll 8") for (int c = 0; c < n / 2; c++)                                \
                    acc[c] = __builtin_shuffle(acc[2 * c], acc[2 * c + 1], ma[b])                      \
                             + __builtin_shuffle(acc[2 * c], acc[2 * c + 1], mb[b]);                   \
            const float *x = bt;                                                                       \
            const v16 res = vscale * __builtin_shuffle(acc[0], order) + (v16)(LOAD);                   \
            memcpy(out, &res, sizeof out);                                                             \
            const int64_t c = (t0 / R) % 16; /* rows staged per query: written 16 tiles at a time */   \
            _Pragma("GCC unroll 16") for (int p = 0; p < PP; p++)                                      \
                memcpy(stage + p * 16 * R + c * R, out + p * W, sizeof(float) * R);                    \
            if (c == 15 || t0 + nr == T) {                                                             \
                const int64_t first = t0 - c * R;                                                      \
                for (int p = 0; p < PP; p++)                                                           \
                    memcpy(s + p * T + first, stage + p * 16 * R, sizeof(float) * (t0 + nr - first));  \
            }                                                                                          \
        }                                                                                              \
    }

BCAST_P(1, 16, _mm512_loadu_ps(x))
BCAST_P(2, 8, _mm512_broadcast_f32x8(_mm256_loadu_ps(x)))
BCAST_P(4, 4, _mm512_broadcast_f32x4(_mm_loadu_ps(x)))

static scores_fn scores_kernel(int64_t P) {
    return P == 1 ? bcast_p1 : P == 2 ? bcast_p2 : P == 4 ? bcast_p4 : SCORES[P];
}
#else
static scores_fn scores_kernel(int64_t P) { return SCORES[P]; }
#endif

static int bad_shape(int64_t P, int64_t D) { return P < 1 || P > 16 || D < 16 || D % 16 != 0 || D > 256; }

/* one group's values for P queries, NV = D / 16 vectors per row, B = 16 / NV queries per pass */
#define VALUES_NV(NV)                                                                                  \
    static void values_nv##NV(const float *pr, const float *v, float *o, int64_t P, int64_t T) {       \
        enum { B = 16 / NV, D = 16 * NV };                                                             \
        for (int64_t p0 = 0; p0 < P; p0 += B) {                                                        \
            const int64_t np = P - p0 < B ? P - p0 : B;                                                \
            const float *pp = pr + p0 * T;                                                             \
            v16 acc[16] = {{0}};                                                                       \
            for (int64_t t = 0; t < T; t++) {                                                          \
                v16 x[NV];                                                                             \
                _Pragma("GCC unroll 16") for (int j = 0; j < NV; j++) memcpy(&x[j], v + t * D + 16 * j, 64); \
                _Pragma("GCC unroll 16") for (int p = 0; p < B; p++) {                                 \
                    if (p < np) {                                                                      \
                        const float w = pp[p * T + t];                                                 \
                        _Pragma("GCC unroll 16") for (int j = 0; j < NV; j++) acc[p * NV + j] += w * x[j]; \
                    }                                                                                  \
                }                                                                                      \
            }                                                                                          \
            memcpy(o + p0 * D, acc, sizeof(float) * np * D);                                           \
        }                                                                                              \
    }

VALUES_NV(1) VALUES_NV(2) VALUES_NV(3) VALUES_NV(4) VALUES_NV(5) VALUES_NV(6) VALUES_NV(7) VALUES_NV(8)
VALUES_NV(9) VALUES_NV(10) VALUES_NV(11) VALUES_NV(12) VALUES_NV(13) VALUES_NV(14) VALUES_NV(15) VALUES_NV(16)

typedef void (*values_fn)(const float *, const float *, float *, int64_t, int64_t);
static const values_fn VALUES[17] = {0, values_nv1, values_nv2, values_nv3, values_nv4, values_nv5, values_nv6,
                                     values_nv7, values_nv8, values_nv9, values_nv10, values_nv11, values_nv12,
                                     values_nv13, values_nv14, values_nv15, values_nv16};

/* exp(x) for x <= 0 (a softmax row minus its maximum), Cody-Waite reduction x = n ln2 + r and
 * Cephes' degree-7 polynomial for exp(r) (relative error about 2e-7); 0 where x < -87.3 (below
 * the smallest normal float; -inf included) */
static inline v16 exp_nonpositive(v16 x) {
    const m16 keep = x >= ((v16){0} - 87.3f);
    x = (v16)((m16)x & keep); /* dropped lanes compute exp(0), then read 0 */
    const v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    const v16 r = x - n * 0.693359375f - n * -2.12194440e-4f;
    v16 y = (v16){0} + 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const m16 pow2 = (__builtin_convertvector(n, m16) + 127) << 23;
    return (v16)((m16)(y * (v16)pow2) & keep);
}

/* softmax of one row of T scores, in place */
static void softmax_row(float *x, int64_t T) {
    const int64_t full = T - T % 16;
    v16 vmax = (v16){0} - __builtin_inff();
    for (int64_t t = 0; t < full; t += 16) {
        v16 a;
        memcpy(&a, x + t, 64);
        vmax = (v16)((m16)vmax & (vmax >= a)) + (v16)((m16)a & ~(vmax >= a));
    }
    float m = -__builtin_inff();
    for (int l = 0; l < 16; l++) m = vmax[l] > m ? vmax[l] : m;
    for (int64_t t = full; t < T; t++) m = x[t] > m ? x[t] : m;
    v16 vsum = {0};
    for (int64_t t = 0; t < full; t += 16) {
        v16 a;
        memcpy(&a, x + t, 64);
        a = exp_nonpositive(a - m);
        memcpy(x + t, &a, 64);
        vsum += a;
    }
    if (full < T) { /* the tail in one padded register (absent lanes -inf: exp 0) */
        v16 a = (v16){0} - __builtin_inff();
        memcpy(&a, x + full, sizeof(float) * (T - full));
        a = exp_nonpositive(a - m);
        memcpy(x + full, &a, sizeof(float) * (T - full));
        vsum += a;
    }
    float sum = 0.f;
    for (int l = 0; l < 16; l++) sum += vsum[l];
    const float inv = 1.0f / sum;
    for (int64_t t = 0; t < T; t++) x[t] *= inv;
}

int decode_attention(const float *q, const float *k, const float *v, const float *bias, float *s, float *o,
                     int64_t i0, int64_t i1, int64_t G, int64_t P, int64_t T, int64_t D, int64_t kv_si,
                     int64_t b_si, float scale) {
    if (bad_shape(P, D)) return 1;
    for (int64_t i = i0; i < i1; i++) {
        scores_kernel(P)(q + i * P * D, k + i * kv_si, bias + (i / G) * b_si, s, T, D, scale);
        for (int64_t p = 0; p < P; p++) softmax_row(s + p * T, T);
        VALUES[D / 16](s, v + i * kv_si, o + i * P * D, P, T);
    }
    return 0;
}
