/* A linear layer's product on the CPU, fp32:  y[m, n] = sum_k x[m, k] * w[n, k]  (y = x W^T).
 *
 * The weight W [N, K] (torch's Linear layout) is packed once into panels of NB = 32 output
 * columns, k-major: wp[j, k, c] = W[j * NB + c, k] (zero past N), so a panel's row for one k is
 * two 16-lane vectors. For each panel, rows of x go in chunks of up to MR = 8: 2 * MR accumulator
 * registers, and per k two vector loads of the panel and 2 * MR multiply-adds with x[m, k]
 * broadcast. A decode step (a few rows) thus streams every weight element once at the memory's
 * rate with no horizontal sums; rows are taken in blocks of MB = 128 (the block's x stays in the
 * L2 cache while the panels stream past it), which keeps larger products (a prefill) at the
 * core's multiply-add rate.
 * Each y[m, n] is one fp32 sum in k order (another order than a BLAS GEMM: a few ulp apart), the
 * same whichever panels [j0, j1) a call computes: results do not depend on the thread split.
 *
 * Built and loaded by vigos_megatron/rollout/cpu_kernels.py (GCC vector extensions). */
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));

enum { NB = 32, MR = 8, MB = 128 };

/* rows [0, MR') of x (stride K) times one panel into y (stride ldy), its first nvalid columns */
#define PANEL(MRR)                                                                                  \
    static void panel_##MRR(const float *x, const float *wp, float *y, int64_t K, int64_t ldy,     \
                            int64_t nvalid) {                                                       \
        v16 a0[MRR], a1[MRR];                                                                       \
        for (int m = 0; m < MRR; m++)                                                               \
            a0[m] = a1[m] = (v16){0};                                                               \
        for (int64_t k = 0; k < K; k++) {                                                           \
            const v16 w0 = *(const v16 *)(wp + k * NB), w1 = *(const v16 *)(wp + k * NB + 16);     \
            for (int m = 0; m < MRR; m++) {                                                         \
                const float xv = x[m * K + k];                                                      \
                a0[m] += xv * w0;                                                                   \
                a1[m] += xv * w1;                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int m = 0; m < MRR; m++) {                                                             \
            float row[NB];                                                                          \
            memcpy(row, &a0[m], sizeof(v16));                                                       \
            memcpy(row + 16, &a1[m], sizeof(v16));                                                  \
            memcpy(y + m * ldy, row, sizeof(float) * nvalid);                                       \
        }                                                                                           \
    }

PANEL(1) PANEL(2) PANEL(3) PANEL(4) PANEL(5) PANEL(6) PANEL(7) PANEL(8)

typedef void (*panel_fn)(const float *, const float *, float *, int64_t, int64_t, int64_t);
static const panel_fn PANELS[MR + 1] = {0, panel_1, panel_2, panel_3, panel_4, panel_5, panel_6, panel_7, panel_8};

/* panels [j0, j1) of W [N, K] into wp ([ceil(N / NB), K, NB]) */
void pack_weight(const float *w, float *wp, int64_t N, int64_t K, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        float *panel = wp + j * K * NB;
        for (int64_t c = 0; c < NB; c++) {
            const int64_t n = j * NB + c;
            if (n < N) {
                const float *src = w + n * K;
                for (int64_t k = 0; k < K; k++)
                    panel[k * NB + c] = src[k];
            } else {
                for (int64_t k = 0; k < K; k++)
                    panel[k * NB + c] = 0.f;
            }
        }
    }
}

/* y [M, N] columns of panels [j0, j1) from x [M, K] and the packed wp */
void linear(const float *x, const float *wp, float *y, int64_t M, int64_t K, int64_t N, int64_t j0, int64_t j1) {
    for (int64_t mb = 0; mb < M; mb += MB) {
        const int64_t me = mb + MB < M ? mb + MB : M;
        for (int64_t j = j0; j < j1; j++) {
            const int64_t nvalid = N - j * NB < NB ? N - j * NB : NB;
            for (int64_t m0 = mb; m0 < me; m0 += MR) {
                const int64_t mr = me - m0 < MR ? me - m0 : MR;
                PANELS[mr](x + m0 * K, wp + j * K * NB, y + m0 * N + j * NB, K, N, nvalid);
            }
        }
    }
}
