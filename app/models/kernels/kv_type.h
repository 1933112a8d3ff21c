/* Vectors of the CPU's native width, and the KV cache's element type, for the C kernels that read the cache
   (included by ragged_decode.c and prompt_attention.c, each built with KV_BF16 0 or 1).

   vn: VW floats, the widest vector -march=native gives (16 with AVX-512, else 8). Wider GCC vectors than the
   target has are lowered piecewise, through the stack: the attention kernels, written for 16 floats, ran ~4x
   slower on AVX2 (Zen 2) than the same loops on 8. A lane's arithmetic does not depend on VW.

   KV_BF16: keys and values in bf16 (half the bytes a step reads; the fast modes), widened to fp32 as they are
   loaded (exact), rounded to nearest even as they are stored. */
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vn __attribute__((vector_size(VW * 4)));

static inline vn loadn(const float* p) { vn x; __builtin_memcpy(&x, p, sizeof x); return x; }
static inline void storen(float* p, vn x) { __builtin_memcpy(p, &x, sizeof x); }

#if KV_BF16
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
