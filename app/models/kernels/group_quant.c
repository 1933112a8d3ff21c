/* y = x @ W.T (+ bias) with W quantized in groups of 32 inputs, and x quantized to int8 per row and group of 32
   inputs at the start of each call, summed in int32 on AVX512-VNNI (llama.cpp's Q4_1 / Q8_0 x Q8 scheme):
   - 4-bit weights (GGUF Q4_1's blocks; kind Q4): w = (q - 8) * d + z, q in [0, 15], d and z bf16 per output
     and group;
   - 4-bit weights as GGUF Q4_K holds them (kind Q4K): w = q * (D sc) - Dmin m, q in [0, 15], sc and m 6-bit
     integers per output and group, D and Dmin fp16 per output and 8 groups: exact (D sc needs 17 bits, which
     fp32 holds and bf16 does not), 4.625 bits a weight against Q4's 5;
   - 8-bit weights, symmetric (GGUF Q8_0's blocks; kind Q8): w = (u - 128) * d, u in [1, 255], d fp32 per output
     and group;
   - 8-bit weights with a zero (kind Q8Z): w = (u - 128) * d + z, u in [0, 255], d and z fp32 per output and
     group: 255 levels between a group's least and greatest weight, which hold a 4-bit source (Q4_0 / Q4_1:
     u = 17 q) exactly, and any other within half a level.

   Why: PyTorch's int4 kernel computes in fp32 after unpacking, so at 32 rows it runs ~115 GOP/s; integer dot
   products (vpdpbusd: 16 lanes x 4 unsigned weight bytes x 4 signed activation bytes) do the same work in a
   fraction of the instructions, and at one row the kernel reads 4 or 8 bits a weight. Built at run time with
   -march=native (app/models/numerics/group_quant.py) for one of two instruction sets, the same layout and results:
   - AVX512-VNNI (Zen 4, Ice Lake and later): vpdpbusd, 16 outputs a vector; with AMX (Sapphire Rapids and
     later) blocks of 16 rows take the tile unit's tdpbsud for the integer sums instead (the same sums, so the
     same outputs; see amx_rows);
   - AVX2 + FMA (Zen 2/3, Haswell to Alder Lake): vpmaddubsw + vpmaddwd, 8 outputs a vector (a tile in two
     halves). 4 bits: the pairs vpmaddubsw makes are at most 2 * 15 * 127, so a group's 8 of them add in int16
     without overflow (<= 30,480) and one vpmaddwd widens them: the same exact sums, so the same outputs bit
     for bit as on VNNI. 8 bits: u * x would saturate vpmaddubsw's int16 pairs, so it multiplies |u - 128|
     by x carrying u - 128's sign (llama.cpp's trick: pairs <= 2 * 127 * 127) and sums (u - 128) x directly:
     for Q8 the sums the VNNI path forms too (the same outputs bit for bit), for Q8Z without its -128 d term
     (the same value computed without its cancellation; not bit-identical).
   Without either it does not build, and PyTorch's kernels run.

   Per group g, with x ~ dx * xq, xq in [-127, 127], and w = (u - OFF) * d + z (OFF 8 or 128, z 0 for Q8):
     sum_k w_k x_k ~ (d dx) * sum_k u_k xq_k + (z - OFF d) * (dx * sum_k xq_k)
   Q8 (no zero) takes the offset in the integers instead: (d dx) * (sum_k u_k xq_k - 128 sum_k xq_k), one float
   operation fewer a row and group (the products wait on the float unit, which the integer dot products share:
   the 8-bit 576 -> 49152 at 32 rows ran 4.4 ms a call against 6.0 without the second FMA), and the same sums
   the AVX2 path forms, so both give the same outputs. The integer sums are exact. Each row is computed by the
   same instructions in the same order whatever other rows share the call (row blocks differ only in how many
   rows they hold), so a row's result does not depend on the batch. No -ffast-math: the float operations run
   exactly as written.

   SwiGLU (the `_swiglu` entries): the weights are a fused gate/up product, gate's N / 2 outputs then up's, and y
   (M, N / 2) gets silu(gate) * up: tile t (gate) and tile t + T / 2 (up) are computed one after the other by the
   same thread, the first stored as it is, the second combined with it at its store (N / 2 must be whole
   tiles). One pass over the (M, N) sums fewer than a product and then elementwise.c's silu_mul: SmolLM2's gate/up
   8-9% faster at 32 rows, 1.5-3.5% at 277 (the store's exp and division cost most of what that pass did), and the
   same arithmetic on either instruction set (the exp below is this file's own, step for step the same).

   Weight layout, per tile t of 16 outputs and group g: vectors of 16 lanes x 4 bytes, lane n holding 4
   consecutive inputs of output 16t + n, the vpdpbusd operand for those 4 inputs.
   - 4 bits, 256 bytes: 4 vectors p = 0..3, lane n's byte i holding q[16t + n, 32g + 8p + i] in its low nibble
     and q[16t + n, 32g + 8p + 4 + i] in its high nibble. Scales (T, G, 2, 16) bf16: d then z; Q4K's (T, G / 8,
     320) bytes: per 8 groups D (16 fp16), Dmin (16 fp16), then each group's sc (16 bytes) and m (16 bytes).
   - 8 bits, 512 bytes: 8 vectors j = 0..7, lane n's byte i holding u[16t + n, 32g + 4j + i]. Scales (T, G, 16)
     fp32 (Q8), or (T, G, 2, 16) fp32, d then z (Q8Z). */
#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define ISA 512
#define RB 16   /* rows per block: each unpacked weight vector serves this many rows (32 zmm registers: 16 rows'
                   sums, 8 weights; against 8, a decode step's 16-32 rows ran 5-8% faster, 256 rows the same;
                   4: 4-6% slower than 8) */
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA 256
#define RB 6    /* 16 ymm registers (Zen 2, against 4 / 8: 4-bit 3-10% faster at 32-256 rows) */
#else
#error "group_quant needs AVX512F, AVX512BW and AVX512-VNNI, or AVX2 and FMA"
#endif

enum { Q4 = 4, Q4K = 5, Q8 = 8, Q8Z = 9 };  /* the weights' kinds, above (app/models/numerics/group_quant.py names
                                               them alike) */
#define FOUR(bits) ((bits) == Q4 || (bits) == Q4K)  /* 4-bit weights: the same nibbles, other scales */
#define Q4K_SUPER 320  /* bytes of a tile's Q4K scales per 8 groups */
#define GS 32   /* inputs per group */
#define NT 16   /* outputs per tile */
#define DYNAMIC_ROWS 64  /* calls with at least this many rows hand tiles out dynamically (see run) */

/* exp_ps: e^x, Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-5 polynomial in r (within ~2 ulp), 2^n
   through the exponent bits; x clamped to [-87, 88], where 2^n stays a normal float. swiglu_ps: silu(gate) * up =
   gate / (1 + e^-gate) * up. One definition for both instruction sets (P: the intrinsics' prefix, V / I: the
   float / int vector types), so they take the same steps and their lanes agree bit for bit. */
#define EXP_AND_SWIGLU(P, V, I, ROUND, AS_FLOAT) \
  static inline V exp_ps(V x) { \
    x = P##_min_ps(P##_max_ps(x, P##_set1_ps(-87.0f)), P##_set1_ps(88.0f)); \
    const V n = ROUND(P##_mul_ps(x, P##_set1_ps(1.44269504088896341f)), \
                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); \
    V r = P##_fnmadd_ps(n, P##_set1_ps(0.693359375f), x); \
    r = P##_fnmadd_ps(n, P##_set1_ps(-2.12194440e-4f), r); \
    V p = P##_set1_ps(1.9875691500e-4f); \
    p = P##_fmadd_ps(p, r, P##_set1_ps(1.3981999507e-3f)); \
    p = P##_fmadd_ps(p, r, P##_set1_ps(8.3334519073e-3f)); \
    p = P##_fmadd_ps(p, r, P##_set1_ps(4.1665795894e-2f)); \
    p = P##_fmadd_ps(p, r, P##_set1_ps(1.6666665459e-1f)); \
    p = P##_fmadd_ps(p, r, P##_set1_ps(5.0000001201e-1f)); \
    const V e = P##_add_ps(P##_fmadd_ps(p, P##_mul_ps(r, r), r), P##_set1_ps(1.0f)); \
    const I two_n = P##_slli_epi32(P##_add_epi32(P##_cvtps_epi32(n), P##_set1_epi32(127)), 23); \
    return P##_mul_ps(e, AS_FLOAT(two_n)); \
  } \
  static inline V swiglu_ps(V gate, V up) { \
    const V e = exp_ps(P##_sub_ps(P##_setzero_ps(), gate)); \
    return P##_mul_ps(P##_div_ps(gate, P##_add_ps(P##_set1_ps(1.0f), e)), up); \
  }

enum { PLAIN, UP };  /* how a tile stores: its outputs; or (SwiGLU's up tile) silu(what y holds: the gate's) * them */

/* which instruction set this build runs: 512 (AVX512-VNNI) or 256 (AVX2) */
int group_quant_isa(void) { return ISA; }

#if ISA == 512

static inline __m512 bf16_to_f32(const uint16_t* p) {  /* 16 bf16 -> 16 fp32, exact */
  __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

EXP_AND_SWIGLU(_mm512, __m512, __m512i, _mm512_roundscale_ps, _mm512_castsi512_ps)

/* One row's groups: xq (K) int8, dx (G) the scale, sx (G) dx * sum(xq), so (G) 128 * sum(xq) (Q8's offset).
   Rounds to nearest, ties to even. */
static void quantize_row(const float* x, int K, int8_t* xq, float* dx, float* sx, int32_t* so) {
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
    so[g] = 128 * s;
  }
}

/* group g's d and m = z - OFF d for a tile's 16 outputs (Q8's m goes unread: its offset is taken in the
   integers); the VNNI and the AMX paths both take them from here, so they compute the same values */
static inline void group_dm(const int bits, const void* restrict st, int g, __m512* d, __m512* m) {
  if (bits == Q4K) {  /* d = D sc, m = -Dmin m: exact */
    const uint8_t* sb = (const uint8_t*)st + (size_t)(g / 8) * Q4K_SUPER;
    const uint8_t* sg = sb + 64 + (g % 8) * 32;
    const __m512 D = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sb));
    const __m512 Dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sb + 32)));
    *d = _mm512_mul_ps(D, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)sg))));
    *m = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), Dmin),
                       _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(sg + 16)))));
  } else if (bits == Q4) {
    const uint16_t* sg = (const uint16_t*)st + (size_t)g * 2 * NT;
    *d = bf16_to_f32(sg);
    *m = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), *d, bf16_to_f32(sg + NT));  /* z - 8 d */
  } else if (bits == Q8Z) {
    const float* sg = (const float*)st + (size_t)g * 2 * NT;
    *d = _mm512_loadu_ps(sg);
    *m = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), *d, _mm512_loadu_ps(sg + NT));  /* z - 128 d */
  } else {
    *d = _mm512_loadu_ps((const float*)st + (size_t)g * NT);
    *m = _mm512_mul_ps(_mm512_set1_ps(-128.0f), *d);  /* -128 d */
  }
}

/* rows [0, rb) of a row block against one tile; rb <= RB, bits Q4, Q8 or Q8Z, mode PLAIN or UP (constants where
   it is called, so the compiler specializes). The per-row arithmetic is the same for every rb. bias: the tile's
   16 or NULL; y: the tile's first output column of row 0, rows ldy apart. */
static inline void tile_rows(const int bits, const int mode, const int rb, const uint8_t* restrict wt,
                             const void* restrict st, int G, int K, const int8_t* restrict xq,
                             const float* restrict dx, const float* restrict sx, const int32_t* restrict so,
                             const float* restrict bias, float* restrict y, int ldy) {
  __m512 acc[RB];
  for (int r = 0; r < rb; r++) acc[r] = _mm512_setzero_ps();
  const __m512i lo = _mm512_set1_epi8(0x0F);
  for (int g = 0; g < G; g++) {
    __m512i w[8];
    __m512 d, m;
    if (FOUR(bits)) {
      const __m512i* wg = (const __m512i*)(wt + (size_t)g * 256);
      for (int p = 0; p < 4; p++) {
        __m512i packed = _mm512_loadu_si512(wg + p);
        w[2 * p] = _mm512_and_si512(packed, lo);
        w[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), lo);
      }
    } else {
      const __m512i* wg = (const __m512i*)(wt + (size_t)g * 512);
      for (int j = 0; j < 8; j++) w[j] = _mm512_loadu_si512(wg + j);
    }
    group_dm(bits, st, g, &d, &m);
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
      const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[(size_t)r * G + g]));
      if (bits == Q8) {  /* sum (u - 128) xq, exact */
        const __m512i offset = _mm512_set1_epi32(so[(size_t)r * G + g]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(s0, s1), offset)), scale,
                                 acc[r]);
      } else {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), scale, acc[r]);
        acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[(size_t)r * G + g]), acc[r]);
      }
    }
  }
  for (int r = 0; r < rb; r++) {
    __m512 out = acc[r];
    if (bias) out = _mm512_add_ps(out, _mm512_loadu_ps(bias));
    if (mode == UP) out = swiglu_ps(_mm512_loadu_ps(y + (size_t)r * ldy), out);
    _mm512_storeu_ps(y + (size_t)r * ldy, out);
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
/* AMX (Sapphire Rapids and later): the tile unit computes a group's exact int32 sums for 16 rows x 16 outputs in
   one instruction (tdpbsud: signed activations x unsigned weights, the operands vpdpbusd takes), where VNNI
   needs 8 vpdpbusd a row. The sums are the same integers, and the float operations after them are the ones
   tile_rows does, in its order: the outputs are bit for bit those of the VNNI path, so which rows take AMX
   (whole blocks of 16) never changes a result. Linux hands out the tile state only on request
   (arch_prctl), once per process. */
#define AMX 1
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AR 16  /* rows per AMX block: a tile's rows */
#define CHUNK 18  /* groups whose sums are buffered at a time, at most (18 KB): 576 inputs in one chunk, 1536
                     in three of 16 (against one of 48: 1.45x vs 1.0x the VNNI path at 256 rows; two of 24: 1.2x) */

static int amx_state = -1;  /* -1 not asked yet, 0 refused (by the kernel, or a seccomp filter), 1 granted */

static int amx_usable(void) {
  if (amx_state < 0) amx_state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return amx_state;
}

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

/* per thread: the tile registers' shapes (a thread's configuration is its own, and other code, oneDNN's, may
   have loaded another since the last call) */
static void amx_configure(void) {
  tile_config c = {0};
  c.palette = 1;
  for (int i = 0; i < 2; i++) { c.colsb[i] = NT * 4; c.rows[i] = AR; }         /* 0, 1: sums (16 x 16 int32) */
  for (int i = 2; i < 4; i++) { c.colsb[i] = GS; c.rows[i] = AR; }             /* 2, 3: activations (16 x 32) */
  for (int i = 4; i < 6; i++) { c.colsb[i] = NT * 4; c.rows[i] = GS / 4; }     /* 4, 5: weights (8 x 64) */
  _tile_loadconfig(&c);
}

/* group g's sums into tile register C (and then buffer c): activations in A, weights in B (registers are
   instruction immediates, hence a macro) */
#define AMX_SUMS(C, A, B, g, c) do { \
    _tile_zero(C); \
    _tile_loadd(A, xq + (g) * GS, K); \
    _tile_loadd(B, wb + (size_t)(g) * GS * NT, NT * 4); \
    _tile_dpbsud(C, A, B); \
    _tile_stored(C, c, NT * 4); \
  } while (0)

/* rows 0..15 against one tile: wb its weights unpacked to bytes, (G, 8, 16, 4): tdpbsud's B operand, each
   group's 8 rows of 16 outputs x 4 consecutive inputs (the 8-bit layout; 4-bit tiles are unpacked into it), dm
   (G, 2, 16) its d and m = z - OFF d as tile_rows computes them (Q8: the offset in the integers, as there).
   Per chunk of groups, first the tile unit writes each group's sums to cb (chunk, 16, 16) int32, two sums
   registers alternating so one group's products start while the other's are stored; then tile_rows' float
   steps, four rows at a time. Measured here (Xeon with AMX, one thread, 256 rows, 576 -> 3072), us per call:
   VNNI path 2900, this 1870; other orders were slower: all 16 rows' accumulators at once (GCC spills them)
   2570, the next block's sums issued among these float steps 2150, the float steps alone take ~900 and the
   sums alone ~900 (load and store ports: a tile load or store is 16 rows of them). */
static inline void amx_rows(const int bits, const int mode, const uint8_t* restrict wb, const float* restrict dm,
                            int G, int K, const int8_t* restrict xq, const float* restrict dx,
                            const float* restrict sx, const int32_t* restrict so, const float* restrict bias,
                            float* restrict y, int ldy, int32_t* restrict cb) {
  __m512 partial[AR];  /* rows' sums between chunks */
  const int chunks = (G + CHUNK - 1) / CHUNK, chunk = (G + chunks - 1) / chunks;  /* even chunks */
  for (int g0 = 0; g0 < G; g0 += chunk) {
    const int g1 = g0 + chunk < G ? g0 + chunk : G;
    int g = g0;
    for (; g + 1 < g1; g += 2) {
      AMX_SUMS(0, 2, 4, g, cb + (size_t)(g - g0) * AR * NT);
      AMX_SUMS(1, 3, 5, g + 1, cb + (size_t)(g + 1 - g0) * AR * NT);
    }
    if (g < g1) AMX_SUMS(0, 2, 4, g, cb + (size_t)(g - g0) * AR * NT);
    for (int r0 = 0; r0 < AR; r0 += 4) {
      __m512 acc[4];
      for (int i = 0; i < 4; i++) acc[i] = g0 == 0 ? _mm512_setzero_ps() : partial[r0 + i];
      for (g = g0; g < g1; g++) {
        const __m512 d = _mm512_load_ps(dm + (size_t)g * 2 * NT), m = _mm512_load_ps(dm + (size_t)g * 2 * NT + NT);
        const int32_t* c = cb + ((size_t)(g - g0) * AR + r0) * NT;
        #pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
          const size_t r = r0 + i;
          const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[r * G + g]));
          if (bits == Q8) {
            const __m512i offset = _mm512_set1_epi32(so[r * G + g]);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c + i * NT), offset)),
                                     scale, acc[i]);
          } else {
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + i * NT)), scale, acc[i]);
            acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * G + g]), acc[i]);
          }
        }
      }
      for (int i = 0; i < 4; i++) {
        if (g1 < G) { partial[r0 + i] = acc[i]; continue; }
        __m512 out = acc[i];
        if (bias) out = _mm512_add_ps(out, _mm512_loadu_ps(bias));
        if (mode == UP) out = swiglu_ps(_mm512_loadu_ps(y + (size_t)(r0 + i) * ldy), out);
        _mm512_storeu_ps(y + (size_t)(r0 + i) * ldy, out);
      }
    }
  }
}

/* a tile's d and m per group, (G, 2, 16) fp32, once per tile for all its row blocks */
static void group_scales(const int bits, const void* restrict st, int G, float* restrict dm) {
  for (int g = 0; g < G; g++) {
    __m512 d, m;
    group_dm(bits, st, g, &d, &m);
    _mm512_store_ps(dm + (size_t)g * 2 * NT, d);
    _mm512_store_ps(dm + (size_t)g * 2 * NT + NT, m);
  }
}

/* a 4-bit tile's G groups to bytes in the 8-bit layout: vector 2p holds the low nibbles, 2p + 1 the high */
static void unpack4(const uint8_t* restrict wt, int G, uint8_t* restrict wb) {
  const __m512i lo = _mm512_set1_epi8(0x0F);
  for (int g = 0; g < G; g++)
    for (int p = 0; p < 4; p++) {
      __m512i packed = _mm512_loadu_si512((const __m512i*)(wt + (size_t)g * 256) + p);
      _mm512_store_si512((__m512i*)(wb + (size_t)g * 512) + 2 * p, _mm512_and_si512(packed, lo));
      _mm512_store_si512((__m512i*)(wb + (size_t)g * 512) + 2 * p + 1,
                         _mm512_and_si512(_mm512_srli_epi16(packed, 4), lo));
    }
}
#endif

#else  /* AVX2 */

static inline __m256 bf16_to_f32(const uint16_t* p) {  /* 8 bf16 -> 8 fp32, exact */
  __m128i h = _mm_loadu_si128((const __m128i*)p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

EXP_AND_SWIGLU(_mm256, __m256, __m256i, _mm256_round_ps, _mm256_castsi256_ps)

/* The same values as the AVX-512 version: max and integer sums are exact, conversion rounds to nearest even
   (MXCSR's default), |xq| <= 127 so packing never saturates. */
static void quantize_row(const float* x, int K, int8_t* xq, float* dx, float* sx, int32_t* so) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  /* undoes the packs' 128-bit lanes */
  for (int g = 0; g < K / GS; g++) {
    const float* v = x + g * GS;
    __m256 a0 = _mm256_loadu_ps(v), a1 = _mm256_loadu_ps(v + 8), a2 = _mm256_loadu_ps(v + 16),
           a3 = _mm256_loadu_ps(v + 24);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a0), _mm256_andnot_ps(sign, a1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, a2), _mm256_andnot_ps(sign, a3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float amax = _mm_cvtss_f32(m4);
    float d = amax / 127.0f;
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m256 vid = _mm256_set1_ps(id);
    __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(a0, vid)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(a1, vid)),
            q2 = _mm256_cvtps_epi32(_mm256_mul_ps(a2, vid)), q3 = _mm256_cvtps_epi32(_mm256_mul_ps(a3, vid));
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    _mm256_storeu_si256((__m256i*)(xq + g * GS), _mm256_permutevar8x32_epi32(bytes, order));
    __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
    int s = _mm_cvtsi128_si32(s4);
    dx[g] = d;
    sx[g] = d * (float)s;
    so[g] = 128 * s;  /* unread here: the 8-bit sums are of u - 128 already */
  }
}

/* As the AVX-512 version, one half of the tile (8 outputs: bytes 32h.. of each 64-byte weight vector) at a
   time; per output the same float operations in the same order. */
static inline void tile_rows(const int bits, const int mode, const int rb, const uint8_t* restrict wt,
                             const void* restrict st, int G, int K, const int8_t* restrict xq,
                             const float* restrict dx, const float* restrict sx, const int32_t* restrict so,
                             const float* restrict bias, float* restrict y, int ldy) {
  (void)so;
  const __m256i lo = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  for (int h = 0; h < 2; h++) {
    __m256 acc[RB];
    for (int r = 0; r < rb; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
      __m256i s[RB];
      for (int r = 0; r < rb; r++) s[r] = _mm256_setzero_si256();
      if (FOUR(bits)) {
        const uint8_t* wg = wt + (size_t)g * 256 + 32 * h;
        for (int p = 0; p < 4; p++) {
          __m256i packed = _mm256_loadu_si256((const __m256i*)(wg + 64 * p));
          __m256i w0 = _mm256_and_si256(packed, lo), w1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), lo);
          /* int16 sums <= 8 * 2 * 15 * 127, so the saturating add never saturates: it only keeps GCC from
             reassociating the sums, which computed every product first and spilled them (10-25% slower) */
          for (int r = 0; r < rb; r++) {
            const int32_t* xr = (const int32_t*)(xq + (size_t)r * K + g * GS);
            s[r] = _mm256_adds_epi16(s[r], _mm256_maddubs_epi16(w0, _mm256_set1_epi32(xr[2 * p])));
            s[r] = _mm256_adds_epi16(s[r], _mm256_maddubs_epi16(w1, _mm256_set1_epi32(xr[2 * p + 1])));
          }
        }
        __m256 d, m;
        if (bits == Q4K) {  /* d = D sc, m = -Dmin m, as the AVX-512 version */
          const uint8_t* sb = (const uint8_t*)st + (size_t)(g / 8) * Q4K_SUPER;
          const uint8_t* sc = sb + 64 + (g % 8) * 32 + 8 * h;
          const __m256 D = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sb + 16 * h)));
          const __m256 Dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sb + 32 + 16 * h)));
          d = _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)sc))));
          m = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), Dmin),
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(sc + 16)))));
        } else {
          const uint16_t* sg = (const uint16_t*)st + (size_t)g * 2 * NT + 8 * h;
          d = bf16_to_f32(sg);
          m = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), d, bf16_to_f32(sg + NT));  /* z - 8 d */
        }
        for (int r = 0; r < rb; r++) {
          const __m256 isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[r], ones));
          const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(dx[(size_t)r * G + g]));
          acc[r] = _mm256_fmadd_ps(isum, scale, acc[r]);
          acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[(size_t)r * G + g]), acc[r]);
        }
      } else {
        const uint8_t* wg = wt + (size_t)g * 512 + 32 * h;
        for (int j = 0; j < 8; j++) {
          const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(wg + 64 * j)), flip);  /* u - 128 */
          const __m256i wa = _mm256_abs_epi8(ws);
          for (int r = 0; r < rb; r++) {  /* int32 sums of (u - 128) x */
            const int32_t* xr = (const int32_t*)(xq + (size_t)r * K + g * GS);
            const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(xr[j]), ws);
            s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xs), ones));
          }
        }
        const float* sg = (const float*)st + (size_t)g * (bits == Q8Z ? 2 : 1) * NT + 8 * h;
        const __m256 d = _mm256_loadu_ps(sg);
        const __m256 z = bits == Q8Z ? _mm256_loadu_ps(sg + NT) : _mm256_setzero_ps();  /* Q8: no zero term */
        for (int r = 0; r < rb; r++) {
          const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(dx[(size_t)r * G + g]));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), scale, acc[r]);
          if (bits == Q8Z) acc[r] = _mm256_fmadd_ps(z, _mm256_set1_ps(sx[(size_t)r * G + g]), acc[r]);
        }
      }
    }
    for (int r = 0; r < rb; r++) {
      __m256 out = acc[r];
      if (bias) out = _mm256_add_ps(out, _mm256_loadu_ps(bias + 8 * h));
      if (mode == UP) out = swiglu_ps(_mm256_loadu_ps(y + (size_t)r * ldy + 8 * h), out);
      _mm256_storeu_ps(y + (size_t)r * ldy + 8 * h, out);
    }
  }
}

#endif

#ifndef AMX
#define AMX 0
#endif
#define AMX_MIN_ROWS 16  /* calls with fewer rows have no whole AMX block */
static int amx_wanted = 1;

/* the leftover rows' cases, up to RB - 1: 6 to 15 only where blocks hold 16 rows */
#if RB > 8
#define CASES_6_TO_15 case 15: ROWS(bits, 15); break; case 14: ROWS(bits, 14); break; \
  case 13: ROWS(bits, 13); break; case 12: ROWS(bits, 12); break; case 11: ROWS(bits, 11); break; \
  case 10: ROWS(bits, 10); break; case 9: ROWS(bits, 9); break; case 8: ROWS(bits, 8); break; \
  case 7: ROWS(bits, 7); break; case 6: ROWS(bits, 6); break;
#elif RB == 6
#define CASES_6_TO_15
#else
#error "RB is 6 or 16"
#endif

#define ROWS(bits, rb) tile_rows(bits, mode_, rb, wt, st, G, K, xq + (size_t)r0 * K, dx + (size_t)r0 * G, \
                                 sx + (size_t)r0 * G, so + (size_t)r0 * G, bt, yt + (size_t)r0 * ldy, ldy)

#if AMX
#define AMX_BLOCKS() do { \
    const uint8_t* wb = wt; \
    if (FOUR(bits)) { unpack4(wt, G, wbuf); wb = wbuf; } \
    group_scales(bits, st, G, dmbuf); \
    for (; r0 + AR <= M; r0 += AR) amx_rows(bits, mode_, wb, dmbuf, G, K, xq + (size_t)r0 * K, dx + (size_t)r0 * G, \
                                            sx + (size_t)r0 * G, so + (size_t)r0 * G, bt, yt + (size_t)r0 * ldy, \
                                            ldy, cbuf); \
  } while (0)
#else
#define AMX_BLOCKS() (void)wbuf, (void)cbuf, (void)dmbuf
#endif

/* tile t into y's columns [col, col + 16), all rows, storing as MODE (PLAIN or UP): in row blocks, the rest with a
   constant row count (the compiler keeps rows in registers) */
#define TILE(t, col, MODE) do { \
    const int mode_ = (MODE); \
    const uint8_t* wt = weights + (size_t)(t) * tile_bytes; \
    const void* st = (const uint8_t*)scales + (size_t)(t) * tile_scales; \
    const float* bt = bias ? bias + (size_t)(t) * NT : NULL; \
    float* yt = y + (col); \
    int r0 = 0; \
    if (amx) AMX_BLOCKS(); \
    for (; r0 + RB <= M; r0 += RB) ROWS(bits, RB); \
    switch (M - r0) { \
      CASES_6_TO_15 \
      case 5: ROWS(bits, 5); break; \
      case 4: ROWS(bits, 4); break; \
      case 3: ROWS(bits, 3); break; \
      case 2: ROWS(bits, 2); break; \
      case 1: ROWS(bits, 1); break; \
      default: break; \
    } \
  } while (0)

/* a unit of work: tile u; with SwiGLU, the gate tile u and then its up tile u + T / 2 into the same columns */
#define UNIT(u) do { \
    if (swiglu) { TILE(u, (u) * NT, PLAIN); TILE((u) + units, (u) * NT, UP); } \
    else TILE(u, (u) * NT, PLAIN); \
  } while (0)

/* y = x W^T (+ bias), or with `swiglu` (N even in tiles: gate's outputs then up's) y (M, N / 2) = silu(gate) * up */
static void run(const int bits, const int swiglu, const float* x, int M, int K, int N, const uint8_t* weights,
                const void* scales, const float* bias, float* y, int8_t* xq, float* dx, float* sx, int32_t* so,
                int threads) {
  const int G = K / GS, T = N / NT;
  const int units = swiglu ? T / 2 : T, ldy = units * NT;  /* y's row: all outputs, or the N / 2 SwiGLU gives */
  const size_t tile_bytes = (size_t)G * (FOUR(bits) ? 256 : 512);
  const size_t tile_scales = bits == Q4K ? (size_t)G / 8 * Q4K_SUPER  /* bytes */
                             : (size_t)G * (bits == Q4 ? 2 * NT * 2 : bits == Q8 ? NT * 4 : 2 * NT * 4);
#if AMX
  const int amx_call = amx_wanted && M >= AMX_MIN_ROWS && amx_usable();
#endif
  #pragma omp parallel num_threads(threads)
  {
    int amx = 0;  /* whether this thread's share takes AMX: its buffers, too, must have been allocated */
    uint8_t* wbuf = NULL;  /* this thread's unpacked 4-bit tile, for AMX */
    int32_t* cbuf = NULL;
    float* dmbuf = NULL;
#if AMX
    if (amx_call) {
      if (FOUR(bits)) wbuf = aligned_alloc(64, (size_t)G * GS * NT);
      cbuf = aligned_alloc(64, (size_t)CHUNK * AR * NT * 4);
      dmbuf = aligned_alloc(64, (size_t)G * 2 * NT * 4);
      amx = cbuf && dmbuf && (!FOUR(bits) || wbuf);
      if (amx) amx_configure();
      else { free(wbuf); free(cbuf); free(dmbuf); }
    }
#endif
    #pragma omp for schedule(static)
    for (int r = 0; r < M; r++) quantize_row(x + (size_t)r * K, K, xq + (size_t)r * K, dx + (size_t)r * G,
                                             sx + (size_t)r * G, so + (size_t)r * G);
    /* tiles over the threads; within a tile, rows in blocks (the tile's weights stay in L1/L2 meanwhile).
       Prompt-sized calls take tiles in chunks as threads come free, so a thread the OS lends to another for a
       while (the server's event loop runs on the same cores) does not hold the call up: its tiles go to the
       other thread. Decode-sized calls split statically (a hand-out costs about what a tile does there). The
       same results either way: a tile's outputs do not depend on the thread that computes them. */
    if (M >= DYNAMIC_ROWS) {
      #pragma omp for schedule(dynamic, 4)
      for (int u = 0; u < units; u++) UNIT(u);
    } else {
      #pragma omp for schedule(static)
      for (int u = 0; u < units; u++) UNIT(u);
    }
#if AMX
    if (amx) {
      _tile_release();
      free(wbuf);
      free(cbuf);
      free(dmbuf);
    }
#endif
  }
}

/* AMX on (1) or off (0, the VNNI path for every row: the same outputs); returns whether calls will use it */
int group_quant_amx(int on) {
  amx_wanted = on;
#if AMX
  return on && amx_usable();
#else
  return 0;
#endif
}

/* x (M, K) fp32, weights and scales in the layouts above, bias (N) or NULL, y (M, N) fp32; scratch: xq (M, K)
   int8, dx and sx (M, K / 32) fp32, so (M, K / 32) int32. The _swiglu entries: y (M, N / 2) (see SwiGLU above). */
#define ENTRY(name, BITS, scales_t, SWIGLU) \
  void name(const float* x, int M, int K, int N, const uint8_t* weights, const scales_t* scales, const float* bias, \
            float* y, int8_t* xq, float* dx, float* sx, int32_t* so, int threads) { \
    run(BITS, SWIGLU, x, M, K, N, weights, scales, bias, y, xq, dx, sx, so, threads); \
  }
ENTRY(group_quant, Q4, uint16_t, 0)
ENTRY(group_quant_q4k, Q4K, uint8_t, 0)
ENTRY(q8_linear, Q8, float, 0)
ENTRY(q8z_linear, Q8Z, float, 0)
ENTRY(group_quant_swiglu, Q4, uint16_t, 1)
ENTRY(group_quant_q4k_swiglu, Q4K, uint8_t, 1)
ENTRY(q8_linear_swiglu, Q8, float, 1)
ENTRY(q8z_linear_swiglu, Q8Z, float, 1)
