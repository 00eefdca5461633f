// Varlen attention: argument checks and index math shared by varlen_attention_cpu.cpp (CPU) and
// varlen_attention_cuda.cpp + varlen_attention_lse_cuda.cu (CUDA). Oracle: dinofast/reference/varlen_attention.py.
//
// Layout: q, k, v, out, grad tensors [T, H, D] with unit stride on D (T/H strides free);
// lse float32 [H, T] contiguous (natural log of each query row's sum of exp(scaled scores));
// cu_seqlens int32 [n+1]; optional RoPE: inv_freq float32 [D/4], grids int32 [n, 2] (Hp, Wp),
// coord_transform float32 [4] or [n, 4], num_prefix_tokens unrotated tokens at each segment start.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"
#include "rope2d.h"

namespace dinofast {
namespace varlen {

constexpr int kMaxHeadDim = 256;

struct Strides {
  int64_t t, h;
};

// Everything a kernel needs besides data pointers.
struct Problem {
  int64_t T, H, D, n_segments, max_seqlen;
  float scale;
  bool has_rope;
  int64_t num_prefix_tokens;
  int64_t transform_stride;  // 0: one coord_transform for all segments, 4: one row each
  bool has_transform;
};

// Token range [start, end) of segment s, clamped to [0, T]: whatever cu_seqlens holds, a kernel
// never touches a row outside the tensors.
DF_HD void segment_bounds(const int32_t* cu, int64_t s, int64_t T, int64_t& start, int64_t& end) {
  int64_t a = cu[s], b = cu[s + 1];
  a = a < 0 ? 0 : (a > T ? T : a);
  b = b < a ? a : (b > T ? T : b);
  start = a;
  end = b;
}

// RoPE angle of channel d < D/2 for the token at offset `pos_in_segment`; the prefix tokens
// (pos < num_prefix_tokens) are not rotated and never reach this. Same arithmetic as rope2d.
DF_HD float rope_angle(int64_t pos_in_segment, int64_t num_prefix_tokens, int64_t hp, int64_t wp,
                       const float* transform_row, int d, int quarter, const float* inv_freq) {
  float y, x;
  rope::token_yx(pos_in_segment - num_prefix_tokens, hp, wp, transform_row, y, x);
  return rope::channel_angle(d, quarter, y, x, inv_freq);
}

// Rotate a head row x [D] held in fp32 by cos/sin [D/2] (pairs d, d + D/2), in place; sign = -1
// applies the inverse (adjoint) rotation used by the backward.
template <typename T>
DF_HD void rotate_pairs(T* x, const T* cs, const T* sn, int half, T sign) {
  for (int d = 0; d < half; ++d) {
    const T x1 = x[d], x2 = x[d + half], s = sign * sn[d];
    x[d] = x1 * cs[d] - x2 * s;
    x[d + half] = x2 * cs[d] + x1 * s;
  }
}

inline void check_qkv_like(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.sizes() == ref.sizes(), "varlen_attention: ", name, ": expected shape ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "varlen_attention: ", name, ": expected dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  DF_CHECK_DEVICE(t, ref, "varlen_attention: q/k/v/out");
  TORCH_CHECK(t.stride(2) == 1, "varlen_attention: ", name, ": expected unit stride on the head dim, got ",
              t.stride(2));
}

// TORCH_CHECKs of the op's arguments (the Python layer has already raised ValueErrors; these keep
// direct torch.ops callers from reaching a kernel with bad pointers).
inline Problem check_args(const at::Tensor& q, std::initializer_list<std::pair<const at::Tensor*, const char*>> likes,
                          const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                          double softmax_scale, const c10::optional<at::Tensor>& inv_freq,
                          const c10::optional<at::Tensor>& grids,
                          const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens) {
  TORCH_CHECK(q.dim() == 3, "varlen_attention: q: expected [T, H, D], got ", q.dim(), "-D");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "varlen_attention: q: expected float32/float16/bfloat16, got ", q.scalar_type());
  check_qkv_like(q, q, "q");
  for (const auto& [t, name] : likes) check_qkv_like(q, *t, name);
  Problem p;
  p.T = q.size(0); p.H = q.size(1); p.D = q.size(2);
  TORCH_CHECK(p.D % 8 == 0 && p.D > 0 && p.D <= kMaxHeadDim,
              "varlen_attention: head dim: expected a multiple of 8 in [8, 256], got ", p.D);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == p.H && lse.size(1) == p.T &&
                  lse.is_contiguous(),
              "varlen_attention: lse: expected contiguous float32 [", p.H, ", ", p.T, "], got ", lse.sizes());
  DF_CHECK_DEVICE(lse, q, "varlen_attention: lse");
  DF_CHECK_INT32(cu_seqlens, "varlen_attention: cu_seqlens");
  DF_CHECK_DEVICE(cu_seqlens, q, "varlen_attention: cu_seqlens");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2 && cu_seqlens.is_contiguous(),
              "varlen_attention: cu_seqlens: expected contiguous [n+1], n >= 1, got ", cu_seqlens.sizes());
  p.n_segments = cu_seqlens.numel() - 1;
  TORCH_CHECK(max_seqlen >= 0, "varlen_attention: max_seqlen: expected >= 0, got ", max_seqlen);
  p.max_seqlen = max_seqlen;
  // the kernels compute in fp32: a scale that overflows fp32 would become inf
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0 &&
                  softmax_scale <= static_cast<double>(std::numeric_limits<float>::max()),
              "varlen_attention: softmax_scale: expected a finite positive number representable in float32, got ",
              softmax_scale);
  p.scale = static_cast<float>(softmax_scale);
  p.has_rope = inv_freq.has_value();
  p.num_prefix_tokens = num_prefix_tokens;
  p.has_transform = false;
  p.transform_stride = 0;
  if (p.has_rope) {
    TORCH_CHECK(inv_freq->scalar_type() == at::kFloat && inv_freq->numel() == p.D / 4 && inv_freq->is_contiguous(),
                "varlen_attention: inv_freq: expected contiguous float32 [", p.D / 4, "]");
    DF_CHECK_DEVICE(*inv_freq, q, "varlen_attention: inv_freq");
    TORCH_CHECK(grids.has_value(), "varlen_attention: grids: expected int32 [n, 2] with inv_freq");
    DF_CHECK_INT32(*grids, "varlen_attention: grids");
    DF_CHECK_DEVICE(*grids, q, "varlen_attention: grids");
    TORCH_CHECK(grids->dim() == 2 && grids->size(0) == p.n_segments && grids->size(1) == 2 && grids->is_contiguous(),
                "varlen_attention: grids: expected contiguous [", p.n_segments, ", 2], got ", grids->sizes());
    TORCH_CHECK(num_prefix_tokens >= 0, "varlen_attention: num_prefix_tokens: expected >= 0, got ",
                num_prefix_tokens);
    if (coord_transform.has_value()) {
      const auto& t = *coord_transform;
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() &&
                      (t.numel() == 4 || t.numel() == 4 * p.n_segments),
                  "varlen_attention: coord_transform: expected contiguous float32 [4] or [", p.n_segments, ", 4]");
      DF_CHECK_DEVICE(t, q, "varlen_attention: coord_transform");
      p.has_transform = true;
      p.transform_stride = t.numel() == 4 ? 0 : 4;
    }
  }
  return p;
}

// check_args for the forward op (q, k, v, out) and the backward op (+ grad_out, dq, dk, dv).
inline Problem check_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                              const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                              double softmax_scale, const c10::optional<at::Tensor>& inv_freq,
                              const c10::optional<at::Tensor>& grids,
                              const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens) {
  return check_args(q, {{&k, "k"}, {&v, "v"}, {&out, "out"}}, lse, cu_seqlens, max_seqlen, softmax_scale, inv_freq,
                    grids, coord_transform, num_prefix_tokens);
}

inline Problem check_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq,
                              const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& cu_seqlens,
                              int64_t max_seqlen, double softmax_scale, const c10::optional<at::Tensor>& inv_freq,
                              const c10::optional<at::Tensor>& grids,
                              const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens) {
  return check_args(q, {{&k, "k"}, {&v, "v"}, {&out, "out"}, {&dout, "grad_out"}, {&dq, "dq"}, {&dk, "dk"},
                        {&dv, "dv"}},
                    lse, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids, coord_transform, num_prefix_tokens);
}

// Whether the CPU kernel's bf16 forward runs on AMX tiles of its own for head dim D (the CPU has
// AMX-BF16, oneDNN is enabled, D is a multiple of 32, DINOFAST_CPU_ISA does not cap it).
bool cpu_bf16_forward_on_amx(int64_t D);
// Whether the CPU kernel's fp32 gemms are its own AVX-512 FMA kernels for head dim D (MKL otherwise).
bool cpu_fp32_on_own_kernels(int64_t D);

#ifdef DINOFAST_WITH_CUDA
// Log-sum-exp layout conversions (varlen_attention_lse_cuda.cu) between the op's lse [H, T] and the
// per-segment padded lse [n, H, L] of ATen's memory-efficient attention (row i of segment s at
// [s, h, i], any strides). cu_seqlens: int32 [n+1], non-decreasing, within [0, T].
void lse_padded_to_packed(const at::Tensor& padded, const at::Tensor& cu_seqlens, at::Tensor& lse);
void lse_packed_to_padded(const at::Tensor& lse, const at::Tensor& cu_seqlens, at::Tensor& padded);
#endif

}  // namespace varlen
}  // namespace dinofast
