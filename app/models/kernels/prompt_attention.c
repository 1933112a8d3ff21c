/* Causal attention of whole prompts, several in one call: each prompt's tokens attend to the prompt's tokens up
   to their own, query heads grouped by key-value head (G per head). What a prefill computes between its
   products, on the K/V just computed (fp32, as the model's own forward attends).

   Why: PyTorch's CPU flash kernel runs ~35-55 GFLOP/s on prompts of 20-500 tokens (sdpa: 0.4-0.5 ms a layer
   for a 110-token SmolLM2 prompt). Here keys are transposed once per prompt and head, so 16 scores are one
   vector and every key vector loaded serves 8 query rows; the softmax is exact (two passes over a row's
   scores, which fit: a prompt here is at most a chunk). Built at run time with the model's shape as
   constants (app/models/layers/prompt_attention.py): D (head dim, a multiple of 16), G (query heads per key-value
   head), H (key-value heads), KV_BF16 / KV_I8 (the cache's K/V dtype, for `prompt_attention_cached`; int8
   blocks end with their tokens' scales, kv_type.h).

   `prompt_attention_cached` does the same for passes after tokens a prompt's segment already holds (chunks,
   reused prefixes), reading K/V where they lie in the cache.

   q (T, H*G, D), k and v (T, H, D): the prompts' rows one after another, prompt p's rows [off[p], off[p+1]);
   out (T, H*G, D). kt: scratch (H, sum over prompts of n rounded up to 16, D). A row's result depends on its
   prompt only. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kv_type.h"  /* vn (VW floats), loadn, storen; kv_t, loadkv: fp32 or bf16 K/V (KV_BF16) */

#define BS 16   /* keys per block of scores (the cache's block) */
#define QT 16   /* query positions per work item: G * QT rows */
/* query rows per score pass (RQ * 16 / VW accumulators) and per value pass (RP * D / VW): 8 accumulators of
   the 32 AVX-512 has, of the 16 AVX2 has (measured on Zen 2: RQ 4 / RP 1 the fastest there) */
#if VW == 16
#define RQ 8
#define RP 4
#else
#define RQ 4
#define RP 1
#endif
#define HG (H * G)
#define BLK KV_BLOCK(D, BS)  /* kv_t elements per block of the cache: its tokens' values, then any scales */

/* Query rows [i0, i1) of one prompt's pass and head h; the pass's tokens sit at positions base + i, after
   `base` tokens the prompt's segment already holds (0: a prompt from its first token). Keys and values: with
   `cached`, the prompt's segment of the cache (kc: head h's blocks (NB, D, 16), vc: (NB, 16, D)), which holds
   the pass's own tokens too; else the pass's fresh ones (kt (D, npad) transposed, v rows strided). */
static inline __attribute__((always_inline)) void tile(
    const int cached, const float* restrict q, const float* restrict kt, int npad, const float* restrict v,
    const kv_t* restrict kc, const kv_t* restrict vc, int h, int base, int i0, int i1, float scale,
    float* restrict s, float* restrict out) {
  const int rows = (i1 - i0) * G, width = (base + i1 + BS - 1) / BS * BS;  /* keys [0, base + i1) */
  /* scores: row r = (position base + i0 + r / G, head h * G + r % G), keys [0, width) */
  for (int r0 = 0; r0 < rows; r0 += RQ) {
    const int rq = rows - r0 < RQ ? rows - r0 : RQ;
    const int last = base + i0 + (r0 + rq - 1) / G;  /* the block's last position: no key past it is needed */
    float qs[RQ][D];
    for (int r = rq; r < RQ; r++) for (int d = 0; d < D; d++) qs[r][d] = 0.f;
    for (int r = 0; r < rq; r++) {
      const float* qr = q + ((size_t)(i0 + (r0 + r) / G) * HG + h * G + (r0 + r) % G) * D;
      for (int d = 0; d < D; d++) qs[r][d] = qr[d] * scale;
    }
    for (int j0 = 0; j0 <= last; j0 += BS) {
      vn acc[RQ][BS / VW];
      for (int r = 0; r < RQ; r++) for (int c = 0; c < BS / VW; c++) acc[r][c] = (vn){0};
      const kv_t* kb = cached ? kc + (size_t)(j0 / BS) * BLK : NULL;
      for (int d = 0; d < D; d++) {
        for (int c = 0; c < BS / VW; c++) {
          const vn key = cached ? loadkv(kb + d * BS + c * VW) : loadn(kt + (size_t)d * npad + j0 + c * VW);
          for (int r = 0; r < RQ; r++) acc[r][c] += qs[r][d] * key;  /* rows past rq: unused */
        }
      }
#if KV_I8
      if (cached)  /* int8 keys: the scores times each token's scale */
        for (int c = 0; c < BS / VW; c++) {
          const vn ks = loadn((const float*)(kb + D * BS) + c * VW);
          for (int r = 0; r < rq; r++) acc[r][c] *= ks;
        }
#endif
      for (int r = 0; r < rq; r++)
        for (int c = 0; c < BS / VW; c++) storen(s + (size_t)(r0 + r) * width + j0 + c * VW, acc[r][c]);
    }
  }
  /* softmax over each row's keys [0, position] */
  for (int r = 0; r < rows; r++) {
    float* sr = s + (size_t)r * width;
    const int n = base + i0 + r / G + 1;
    float m = -FLT_MAX, l = 0.f;
    for (int j = 0; j < n; j++) m = sr[j] > m ? sr[j] : m;
    for (int j = 0; j < n; j++) { const float e = expf(sr[j] - m); sr[j] = e; l += e; }
    const float inv = 1.f / l;
    for (int j = 0; j < n; j++) sr[j] *= inv;
#if KV_I8
    if (cached)  /* int8 values: each weight times its token's scale */
      for (int j = 0; j < n; j++) sr[j] *= ((const float*)(vc + (size_t)(j / BS) * BLK + D * BS))[j % BS];
#endif
    for (int j = n; j < width; j++) sr[j] = 0.f;
  }
  /* values: out[row] = sum_j p[row][j] v[j] */
  for (int r0 = 0; r0 < rows; r0 += RP) {
    const int rp = rows - r0 < RP ? rows - r0 : RP;
    const int n = base + i0 + (r0 + rp - 1) / G + 1;
    vn o[RP][D / VW];
    for (int r = 0; r < RP; r++) for (int c = 0; c < D / VW; c++) o[r][c] = (vn){0};
    for (int j = 0; j < n; j++) {
      for (int c = 0; c < D / VW; c++) {
        const vn val = cached ? loadkv(vc + (size_t)(j / BS) * BLK + (size_t)(j % BS) * D + c * VW)
                              : loadn(v + ((size_t)j * H + h) * D + c * VW);
        for (int r = 0; r < RP; r++) o[r][c] += (r < rp ? s[(size_t)(r0 + r) * width + j] : 0.f) * val;
      }
    }
    for (int r = 0; r < rp; r++) {
      float* orow = out + ((size_t)(i0 + (r0 + r) / G) * HG + h * G + (r0 + r) % G) * D;
      for (int c = 0; c < D / VW; c++) storen(orow + c * VW, o[r][c]);
    }
  }
}

/* Work item `it` of a call: (prompt p, head h, query rows [i0, i1)), each prompt's tiles last first (its
   longest: spread over the threads first). */
static void item(const int32_t* off, int it, int* p, int* h, int* i0, int* i1) {
  int q = 0, rest = it;
  while (rest >= H * ((off[q + 1] - off[q] + QT - 1) / QT)) { rest -= H * ((off[q + 1] - off[q] + QT - 1) / QT); q++; }
  const int n = off[q + 1] - off[q], t = (n + QT - 1) / QT - 1 - rest / H;
  *p = q;
  *h = rest % H;
  *i0 = t * QT;
  *i1 = *i0 + QT < n ? *i0 + QT : n;
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
      int p, h, i0, i1;
      item(off, it, &p, &h, &i0, &i1);
      tile(0, q + (size_t)off[p] * HG * D, kt + h * head_kt + (size_t)kbase[p] * D, kbase[p + 1] - kbase[p],
           v + (size_t)off[p] * H * D, NULL, NULL, h, 0, i0, i1, scale, s, out + (size_t)off[p] * HG * D);
    }
    free(s);
  }
}

/* The same for prompts whose pass comes after tokens their segments hold already (chunks, reused prefixes):
   K (H, NB, D, 16), V (H, NB, 16, D) the cache's arena of nbt blocks, holding the pass's tokens too (written
   first); prompt p's segment starts at block starts[p] and holds filled[p] tokens before the pass's
   off[p + 1] - off[p]. Keys and values are read where they lie: nothing copied. */
void prompt_attention_cached(const float* restrict q, const kv_t* restrict K, const kv_t* restrict V, int nbt,
                             const int32_t* restrict off, const int32_t* restrict starts,
                             const int32_t* restrict filled, int prompts, float scale, float* restrict out,
                             int threads) {
  int most = 0, items = 0;
  for (int p = 0; p < prompts; p++) {
    const int n = off[p + 1] - off[p];
    most = filled[p] + n > most ? filled[p] + n : most;
    items += H * ((n + QT - 1) / QT);
  }
  #pragma omp parallel num_threads(threads)
  {
    float* s = malloc(sizeof(float) * (size_t)G * QT * ((most + BS - 1) / BS * BS));
    #pragma omp for schedule(dynamic, 1)
    for (int it = 0; it < items; it++) {
      int p, h, i0, i1;
      item(off, it, &p, &h, &i0, &i1);
      const size_t seg = (size_t)h * nbt + starts[p];
      tile(1, q + (size_t)off[p] * HG * D, NULL, 0, NULL, K + seg * BLK, V + seg * BLK, h, filled[p], i0, i1,
           scale, s, out + (size_t)off[p] * HG * D);
    }
    free(s);
  }
}
