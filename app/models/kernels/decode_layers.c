/* A decode step's layers in one call: the same kernels the written-out step calls from Python (group_quant.c's
   products, gate/up with SwiGLU in its store, elementwise.c's norms / rotary / GELU, ragged_decode.c's attention),
   called here in the same order on the same buffers, through the function pointers the caller hands over. Two
   blocks: Llama's (RMSNorm, rotary, SwiGLU; Qwen2's too) and, with `gpt2`, GPT-2's (LayerNorm with bias, no
   rotary, c_fc -> GELU -> c_proj).

   Why: at one row a SmolLM2 int4 step is ~4 ms of arithmetic and ~5 ms of Python between the ~270 kernel
   calls (argument conversion, tensor allocation, shape checks: ~10-15 us each). Here a call is a C call.
   Results are those of the Python loop bit for bit: same kernels, same inputs, same order.

   Per layer l, ptrs[l * PTRS + ...]: for each product p in QKV, O, GATE_UP (GPT-2: c_fc), DOWN its (weights,
   scales, bias or 0), then the post-attention norm's weight and bias (0 for RMSNorm) and the next norm's (the
   next layer's input norm, after the last layer the final norm); dims[l * 3 * PRODUCTS + 3 p + ...]: the
   product's kind (group_quant.c's Q4 4, Q4K 5, Q8 8, Q8Z 9), K, N; eps[2 l + ...]: the two norms' epsilons; kv[2 l +
   ...]: the layer's K and V arena. */
#include <stddef.h>
#include <stdint.h>
#include <time.h>

typedef void (*linear_fn)(const float*, int, int, int, const uint8_t*, const void*, const float*, float*, int8_t*,
                          float*, float*, int32_t*, int);
typedef void (*norm_fn)(float*, const float*, const float*, float, int, int, float*, int);
typedef void (*layer_norm_fn)(float*, const float*, const float*, const float*, float, int, int, float*, int);
typedef void (*gelu_fn)(float*, int, int, int);
typedef void (*rope_fn)(const float*, const float*, const float*, int, int, int, int, float*, float*, float*, int);
typedef void (*attn_fn)(const float*, float, void*, void*, int, const float*, const float*, const int32_t*,
                        const int32_t*, int, const int32_t*, int, const int32_t*, float*, float*, float*, float*, int);

enum { QKV, O, GATE_UP, DOWN, PRODUCTS };
/* a product's kind (group_quant.c's Q4 4, Q4K 5, Q8 8, Q8Z 9) -> its function in `linear` and `swiglu` */
#define SLOT(kind) ((kind) == 4 ? 0 : (kind) == 8 ? 1 : (kind) == 9 ? 2 : 3)
#define PTRS (3 * PRODUCTS + 4)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* `call`, its seconds added to times[slot] when the caller asked for times (a profile: app/bench/step_profile) */
#define TIMED(slot, call) do { \
    if (times) { const double t0_ = now(); call; times[slot] += now() - t0_; } else { call; } \
  } while (0)
enum { LINEARS, ATTENTION, ELEMENTWISE };

/* fns: group_quant (Q4), q8_linear (Q8), q8z_linear (Q8Z), add_rms_norm, rope_split, group_quant_swiglu,
   q8_linear_swiglu, q8z_linear_swiglu (the gate/up product with SwiGLU in its store), ragged_decode,
   add_layer_norm, gelu_tanh, group_quant_q4k (Q4K) and its SwiGLU entry. gpt2: GPT-2's block (cos_ and sin_
   unread).
   x (B, E): the residual stream, updated in place; h (B, E): the first layer's normed input on entry, the
   final norm's output on return. cos, sin (B, D). held ... pacc: the ragged kernel's plan and scratch.
   work: y (B, most N), q (B, HQ, D), k, v (B, HKV, D), a (B, HQ, D), m (B, I) one after another;
   xq (B, most K) int8, dx, sx (B, most K / 32) fp32, so (B, most K / 32) int32: the products' scratch.
   times: NULL, or seconds per kind of work (linears, attention, elementwise) to add to. */
void decode_layers(const int64_t* fns, int layers, const int64_t* ptrs, const int32_t* dims, const float* eps,
                   const int64_t* kv, int B, int E, int HQ, int HKV, int D, int I, int most_n, float* x, float* h,
                   const float* cos_, const float* sin_, float scale, int nbt, const int32_t* held,
                   const int32_t* starts, const int32_t* jobs, int njobs, const int32_t* first, float* pm,
                   float* pl, float* pacc, float* work, int8_t* xq, float* dx, float* sx, int32_t* so, int threads,
                   int gpt2, double* times) {
  const linear_fn linear[4] = {(linear_fn)fns[0], (linear_fn)fns[1], (linear_fn)fns[2],
                               (linear_fn)fns[11]};  /* Q4, Q8, Q8Z, Q4K */
  const norm_fn norm = (norm_fn)fns[3];
  const rope_fn rope = (rope_fn)fns[4];
  const linear_fn swiglu[4] = {(linear_fn)fns[5], (linear_fn)fns[6], (linear_fn)fns[7], (linear_fn)fns[12]};
  const attn_fn attend = (attn_fn)fns[8];
  const layer_norm_fn layer_norm = (layer_norm_fn)fns[9];
  const gelu_fn gelu = (gelu_fn)fns[10];
  float* y = work;
  float* q = y + (size_t)B * most_n;
  float* k = q + (size_t)B * HQ * D;
  float* v = k + (size_t)B * HKV * D;
  float* a = v + (size_t)B * HKV * D;
  float* m = a + (size_t)B * HQ * D;
  for (int l = 0; l < layers; l++) {
    const int64_t* p = ptrs + (size_t)l * PTRS;
    const int32_t* dm = dims + (size_t)l * 3 * PRODUCTS;
#define PRODUCT(fn, i, in, out) fn[SLOT(dm[3 * (i)])]((in), B, dm[3 * (i) + 1], dm[3 * (i) + 2], \
                                                     (const uint8_t*)p[3 * (i)], (const void*)p[3 * (i) + 1], \
                                                     (const float*)p[3 * (i) + 2], (out), xq, dx, sx, so, threads)
#define NORM(i, r) do { \
      const float* w_ = (const float*)p[3 * PRODUCTS + 2 * (i)]; \
      const float* b_ = (const float*)p[3 * PRODUCTS + 2 * (i) + 1]; \
      if (gpt2) layer_norm(x, (r), w_, b_, eps[2 * l + (i)], B, E, h, threads); \
      else norm(x, (r), w_, eps[2 * l + (i)], B, E, h, threads); \
    } while (0)
    TIMED(LINEARS, PRODUCT(linear, QKV, h, y));
    TIMED(ELEMENTWISE, rope(y, gpt2 ? NULL : cos_, gpt2 ? NULL : sin_, B, HQ, HKV, D, q, k, v, threads));
    TIMED(ATTENTION, attend(q, scale, (void*)kv[2 * l], (void*)kv[2 * l + 1], nbt, k, v, held, starts, B, jobs, njobs,
                            first, pm, pl, pacc, a, threads));
    TIMED(LINEARS, PRODUCT(linear, O, a, y));
    TIMED(ELEMENTWISE, NORM(0, y));
    if (gpt2) {  /* m (B, I) = gelu(c_fc(h)) */
      TIMED(LINEARS, PRODUCT(linear, GATE_UP, h, m));
      TIMED(ELEMENTWISE, gelu(m, B, I, threads));
    } else {
      TIMED(LINEARS, PRODUCT(swiglu, GATE_UP, h, m));  /* m (B, I) = silu(gate) * up */
    }
    TIMED(LINEARS, PRODUCT(linear, DOWN, m, y));
    TIMED(ELEMENTWISE, NORM(1, y));
#undef NORM
#undef PRODUCT
  }
}
