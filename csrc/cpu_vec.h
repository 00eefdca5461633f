// AVX-512 helpers shared by the CPU kernels (x86-64, GCC/Clang): bf16 vectors to and from fp32 with
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
// 0.65 ms called, 0.59 ms inlined). DF_AVX512_ALWAYS: helpers that only AVX-512 code calls, inlined
// always (left to itself, GCC kept rotate_bf16_x32 out of line, even under flatten).
#define DF_AVX512_INLINE DF_AVX512 static inline
#define DF_AVX512_ALWAYS DF_AVX512 static inline __attribute__((always_inline))

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
DF_AVX512_ALWAYS __m512 mul_rounded(__m512 a, __m512 b) {
  return _mm512_mul_round_ps(a, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// fp32 -> the bf16 bits (low 16 bits of each lane) exactly as c10::BFloat16 rounds: to nearest
// even, denormals kept, every NaN to the quiet NaN 0x7FC0, by integer operations on the bits.
DF_AVX512_ALWAYS __m512i bf16_bits_exact(__m512 x) {
  const __m512i u = _mm512_castps_si512(x), one = _mm512_set1_epi32(1);
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), _mm512_and_si512(_mm512_srli_epi32(u, 16), one)),
      16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
}

// 32 bf16 (64 bytes) -> fp32 of the even and of the odd elements, exactly: an even element is the
// low half of a 32-bit lane (shifted up), an odd one the high half (masked). Two ALU operations
// for 32 elements, where widening 16 at a time takes a shuffle and a shift per 16.
DF_AVX512_ALWAYS void split_bf16x32(const uint16_t* p, __m512& even, __m512& odd) {
  const __m512i w = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xFFFF0000u))));
}

constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // vfpclassps: quiet NaN, denormal, signalling NaN

// Whether a lane of a, b, c or d is a NaN or a denormal (one mask test for the four).
DF_AVX512_ALWAYS bool any_nan_or_denormal(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __mmask16 ab = _kor_mask16(_mm512_fpclass_ps_mask(a, kNanOrDenormal), _mm512_fpclass_ps_mask(b, kNanOrDenormal));
  const __mmask16 cd = _kor_mask16(_mm512_fpclass_ps_mask(c, kNanOrDenormal), _mm512_fpclass_ps_mask(d, kNanOrDenormal));
  return !_kortestz_mask16_u8(ab, cd);
}

// The inverse of split_bf16x32: even and odd fp32 elements -> 32 bf16 in order, rounded as
// c10::BFloat16 rounds. vcvtne2ps2bf16 rounds alike in one instruction (even elements to words
// 0-15, odd to 16-31; one vpermw interleaves them) but flushes denormals to zero and keeps NaN
// signs and payloads: where a lane is such a value (rare; vfpclassps finds them), the caller takes
// join_bf16x32_exact, the integer rounding.
DF_AVX512_ALWAYS __m512i join_bf16x32(__m512 even, __m512 odd) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i words = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), words);
}

DF_AVX512_ALWAYS __m512i join_bf16x32_exact(__m512 even, __m512 odd) {
  return _mm512_or_si512(bf16_bits_exact(even), _mm512_slli_epi32(bf16_bits_exact(odd), 16));
}

// cos and sin of 32 consecutive channels [c0, c0 + 32) of a row's first half in split_bf16x32's
// lane order: channel d < D/4 turns by the row angle (cy, sy)[d], channel d >= D/4 by the column
// angle (cx, sx)[d - D/4]; each 16 lie on one side of D/4 (a multiple of 16).
struct AnglesX32 {
  __m512 cos_even, cos_odd, sin_even, sin_odd;
};

DF_AVX512_ALWAYS AnglesX32 angles_x32(const float* cy, const float* sy, const float* cx, const float* sx,
                                      int64_t quarter, int64_t c0) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const int64_t c1 = c0 + 16;
  const float* cos0 = c0 < quarter ? cy + c0 : cx + (c0 - quarter);
  const float* sin0 = c0 < quarter ? sy + c0 : sx + (c0 - quarter);
  const float* cos1 = c1 < quarter ? cy + c1 : cx + (c1 - quarter);
  const float* sin1 = c1 < quarter ? sy + c1 : sx + (c1 - quarter);
  const __m512 ca = _mm512_loadu_ps(cos0), cb = _mm512_loadu_ps(cos1);
  const __m512 sa = _mm512_loadu_ps(sin0), sb = _mm512_loadu_ps(sin1);
  return {_mm512_permutex2var_ps(ca, even, cb), _mm512_permutex2var_ps(ca, odd, cb),
          _mm512_permutex2var_ps(sa, even, sb), _mm512_permutex2var_ps(sa, odd, sb)};
}

// RoPE of channels [0, 32) of `in` and their partners [half, half + 32) into out (which may be in),
// by the angles `a` of those channels (sin already signed for the direction): each product is
// rounded and the difference or sum taken in fp32, then rounded to bf16: the reference's float math.
DF_AVX512_ALWAYS void rotate_bf16_x32(const uint16_t* in, uint16_t* out, int64_t half, const AnglesX32& a) {
  __m512 x1e, x1o, x2e, x2o;
  split_bf16x32(in, x1e, x1o);
  split_bf16x32(in + half, x2e, x2o);
  const __m512 y1e = _mm512_sub_ps(mul_rounded(x1e, a.cos_even), mul_rounded(x2e, a.sin_even));
  const __m512 y1o = _mm512_sub_ps(mul_rounded(x1o, a.cos_odd), mul_rounded(x2o, a.sin_odd));
  const __m512 y2e = _mm512_add_ps(mul_rounded(x2e, a.cos_even), mul_rounded(x1e, a.sin_even));
  const __m512 y2o = _mm512_add_ps(mul_rounded(x2o, a.cos_odd), mul_rounded(x1o, a.sin_odd));
  if (__builtin_expect(!any_nan_or_denormal(y1e, y1o, y2e, y2o), 1)) {
    _mm512_storeu_si512(out, join_bf16x32(y1e, y1o));
    _mm512_storeu_si512(out + half, join_bf16x32(y2e, y2o));
  } else {
    _mm512_storeu_si512(out, join_bf16x32_exact(y1e, y1o));
    _mm512_storeu_si512(out + half, join_bf16x32_exact(y2e, y2o));
  }
}

// rotate_bf16_row of a q row and a k row of D = 64 (DINOv3's head dim) that turn by the same
// angles, put in lane order once for both.
DF_AVX512_INLINE void rotate_bf16_qk64(const uint16_t* q, uint16_t* q_out, const uint16_t* k, uint16_t* k_out,
                                       const float* cy, const float* sy, const float* cx, const float* sx) {
  const AnglesX32 a = angles_x32(cy, sy, cx, sx, 16, 0);
  rotate_bf16_x32(q, q_out, 32, a);
  rotate_bf16_x32(k, k_out, 32, a);
}

// RoPE of one bf16 row of D = 4 * quarter channels (quarter a multiple of 16) into out (which may be
// in): channel pairs (d, d + D/2) turn by the row angles (cy, sy) for d < D/4 and by the column
// angles (cx, sx) for D/4 <= d < D/2, sin already signed for the direction.
DF_AVX512_INLINE void rotate_bf16_row(const uint16_t* in, uint16_t* out, const float* cy, const float* sy,
                                      const float* cx, const float* sx, int64_t quarter) {
  const int64_t half = 2 * quarter;
  for (int64_t c0 = 0; c0 < half; c0 += 32)
    rotate_bf16_x32(in + c0, out + c0, half, angles_x32(cy, sy, cx, sx, quarter, c0));
}

}  // namespace dinofast
#endif
