/* Causal attention of whole prompts, several in one call: each prompt's tokens attend to the prompt's tokens up
   to their own, query heads grouped by key-value head (G per head). What a prefill computes between its
   products, on the K/V just computed (fp32, as the model's own forward attends).

   Why: PyTorch's CPU flash kernel runs ~35-55 GFLOP/s on prompts of 20-500 tokens (sdpa: 0.4-0.5 ms a layer
   for a 110-token SmolLM2 prompt). Here keys are transposed once per prompt and head, so 16 scores are one
   vector and every key vector loaded serves 8 query rows; the softmax is exact (two passes over a row's
   scores, which fit: a prompt here is at most a chunk). Built at run time with the model's shape as
   constants (app/models/prompt_attention.py): D (head dim, a multiple of 16), G (query heads per key-value
   head), H (key-value heads).

   q (T, H*G, D), k and v (T, H, D): the prompts' rows one after another, prompt p's rows [off[p], off[p+1]);
   out (T, H*G, D). kt: scratch (H, sum over prompts of n rounded up to 16, D). A row's result depends on its
   prompt only. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BS 16   /* keys per score vector */
#define QT 16   /* query positions per work item: G * QT rows */
#define RQ 8    /* query rows per score pass (accumulators) */
#define RP 4    /* query rows per value pass (RP * D / 16 accumulators) */
#define HG (H * G)
typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float* p) { v16 x; __builtin_memcpy(&x, p, sizeof x); return x; }
static inline void store16(float* p, v16 x) { __builtin_memcpy(p, &x, sizeof x); }
static inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* rows [i0, i1) of one prompt (n tokens) and head h: kt (D, npad) its keys transposed, k/v rows strided. */
static void tile(const float* restrict q, const float* restrict kt, int npad, const float* restrict v, int h,
                 int i0, int i1, float scale, float* restrict s, float* restrict out) {
  const int rows = (i1 - i0) * G, width = (i1 + BS - 1) / BS * BS;  /* keys [0, i1), in whole vectors */
  /* scores: row r = (position i0 + r / G, head h * G + r % G), keys [0, width) */
  for (int r0 = 0; r0 < rows; r0 += RQ) {
    const int rq = rows - r0 < RQ ? rows - r0 : RQ;
    const int last = i0 + (r0 + rq - 1) / G;  /* the block's last position: no key past it is needed */
    float qs[RQ][D];
    for (int r = rq; r < RQ; r++) for (int d = 0; d < D; d++) qs[r][d] = 0.f;
    for (int r = 0; r < rq; r++) {
      const float* qr = q + ((size_t)(i0 + (r0 + r) / G) * HG + h * G + (r0 + r) % G) * D;
      for (int d = 0; d < D; d++) qs[r][d] = qr[d] * scale;
    }
    for (int j0 = 0; j0 <= last; j0 += BS) {
      v16 acc[RQ];
      for (int r = 0; r < RQ; r++) acc[r] = splat(0.f);
      for (int d = 0; d < D; d++) {
        const v16 key = load16(kt + (size_t)d * npad + j0);
        for (int r = 0; r < RQ; r++) acc[r] += splat(qs[r][d]) * key;  /* rows past rq: unused */
      }
      for (int r = 0; r < rq; r++) store16(s + (size_t)(r0 + r) * width + j0, acc[r]);
    }
  }
  /* softmax over each row's keys [0, position] */
  for (int r = 0; r < rows; r++) {
    float* sr = s + (size_t)r * width;
    const int n = i0 + r / G + 1;
    float m = -FLT_MAX, l = 0.f;
    for (int j = 0; j < n; j++) m = sr[j] > m ? sr[j] : m;
    for (int j = 0; j < n; j++) { const float e = expf(sr[j] - m); sr[j] = e; l += e; }
    const float inv = 1.f / l;
    for (int j = 0; j < n; j++) sr[j] *= inv;
    for (int j = n; j < width; j++) sr[j] = 0.f;
  }
  /* values: out[row] = sum_j p[row][j] v[j] */
  for (int r0 = 0; r0 < rows; r0 += RP) {
    const int rp = rows - r0 < RP ? rows - r0 : RP;
    const int n = i0 + (r0 + rp - 1) / G + 1;
    v16 o[RP][D / 16];
    for (int r = 0; r < RP; r++) for (int c = 0; c < D / 16; c++) o[r][c] = splat(0.f);
    for (int j = 0; j < n; j++) {
      const float* vj = v + ((size_t)j * H + h) * D;
      for (int c = 0; c < D / 16; c++) {
        const v16 val = load16(vj + c * 16);
        for (int r = 0; r < RP; r++) o[r][c] += splat(r < rp ? s[(size_t)(r0 + r) * width + j] : 0.f) * val;
      }
    }
    for (int r = 0; r < rp; r++) {
      float* orow = out + ((size_t)(i0 + (r0 + r) / G) * HG + h * G + (r0 + r) % G) * D;
      for (int c = 0; c < D / 16; c++) store16(orow + c * 16, o[r][c]);
    }
  }
}

void prompt_attention(const float* restrict q, const float* restrict k, const float* restrict v,
                      const int32_t* restrict off, int prompts, float scale, float* restrict kt,
                      float* restrict out, int threads) {
  int most = 0, items = 0;
  for (int p = 0; p < prompts; p++) {
    const int n = off[p + 1] - off[p];
    most = n > most ? n : most;
    items += H * ((n + QT - 1) / QT);
  }
  int kbase[prompts + 1];  /* prompt p's keys start at column kbase[p] * D of each head's kt */
  kbase[0] = 0;
  for (int p = 0; p < prompts; p++) kbase[p + 1] = kbase[p] + (off[p + 1] - off[p] + BS - 1) / BS * BS;
  const size_t head_kt = (size_t)kbase[prompts] * D;
  #pragma omp parallel num_threads(threads)
  {
    /* keys transposed, per prompt and head: (D, npad), zero past the prompt */
    #pragma omp for schedule(static)
    for (int ph = 0; ph < prompts * H; ph++) {
      const int p = ph / H, h = ph % H, n = off[p + 1] - off[p], npad = kbase[p + 1] - kbase[p];
      float* dst = kt + h * head_kt + (size_t)kbase[p] * D;
      for (int d = 0; d < D; d++) {
        for (int j = 0; j < n; j++) dst[(size_t)d * npad + j] = k[((size_t)(off[p] + j) * H + h) * D + d];
        for (int j = n; j < npad; j++) dst[(size_t)d * npad + j] = 0.f;
      }
    }
    float* s = malloc(sizeof(float) * (size_t)G * QT * ((most + BS - 1) / BS * BS));
    /* work items: (prompt, head, tile of QT positions), the longest tiles (the prompts' ends) spread first */
    #pragma omp for schedule(dynamic, 1)
    for (int it = 0; it < items; it++) {
      int p = 0, rest = it;
      while (rest >= H * ((off[p + 1] - off[p] + QT - 1) / QT)) { rest -= H * ((off[p + 1] - off[p] + QT - 1) / QT); p++; }
      const int n = off[p + 1] - off[p], tiles = (n + QT - 1) / QT;
      const int h = rest % H, t = tiles - 1 - rest / H;
      const int i0 = t * QT, i1 = i0 + QT < n ? i0 + QT : n;
      tile(q + (size_t)off[p] * HG * D, kt + h * head_kt + (size_t)kbase[p] * D, kbase[p + 1] - kbase[p],
           v + (size_t)off[p] * H * D, h, i0, i1, scale, s, out + (size_t)off[p] * HG * D);
    }
    free(s);
  }
}
