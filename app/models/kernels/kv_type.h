/* Vectors of the CPU's native width, and the KV cache's element type, for the C kernels that read the cache
   (included by ragged_decode.c and prompt_attention.c, each built with KV_BF16 0 or 1).

   vn: VW floats, the widest vector -march=native gives (16 with AVX-512, else 8). Wider GCC vectors than the
   target has are lowered piecewise, through the stack: the attention kernels, written for 16 floats, ran ~4x
   slower on AVX2 (Zen 2) than the same loops on 8. A lane's arithmetic does not depend on VW.

   KV_BF16: keys and values in bf16 (half the bytes a step reads; the fast modes), widened to fp32 as they are
   loaded (exact), rounded to nearest even as they are stored.
   KV_I8: keys and values in int8 with an fp32 scale per token and head kept at the end of each block (a
   quarter of fp32's bytes, plus 1/16); the kernels apply the scales to scores and softmax weights. */
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vn __attribute__((vector_size(VW * 4)));

static inline vn loadn(const float* p) { vn x; __builtin_memcpy(&x, p, sizeof x); return x; }
static inline void storen(float* p, vn x) { __builtin_memcpy(p, &x, sizeof x); }

#ifndef KV_I8
#define KV_I8 0
#endif

#if KV_I8
/* int8 K/V, a scale per token and head: a block of the cache is its BS tokens' D * BS int8 values (keys
   transposed (D, BS), values (BS, D)), then their BS fp32 scales (KV_SCALES bytes): value = int8 * scale */
typedef int8_t kv_t;
#include <immintrin.h>
static inline vn loadkv(const kv_t* p) {  /* VW values, unscaled (GCC's __builtin_convertvector widens int8
                                             element by element: ~2x slower kernels) */
#if VW == 16
  return (vn)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#else
  return (vn)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#endif
}
#define KV_SCALES(bs) ((bs) * 4)
#elif KV_BF16
typedef uint16_t kv_t;
typedef uint16_t hn __attribute__((vector_size(VW * 2)));
typedef uint32_t wn __attribute__((vector_size(VW * 4)));
static inline vn loadkv(const kv_t* p) {  /* VW values */
  hn h; __builtin_memcpy(&h, p, sizeof h);
  wn w = __builtin_convertvector(h, wn) << 16;
  return (vn)w;
}
static inline kv_t tokv(float x) {
  uint32_t u; __builtin_memcpy(&u, &x, sizeof u);
  return (kv_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
#else
typedef float kv_t;
static inline vn loadkv(const kv_t* p) { return loadn(p); }
static inline kv_t tokv(float x) { return x; }
#endif
#ifndef KV_SCALES
#define KV_SCALES(bs) 0
#endif
/* kv_t elements from one block of bs tokens of dim d to the next, in either arena */
#define KV_BLOCK(d, bs) ((d) * (bs) + KV_SCALES(bs))
