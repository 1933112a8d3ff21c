/* The KV cache's element type for the C kernels that read it (included by ragged_decode.c and
   prompt_attention.c, each built with KV_BF16 0 or 1). KV_BF16: keys and values in bf16 (half the bytes a
   step reads; the fast modes), widened to fp32 as they are loaded (exact), rounded to nearest even as they
   are stored. Needs v16 (16 floats) and load16 defined before it. */
#if KV_BF16
typedef uint16_t kv_t;
typedef uint16_t h16 __attribute__((vector_size(32)));
typedef uint32_t w16 __attribute__((vector_size(64)));
static inline v16 loadkv(const kv_t* p) {
  h16 h; __builtin_memcpy(&h, p, sizeof h);
  w16 w = __builtin_convertvector(h, w16) << 16;
  return (v16)w;
}
static inline kv_t tokv(float x) {
  uint32_t u; __builtin_memcpy(&u, &x, sizeof u);
  return (kv_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
#else
typedef float kv_t;
static inline v16 loadkv(const kv_t* p) { return load16(p); }
static inline kv_t tokv(float x) { return x; }
#endif
