// AVX-512 helpers shared by the CPU kernels (x86-64, GCC/Clang): bf16 rows to and from fp32 with
// c10::BFloat16's rounding, products that are never contracted into fmas, and the RoPE rotation of
// one bf16 row that rope2d and the fused RoPE of varlen_attention both store.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>

#define DF_HAVE_AVX512_PATH 1
#define DF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
// Internal linkage, so that callers with the same target inline these: as an exported inline
// function, rotate_bf16_row was called per row through the PLT (rope2d_ bf16 at 768^2, 1 thread:
// 0.65 ms called, 0.59 ms inlined).
#define DF_AVX512_INLINE DF_AVX512 static inline

namespace dinofast {

// Whether this CPU runs DF_AVX512 code.
inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

// a * b rounded on its own: GCC contracts a plain vector product followed by an add or subtract into
// one fma, which skips this rounding (the references round every product).
DF_AVX512_INLINE __m512 mul_rounded(__m512 a, __m512 b) {
  return _mm512_mul_round_ps(a, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// 16 bf16 -> fp32 (exact).
DF_AVX512_INLINE __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// 16 fp32 -> bf16 exactly as c10::BFloat16 rounds: to nearest even, denormals kept, every NaN to the
// quiet NaN 0x7FC0, by integer operations on the bits.
DF_AVX512_INLINE void store_bf16x16(uint16_t* p, __m512 x) {
  const __m512i u = _mm512_castps_si512(x), one = _mm512_set1_epi32(1);
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), _mm512_and_si512(_mm512_srli_epi32(u, 16), one)),
      16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0))));
}

// store_bf16x16(p0, a) and store_bf16x16(p1, b), faster: vcvtneps2bf16 rounds alike in one
// instruction but flushes denormals to zero and keeps NaN signs and payloads, so it serves the two
// vectors unless one has such a lane (rare; one vfpclassps per vector finds them, one branch for both).
DF_AVX512_INLINE void store_bf16x16_pair(uint16_t* p0, __m512 a, uint16_t* p1, __m512 b) {
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // quiet NaN, denormal, signalling NaN
  if (__builtin_expect((_mm512_fpclass_ps_mask(a, kNanOrDenormal) | _mm512_fpclass_ps_mask(b, kNanOrDenormal)) == 0,
                       1)) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p0), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(a)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p1), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(b)));
    return;
  }
  store_bf16x16(p0, a);
  store_bf16x16(p1, b);
}

// RoPE of one bf16 row of D = 4 * quarter channels (quarter a multiple of 16) into out (which may be
// in): channel pairs (d, d + D/2) turn by the row angles (cy, sy) for d < D/4 and by the column
// angles (cx, sx) for D/4 <= d < D/2, sin already signed for the direction. Each product is rounded
// and the difference or sum taken in fp32, then rounded to bf16: the reference's float math.
template <int64_t kQuarter>  // 0: the quarter given at run time
DF_AVX512_INLINE void rotate_bf16_row_groups(const uint16_t* in, uint16_t* out, const float* cy, const float* sy,
                                             const float* cx, const float* sx, int64_t quarter) {
  const int64_t q = kQuarter != 0 ? kQuarter : quarter;
  const float* tabs[2][2] = {{cy, sy}, {cx, sx}};
  for (int part = 0; part < 2; ++part) {
    for (int64_t d = 0; d < q; d += 16) {
      const int64_t c0 = part * q + d;
      const __m512 c = _mm512_loadu_ps(tabs[part][0] + d), s = _mm512_loadu_ps(tabs[part][1] + d);
      const __m512 x1 = load_bf16x16(in + c0), x2 = load_bf16x16(in + c0 + 2 * q);
      store_bf16x16_pair(out + c0, _mm512_sub_ps(mul_rounded(x1, c), mul_rounded(x2, s)), out + c0 + 2 * q,
                         _mm512_add_ps(mul_rounded(x2, c), mul_rounded(x1, s)));
    }
  }
}

DF_AVX512_INLINE void rotate_bf16_row(const uint16_t* in, uint16_t* out, const float* cy, const float* sy,
                                      const float* cx, const float* sx, int64_t quarter) {
  if (quarter == 16)  // head dim 64 (DINOv3's): a compile-time trip count, the loops unrolled
    rotate_bf16_row_groups<16>(in, out, cy, sy, cx, sx, quarter);
  else
    rotate_bf16_row_groups<0>(in, out, cy, sy, cx, sx, quarter);
}

}  // namespace dinofast
#endif
