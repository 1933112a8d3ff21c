/* The small operations between a decode step's matrix products, one call each instead of a dozen torch ops.

   At decode a SmolLM2 layer is ~70 torch ops, most on a few thousand numbers: RMSNorm alone is a cast, pow,
   mean, add, rsqrt and two multiplies, rotary another seven. Each costs microseconds of dispatch, ~10 ms of a
   one-row step. These loops do the same arithmetic in one pass over each row (app/models/numerics/elementwise.py).
   Built with -ffast-math: sums are reordered and exp is glibc's vector expf, so results differ from torch's
   in the last bits. They run only in modes that are not token-exact against transformers anyway (the int4 x
   int8 mode); each row is computed on its own, by the same code whatever else is in the batch.

   Rows are split over `threads` from PARALLEL_ROWS rows on (a prompt pass's hundreds of rows ran these on one
   core, 14% of its time, while the other waited; at one row a fork costs more than the loop). A row's code is
   the same on either thread, so the split changes no result. */
#include <math.h>
#include <stddef.h>

#define PARALLEL_ROWS 8

/* row b of x (B, E), r's row b added first when r is given (the residual add before a norm) */
static inline float* add_row(float* restrict x, const float* restrict r, int b, int E) {
  float* xb = x + (size_t)b * E;
  if (r) {
    const float* rb = r + (size_t)b * E;
    for (int i = 0; i < E; i++) xb[i] += rb[i];
  }
  return xb;
}

/* x (B, E) += r (B, E) when r is given; h (B, E) = x / sqrt(mean(x^2) + eps) * w: LlamaRMSNorm after the residual. */
void add_rms_norm(float* restrict x, const float* restrict r, const float* restrict w, float eps, int B, int E,
                  float* restrict h, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads) if (B >= PARALLEL_ROWS)
  for (int b = 0; b < B; b++) {
    float* xb = add_row(x, r, b, E);
    float* hb = h + (size_t)b * E;
    float ss = 0.0f;
    for (int i = 0; i < E; i++) ss += xb[i] * xb[i];
    const float inv = 1.0f / sqrtf(ss / (float)E + eps);
    for (int i = 0; i < E; i++) hb[i] = w[i] * (xb[i] * inv);
  }
}

/* x (B, E) += r (B, E) when r is given; h (B, E) = (x - mean(x)) / sqrt(var(x) + eps) * w + b: GPT-2's LayerNorm
   after the residual (the biased variance, as torch's). */
void add_layer_norm(float* restrict x, const float* restrict r, const float* restrict w, const float* restrict bias,
                    float eps, int B, int E, float* restrict h, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads) if (B >= PARALLEL_ROWS)
  for (int b = 0; b < B; b++) {
    float* xb = add_row(x, r, b, E);
    float* hb = h + (size_t)b * E;
    float sum = 0.0f;
    for (int i = 0; i < E; i++) sum += xb[i];
    const float mean = sum / (float)E;
    float ss = 0.0f;
    for (int i = 0; i < E; i++) ss += (xb[i] - mean) * (xb[i] - mean);
    const float inv = 1.0f / sqrtf(ss / (float)E + eps);
    for (int i = 0; i < E; i++) hb[i] = (xb[i] - mean) * inv * w[i] + bias[i];
  }
}

/* y (B, N) = gelu(y) in place, the tanh form (GPT-2's gelu_new, torch's gelu(approximate="tanh")):
   0.5 y (1 + tanh(sqrt(2 / pi) (y + 0.044715 y^3))). */
void gelu_tanh(float* restrict y, int B, int N, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads) if (B >= PARALLEL_ROWS)
  for (int b = 0; b < B; b++) {
    float* yb = y + (size_t)b * N;
    for (int i = 0; i < N; i++) {
      const float v = yb[i];
      yb[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
  }
}

/* y (B, (HQ + 2 HKV) D), the fused q/k/v product -> q (B, HQ, D) and k (B, HKV, D) rotated by cos, sin (B, D)
   (rotate_half: the first half of a head pairs with the second), v (B, HKV, D) copied. cos NULL: no rotation
   (GPT-2's positions are in its embeddings), q and k copied too. */
void rope_split(const float* restrict y, const float* restrict cos_, const float* restrict sin_, int B, int HQ,
                int HKV, int D, float* restrict q, float* restrict k, float* restrict v, int threads) {
  const int half = D / 2, width = (HQ + 2 * HKV) * D;
  #pragma omp parallel for schedule(static) num_threads(threads) if (B >= PARALLEL_ROWS)
  for (int b = 0; b < B; b++) {
    const float* yb = y + (size_t)b * width;
    const float* c = cos_ ? cos_ + (size_t)b * D : NULL;
    const float* s = cos_ ? sin_ + (size_t)b * D : NULL;
    if (!cos_) {
      for (int i = 0; i < HQ * D; i++) q[(size_t)b * HQ * D + i] = yb[i];
      for (int i = 0; i < HKV * D; i++) k[(size_t)b * HKV * D + i] = yb[HQ * D + i];
    }
    for (int h = 0; h < (cos_ ? HQ + HKV : 0); h++) {
      const float* src = yb + h * D;
      float* dst = h < HQ ? q + ((size_t)b * HQ + h) * D : k + ((size_t)b * HKV + (h - HQ)) * D;
      for (int i = 0; i < half; i++) dst[i] = src[i] * c[i] - src[i + half] * s[i];
      for (int i = half; i < D; i++) dst[i] = src[i] * c[i] + src[i - half] * s[i];
    }
    const float* vb = yb + (HQ + HKV) * D;
    float* vo = v + (size_t)b * HKV * D;
    for (int i = 0; i < HKV * D; i++) vo[i] = vb[i];
  }
}

/* g (B, 2 I), the fused gate/up product -> m (B, I) = silu(gate) * up. */
void silu_mul(const float* restrict g, int B, int I, float* restrict m, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads) if (B >= PARALLEL_ROWS)
  for (int b = 0; b < B; b++) {
    const float* gate = g + (size_t)b * 2 * I;
    const float* up = gate + I;
    float* mb = m + (size_t)b * I;
    for (int i = 0; i < I; i++) mb[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
  }
}

/* out[r] = the first index of row r's largest value, x (R, V): greedy decoding's pick. torch's argmax ran
   ~1.3 ms over 32 x 49,152 logits here (0.8 ns a value); a vector max, then a scan for its first position, reads
   each row twice from cache. NaN is not ordered (-ffast-math): rows of NaN logits get an arbitrary index. */
void argmax_rows(const float* restrict x, int R, int V, long long* restrict out, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads) if (R >= PARALLEL_ROWS)
  for (int r = 0; r < R; r++) {
    const float* xr = x + (size_t)r * V;
    float m = xr[0];
    for (int i = 1; i < V; i++) m = xr[i] > m ? xr[i] : m;
    int at = 0;
    while (at < V - 1 && xr[at] != m) at++;
    out[r] = at;
  }
}
