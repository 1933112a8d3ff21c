/* y = x @ W.T (+ bias) with W quantized in groups of 32 inputs, and x quantized to int8 per row and group of 32
   inputs at the start of each call, summed in int32 on AVX512-VNNI (llama.cpp's Q4_1 / Q8_0 x Q8 scheme):
   - 4-bit weights (GGUF Q4_1's blocks): w = (q - 8) * d + z, q in [0, 15], d and z bf16 per output and group;
   - 8-bit weights (GGUF Q8_0's blocks): w = (u - 128) * d, u in [1, 255], d fp32 per output and group.

   Why: PyTorch's int4 kernel computes in fp32 after unpacking, so at 32 rows it runs ~115 GOP/s; integer dot
   products (vpdpbusd: 16 lanes x 4 unsigned weight bytes x 4 signed activation bytes) do the same work in a
   fraction of the instructions, and at one row the kernel reads 4 or 8 bits a weight. Built at run time with
   -march=native (app/models/group_quant.py); without AVX512-VNNI it does not build, and PyTorch's kernels run.

   Per group g, with x ~ dx * xq, xq in [-127, 127], and w = (u - OFF) * d + z (OFF 8 or 128, z 0 for 8 bits):
     sum_k w_k x_k ~ (d dx) * sum_k u_k xq_k + (z - OFF d) * (dx * sum_k xq_k)
   The integer sums are exact. Each row is computed by the same instructions in the same order whatever
   other rows share the call (row blocks differ only in how many rows they hold), so a row's result does not
   depend on the batch. No -ffast-math: the float operations run exactly as written.

   Weight layout, per tile t of 16 outputs and group g: vectors of 16 lanes x 4 bytes, lane n holding 4
   consecutive inputs of output 16t + n, the vpdpbusd operand for those 4 inputs.
   - 4 bits, 256 bytes: 4 vectors p = 0..3, lane n's byte i holding q[16t + n, 32g + 8p + i] in its low nibble
     and q[16t + n, 32g + 8p + 4 + i] in its high nibble. Scales (T, G, 2, 16) bf16: d then z.
   - 8 bits, 512 bytes: 8 vectors j = 0..7, lane n's byte i holding u[16t + n, 32g + 4j + i]. Scales (T, G, 16)
     fp32. */
#include <immintrin.h>
#include <stdint.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "group_quant needs AVX512F, AVX512BW and AVX512-VNNI"
#endif

#define GS 32   /* inputs per group */
#define NT 16   /* outputs per tile */
#define DYNAMIC_ROWS 64  /* calls with at least this many rows hand tiles out dynamically (see run) */
#define RB 8    /* rows per block: each unpacked weight vector serves this many rows (4: 4-6% slower at 8-256 rows) */

static inline __m512 bf16_to_f32(const uint16_t* p) {  /* 16 bf16 -> 16 fp32, exact */
  __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* One row's groups: xq (K) int8, dx (G) the scale, sx (G) dx * sum(xq). Rounds to nearest, ties to even. */
static void quantize_row(const float* x, int K, int8_t* xq, float* dx, float* sx) {
  for (int g = 0; g < K / GS; g++) {
    const float* v = x + g * GS;
    __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    float d = amax / 127.0f;
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m512 vid = _mm512_set1_ps(id);
    __m512i qa = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i qb = _mm512_cvt_roundps_epi32(_mm512_mul_ps(b, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128((__m128i*)(xq + g * GS), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i*)(xq + g * GS + 16), _mm512_cvtsepi32_epi8(qb));
    int s = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    dx[g] = d;
    sx[g] = d * (float)s;
  }
}

/* rows [0, rb) of a row block against one tile; rb <= RB, bits 4 or 8 (constants where it is called, so the
   compiler specializes). The per-row arithmetic is the same for every rb. */
static inline void tile_rows(const int bits, const int rb, const uint8_t* restrict wt, const void* restrict st,
                             int G, int K, const int8_t* restrict xq, const float* restrict dx,
                             const float* restrict sx, const float* restrict bias, float* restrict y, int N, int n0) {
  __m512 acc[RB];
  for (int r = 0; r < rb; r++) acc[r] = _mm512_setzero_ps();
  const __m512i lo = _mm512_set1_epi8(0x0F);
  for (int g = 0; g < G; g++) {
    __m512i w[8];
    __m512 d, m;
    if (bits == 4) {
      const __m512i* wg = (const __m512i*)(wt + (size_t)g * 256);
      for (int p = 0; p < 4; p++) {
        __m512i packed = _mm512_loadu_si512(wg + p);
        w[2 * p] = _mm512_and_si512(packed, lo);
        w[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), lo);
      }
      const uint16_t* sg = (const uint16_t*)st + (size_t)g * 2 * NT;
      d = bf16_to_f32(sg);
      m = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), d, bf16_to_f32(sg + NT));  /* z - 8 d */
    } else {
      const __m512i* wg = (const __m512i*)(wt + (size_t)g * 512);
      for (int j = 0; j < 8; j++) w[j] = _mm512_loadu_si512(wg + j);
      d = _mm512_loadu_ps((const float*)st + (size_t)g * NT);
      m = _mm512_mul_ps(_mm512_set1_ps(-128.0f), d);  /* -128 d */
    }
    for (int r = 0; r < rb; r++) {
      const int32_t* xr = (const int32_t*)(xq + (size_t)r * K + g * GS);
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      s0 = _mm512_dpbusd_epi32(s0, w[0], _mm512_set1_epi32(xr[0]));
      s1 = _mm512_dpbusd_epi32(s1, w[1], _mm512_set1_epi32(xr[1]));
      s0 = _mm512_dpbusd_epi32(s0, w[2], _mm512_set1_epi32(xr[2]));
      s1 = _mm512_dpbusd_epi32(s1, w[3], _mm512_set1_epi32(xr[3]));
      s0 = _mm512_dpbusd_epi32(s0, w[4], _mm512_set1_epi32(xr[4]));
      s1 = _mm512_dpbusd_epi32(s1, w[5], _mm512_set1_epi32(xr[5]));
      s0 = _mm512_dpbusd_epi32(s0, w[6], _mm512_set1_epi32(xr[6]));
      s1 = _mm512_dpbusd_epi32(s1, w[7], _mm512_set1_epi32(xr[7]));
      const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
      const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[(size_t)r * G + g]));
      acc[r] = _mm512_fmadd_ps(isum, scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[(size_t)r * G + g]), acc[r]);
    }
  }
  for (int r = 0; r < rb; r++) {
    __m512 out = acc[r];
    if (bias) out = _mm512_add_ps(out, _mm512_loadu_ps(bias + n0));
    _mm512_storeu_ps(y + (size_t)r * N + n0, out);
  }
}

#define ROWS(bits, rb) tile_rows(bits, rb, wt, st, G, K, xq + (size_t)r0 * K, dx + (size_t)r0 * G, \
                                 sx + (size_t)r0 * G, bias, y + (size_t)r0 * N, N, t * NT)

/* tile t, all rows: in row blocks, the rest with a constant row count (the compiler keeps rows in registers) */
#define TILE(t) do { \
    const uint8_t* wt = weights + (size_t)(t) * tile_bytes; \
    const void* st = (const uint8_t*)scales + (size_t)(t) * tile_scales; \
    int r0 = 0; \
    for (; r0 + RB <= M; r0 += RB) ROWS(bits, RB); \
    switch (M - r0) { \
      case 7: ROWS(bits, 7); break; \
      case 6: ROWS(bits, 6); break; \
      case 5: ROWS(bits, 5); break; \
      case 4: ROWS(bits, 4); break; \
      case 3: ROWS(bits, 3); break; \
      case 2: ROWS(bits, 2); break; \
      case 1: ROWS(bits, 1); break; \
      default: break; \
    } \
  } while (0)

static void run(const int bits, const float* x, int M, int K, int N, const uint8_t* weights, const void* scales,
                const float* bias, float* y, int8_t* xq, float* dx, float* sx, int threads) {
  const int G = K / GS, T = N / NT;
  const size_t tile_bytes = (size_t)G * (bits == 4 ? 256 : 512);
  const size_t tile_scales = (size_t)G * (bits == 4 ? 2 * NT * 2 : NT * 4);  /* bytes */
  #pragma omp parallel num_threads(threads)
  {
    #pragma omp for schedule(static)
    for (int r = 0; r < M; r++) quantize_row(x + (size_t)r * K, K, xq + (size_t)r * K, dx + (size_t)r * G,
                                             sx + (size_t)r * G);
    /* tiles over the threads; within a tile, rows in blocks (the tile's weights stay in L1/L2 meanwhile).
       Prompt-sized calls take tiles in chunks as threads come free, so a thread the OS lends to another for a
       while (the server's event loop runs on the same cores) does not hold the call up: its tiles go to the
       other thread. Decode-sized calls split statically (a hand-out costs about what a tile does there). The
       same results either way: a tile's outputs do not depend on the thread that computes them. */
    if (M >= DYNAMIC_ROWS) {
      #pragma omp for schedule(dynamic, 4)
      for (int t = 0; t < T; t++) TILE(t);
    } else {
      #pragma omp for schedule(static)
      for (int t = 0; t < T; t++) TILE(t);
    }
  }
}

/* x (M, K) fp32, weights and scales in the layouts above, bias (N) or NULL, y (M, N) fp32; scratch: xq (M, K)
   int8, dx and sx (M, K / 32) fp32. */
void group_quant(const float* x, int M, int K, int N, const uint8_t* weights, const uint16_t* scales,
               const float* bias, float* y, int8_t* xq, float* dx, float* sx, int threads) {
  run(4, x, M, K, N, weights, scales, bias, y, xq, dx, sx, threads);
}

void q8_linear(const float* x, int M, int K, int N, const uint8_t* weights, const float* scales,
               const float* bias, float* y, int8_t* xq, float* dx, float* sx, int threads) {
  run(8, x, M, K, N, weights, scales, bias, y, xq, dx, sx, threads);
}
