/* Decode attention over a ragged KV cache: one query token per row, each row attending to its own tokens only.

   Built at run time for the CPU it runs on (app/models/layers/ragged_attention.py: cc -O3 -march=native), with the
   model's shape as constants: D (head dim, a multiple of 16), G (query heads per key-value head), H (key-value
   heads), CH (most tokens one job reads). Blocks of 16 tokens, head-major so that one head's blocks of a row
   are consecutive in memory (the hardware prefetcher streams them; interleaved heads halved the speed):
     K (H, NB, D, 16): keys transposed within a block, so a score is 16 tokens wide in one vector;
     V (H, NB, 16, D).
   With KV_I8 each block ends with its 16 tokens' scales (kv_type.h); BLK is a block's length either way.
   A row holds blocks [start, start + ceil(length / 16)). Work is split into jobs of up to CH tokens of one row
   (a long row spreads over every thread), each job leaves a partial softmax (max, sum, weighted values), and
   the partials of a row are combined in order, so a row's result does not depend on the other rows. */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kv_type.h"  /* vn (VW floats), loadn, storen; kv_t, loadkv, tokv: fp32 or bf16 K/V (KV_BF16) */

#define BS 16
#define HG (H * G)
#define BLK KV_BLOCK(D, BS)  /* kv_t elements per block of a head: its tokens' values, then any scales */
/* key dims per prefetched line of the block's values (BS * D * sizeof(kv_t) bytes, scales aside) */
#define PF_EVERY (64 / (BS * (int)sizeof(kv_t)) > 0 ? 64 / (BS * (int)sizeof(kv_t)) : 1)
/* value vectors per pass (G * CG accumulators, at most 12): all of D / VW where they fit (AVX-512 and SmolLM2's
   G 3: one pass), else passes over the job's tokens, each on a part of D (AVX2: two) */
#define CGT (12 / G)
#define CG ((D / VW) <= CGT ? (D / VW) : (D / VW) % 8 == 0 && CGT >= 8 ? 8 : (D / VW) % 4 == 0 && CGT >= 4 ? 4 \
            : (D / VW) % 2 == 0 && CGT >= 2 ? 2 : 1)

#if KV_I8
static inline const float* scales_of(const kv_t* block) { return (const float*)(block + D * BS); }
#endif

static void job(const float* restrict q, float scale, const kv_t* restrict K, const kv_t* restrict V, int nbt,
                int start, int t0, int t1, float* restrict pm, float* restrict pl, float* restrict pacc) {
  const int n = t1 - t0, nb = (n + BS - 1) / BS, b0 = start + t0 / BS;
  for (int h = 0; h < H; h++) {
    float qs[G][D];
    for (int g = 0; g < G; g++) for (int i = 0; i < D; i++) qs[g][i] = q[(h * G + g) * D + i] * scale;
    float s[G][CH];
    const kv_t* kh = K + ((size_t)h * nbt + b0) * BLK;
    const kv_t* vh = V + ((size_t)h * nbt + b0) * BLK;
    for (int b = 0; b < nb; b++) {
      const kv_t* kb = kh + (size_t)b * BLK;
      /* this block's values, read after the softmax: fetched while the keys' products run (the hardware
         prefetcher alone left the loads waiting on memory: ~5-10% of the kernel's time) */
      const char* vb = (const char*)(vh + (size_t)b * BLK);
      vn a[G][BS / VW];
      for (int g = 0; g < G; g++) for (int c = 0; c < BS / VW; c++) a[g][c] = (vn){0};
      for (int i = 0; i < D; i++) {
        if (i % PF_EVERY == 0) __builtin_prefetch(vb + (i / PF_EVERY) * 64, 0, 3);
        for (int c = 0; c < BS / VW; c++) {
          const vn row = loadkv(kb + i * BS + c * VW);  /* key dim i of VW tokens */
          for (int g = 0; g < G; g++) a[g][c] += qs[g][i] * row;
        }
      }
#if KV_I8
      for (int c = 0; c < BS / VW; c++) {
        const vn ks = loadn(scales_of(kb) + c * VW);
        for (int g = 0; g < G; g++) a[g][c] *= ks;
      }
#endif
      for (int g = 0; g < G; g++) for (int c = 0; c < BS / VW; c++) storen(&s[g][b * BS + c * VW], a[g][c]);
    }
    for (int g = 0; g < G; g++) {
      float* sg = s[g];
      float m = -FLT_MAX, l = 0.f;
      for (int t = 0; t < n; t++) m = sg[t] > m ? sg[t] : m;
      for (int t = 0; t < n; t++) { const float e = expf(sg[t] - m); sg[t] = e; l += e; }
      pm[h * G + g] = m;
      pl[h * G + g] = l;
#if KV_I8
      for (int b = 0; b < nb; b++)  /* the values' scales, a block at a time (s holds whole blocks) */
        for (int c = 0; c < BS / VW; c++)
          storen(sg + b * BS + c * VW, loadn(sg + b * BS + c * VW) * loadn(scales_of(vh + (size_t)b * BLK) + c * VW));
#endif
    }
    const kv_t* nk = kh + (size_t)nbt * BLK;  /* the next head's keys */
    for (int c0 = 0; c0 < D / VW; c0 += CG) {
      vn o[G][CG];
      for (int g = 0; g < G; g++) for (int c = 0; c < CG; c++) o[g][c] = (vn){0};
      for (int t = 0; t < n; t++) {
        const kv_t* vt = vh + (size_t)(t / BS) * BLK + (size_t)(t % BS) * D + c0 * VW;
        /* the next head's keys, as many bytes as this head's values, from memory while these run */
        if (h + 1 < H && c0 == 0)
          for (int l = 0; l < D * (int)sizeof(kv_t); l += 64)
            __builtin_prefetch((const char*)(nk + (size_t)(t / BS) * BLK) + (size_t)(t % BS) * D * sizeof(kv_t) + l,
                               0, 3);
        for (int c = 0; c < CG; c++) {
          const vn row = loadkv(vt + c * VW);
          for (int g = 0; g < G; g++) o[g][c] += s[g][t] * row;
        }
      }
      for (int g = 0; g < G; g++)
        for (int c = 0; c < CG; c++) storen(pacc + (h * G + g) * D + (c0 + c) * VW, o[g][c]);
    }
  }
}

#if KV_I8
/* The scale of a token's head whose largest magnitude is amax: amax / 127 (1 / 127 as a constant: -ffast-math
   turns a division into that anyway), moved to the point where it reproduces itself, so that a token read back
   as floats (int8 * scale: what RaggedCache.read hands the prefix cache) and stored again gets the same int8
   and the same scale. The volatile keeps 127 * s from being folded away. */
static inline float kv_scale(float amax) {
  float s = amax * (1.f / 127.f);
  for (int i = 0; i < 4; i++) {
    volatile float top = 127.f * s;
    const float t = top * (1.f / 127.f);
    if (t == s) break;
    s = t;
  }
  return s;
}

/* x (D) as int8 times one scale into dst (D values `stride` apart) and *scale */
static inline void quantize(const float* restrict x, kv_t* restrict dst, int stride, float* restrict scale) {
  float amax = 0.f;
  for (int i = 0; i < D; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
  const float s = kv_scale(amax), inv = s > 0.f ? 1.f / s : 0.f;
  for (int i = 0; i < D; i++) {
    const float u = nearbyintf(x[i] * inv);
    dst[(size_t)i * stride] = (kv_t)(u > 127.f ? 127.f : u < -127.f ? -127.f : u);
  }
  *scale = s;
}
#endif

/* One token's k, v (H, D) into block blk, slot `slot` of every head (K transposed within a block), rounded as
   tokv rounds (int8: quantized with the token's scale per head). */
static inline void put_token(const float* restrict k, const float* restrict v, size_t blk, size_t slot,
                             kv_t* restrict K, kv_t* restrict V, int nbt) {
  for (int h = 0; h < H; h++) {
    const float* kn = k + (size_t)h * D;
    const float* vn = v + (size_t)h * D;
    kv_t* kb = K + ((size_t)h * nbt + blk) * BLK;
    kv_t* vb = V + ((size_t)h * nbt + blk) * BLK;
#if KV_I8
    quantize(kn, kb + slot, BS, (float*)(kb + D * BS) + slot);
    quantize(vn, vb + slot * D, 1, (float*)(vb + D * BS) + slot);
#else
    for (int i = 0; i < D; i++) { kb[i * BS + slot] = tokv(kn[i]); vb[slot * D + i] = tokv(vn[i]); }
#endif
  }
}

/* q (rows, H*G, D); k_new, v_new (rows, H, D): each row's new token, written at position `held[r]` of its segment
   before that position is read (rows, the token it attends with); starts, held (rows,); jobs (njobs, 3): row, t0, t1, a row's jobs
   consecutive and in order, first (rows + 1,): row r's jobs are [first[r], first[r + 1]); pm, pl (njobs, H*G),
   pacc (njobs, H*G, D) scratch; out (rows, H*G, D). */
void ragged_decode(const float* restrict q, float scale, kv_t* restrict K, kv_t* restrict V, int nbt,
                   const float* restrict k_new, const float* restrict v_new, const int32_t* restrict held,
                   const int32_t* restrict starts, int rows, const int32_t* restrict jobs, int njobs,
                   const int32_t* restrict first, float* restrict pm, float* restrict pl, float* restrict pacc,
                   float* restrict out, int threads) {
  #pragma omp parallel num_threads(threads)
  {
    #pragma omp for schedule(dynamic, 1)
    for (int j = 0; j < njobs; j++) {
      const int r = jobs[3 * j];
      /* a row's new token sits in its last job's last block, which no other job reads: written here, by the
         thread that reads it next, rather than by one thread for every row before the jobs (one token's key
         bytes land on 16 lines of a cold block: rows one after another waited on those stores) */
      if (j == first[r + 1] - 1)
        put_token(k_new + (size_t)r * H * D, v_new + (size_t)r * H * D, (size_t)starts[r] + held[r] / BS,
                  held[r] % BS, K, V, nbt);
      job(q + (size_t)r * HG * D, scale, K, V, nbt, starts[r], jobs[3 * j + 1], jobs[3 * j + 2],
          pm + (size_t)j * HG, pl + (size_t)j * HG, pacc + (size_t)j * HG * D);
    }
    #pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) {
      for (int hg = 0; hg < HG; hg++) {
        float m = -FLT_MAX, l = 0.f, o[D];
        for (int j = first[r]; j < first[r + 1]; j++) m = pm[j * HG + hg] > m ? pm[j * HG + hg] : m;
        for (int i = 0; i < D; i++) o[i] = 0.f;
        for (int j = first[r]; j < first[r + 1]; j++) {
          const float w = expf(pm[j * HG + hg] - m);
          l += w * pl[j * HG + hg];
          for (int i = 0; i < D; i++) o[i] += w * pacc[((size_t)j * HG + hg) * D + i];
        }
        for (int i = 0; i < D; i++) out[((size_t)r * HG + hg) * D + i] = o[i] / l;
      }
    }
  }
}

/* T tokens into the cache: k, v (T, H, D) contiguous fp32, token t to block blk[t], slot slot[t] (of any
   segments), rounded as tokv rounds (the torch path's cast: nearest even). What a prompt pass writes each layer:
   in torch, a cast and two scatters through the transposed layout cost ~1.3 us a token and layer. */
void ragged_put(const float* restrict k, const float* restrict v, const int64_t* restrict blk,
                const int64_t* restrict slot, int T, kv_t* restrict K, kv_t* restrict V, int nbt, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads) if (T >= 64)  /* a prompt, not a decode row */
  for (int t = 0; t < T; t++)
    put_token(k + (size_t)t * H * D, v + (size_t)t * H * D, (size_t)blk[t], (size_t)slot[t], K, V, nbt);
}
