/* GGUF Q6_K blocks straight to the 8-bit form the group-quantized kernel takes (Q8: 255 symmetric levels per
   group of 32 weights), in one pass over the blocks.

   Why: Q6_K's 16-weight sub-blocks have no group-32 form, so its weights are rounded to 8 bits per group of 32.
   In torch that is a dozen passes over fp32 temporaries (dequantize, |w|, max, divide, round, clamp, shift):
   ~2.6 s of Qwen2.5-1.5B's load for its 431M Q6_K weights. Here each group is done in registers. The arithmetic
   is the torch path's step for step (app/models/loading/gguf_weights.py: w = (d sc) q in fp32, amax / 127,
   w / that rounded half to even, clamped to [-127, 127]); no -ffast-math, so the results are the same bits
   (tests/models/loading/test_gguf_weights.py). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define QK 256
#define BLOCK 210  /* ql 128, qh 64, scales 16 (int8), d (fp16) */

static float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  /* subnormal: normalize */
      int e = -1;
      uint32_t m = man;
      do { e++; m <<= 1; } while (!(m & 0x400));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* blocks (nblocks, 210) -> u (nblocks * 256) uint8 = q8 + 128 and d (nblocks * 8) fp32, per group of 32 */
void q6_k_to_q8(const uint8_t* restrict blocks, long nblocks, uint8_t* restrict u, float* restrict d, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (long b = 0; b < nblocks; b++) {
    const uint8_t* blk = blocks + (size_t)b * BLOCK;
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const int8_t* sc = (const int8_t*)(blk + 192);
    uint16_t dh;
    memcpy(&dh, blk + 208, 2);
    const float dd = half_to_float(dh);
    float w[QK];
    /* ggml's order: two halves of 128; in each, 32 positions l, four quarters of 32 */
    for (int half = 0; half < 2; half++) {
      const uint8_t* qlh = ql + 64 * half;
      const uint8_t* qhh = qh + 32 * half;
      for (int l = 0; l < 32; l++) {
        const int q[4] = {(qlh[l] & 15) | (((qhh[l] >> 0) & 3) << 4), (qlh[l + 32] & 15) | (((qhh[l] >> 2) & 3) << 4),
                          (qlh[l] >> 4) | (((qhh[l] >> 4) & 3) << 4), (qlh[l + 32] >> 4) | (((qhh[l] >> 6) & 3) << 4)};
        for (int j = 0; j < 4; j++) {
          const int at = 128 * half + 32 * j + l;  /* sub-block at / 16 */
          w[at] = (dd * (float)sc[at / 16]) * (float)(q[j] - 32);
        }
      }
    }
    for (int g = 0; g < QK / 32; g++) {
      const float* wg = w + 32 * g;
      float amax = 0.0f;
      for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(wg[i]));
      const float dg = amax / 127.0f;
      const float safe = dg > 0.0f ? dg : 1.0f;
      uint8_t* ug = u + (size_t)b * QK + 32 * g;
      for (int i = 0; i < 32; i++) {
        float r = nearbyintf(wg[i] / safe);
        r = r < -127.0f ? -127.0f : r > 127.0f ? 127.0f : r;
        ug[i] = (uint8_t)((int)r + 128);
      }
      d[(size_t)b * 8 + g] = dg;
    }
  }
}
