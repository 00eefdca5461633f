// 2D RoPE index math and argument checks, shared by rope2d_cpu.cpp (CPU) and rope2d_cuda.cu (CUDA).
// Numerics and oracle: dinofast/reference/rope2d.py.
#pragma once
#include <cmath>
#include "common.h"

namespace dinofast {
namespace rope {

constexpr int kMaxHeadDim = 256;
constexpr float kTwoPi = 6.283185307179586f;

// Patch-centre coordinate in [-1, 1] of index i on an axis of n patches.
DF_HD float patch_coord(int64_t i, int64_t n) {
  return 2.0f * ((static_cast<float>(i) + 0.5f) / static_cast<float>(n)) - 1.0f;
}

// (y, x) of patch index pos on an (hp, wp) grid, after the optional train-time transform
// t = (shift_y, shift_x, scale_y, scale_x).
DF_HD void token_yx(int64_t pos, int64_t hp, int64_t wp, const float* t, float& y, float& x) {
  y = patch_coord(pos / wp, hp);
  x = patch_coord(pos % wp, wp);
  if (t != nullptr) {
    y = (y + t[0]) * t[2];
    x = (x + t[1]) * t[3];
  }
}

// Angle of channel d < D/2: the first D/4 channels follow y, the next D/4 follow x.
DF_HD float channel_angle(int d, int quarter, float y, float x, const float* inv_freq) {
  const float coord = d < quarter ? y : x;
  return (kTwoPi * coord) * inv_freq[d % quarter];
}

// Index of the image that owns packed token t: the last i with cu[i] <= t.
DF_HD int64_t segment_of(const int32_t* cu, int64_t n, int64_t t) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Everything a kernel needs to place a token on its image's grid.
struct Geometry {
  int64_t B, N, H, D;
  int64_t n_images;  // B when batched, len(cu_seqlens)-1 when packed
  int64_t hp, wp;    // batched grid (unused when packed)
  int64_t num_prefix_tokens;
  int64_t transform_stride;  // 0: one transform for all images, 4: one row per image
  bool packed, has_transform, inverse;
};

// Where token t of batch row b sits: its image, its patch index (negative for prefix tokens) and,
// for patches, the (y, x) of that patch after the optional transform.
struct TokenPlace {
  int64_t img, pos;
  float y, x;
};

DF_HD TokenPlace locate_token(const Geometry& g, const int32_t* cu, const int32_t* grids,
                              const float* transform, int64_t b, int64_t t) {
  int64_t img = b, start = 0, hp = g.hp, wp = g.wp;
  if (g.packed) {
    img = segment_of(cu, g.n_images, t);
    start = cu[img];
    hp = grids[2 * img];
    wp = grids[2 * img + 1];
  }
  TokenPlace p{img, t - start - g.num_prefix_tokens, 0.0f, 0.0f};
  if (p.pos >= 0)
    token_yx(p.pos, hp, wp, transform ? transform + img * g.transform_stride : nullptr, p.y, p.x);
  return p;
}

// TORCH_CHECKs of the op's arguments (the Python layer has already raised ValueErrors; these keep
// direct torch.ops callers from reaching a kernel with bad pointers).
inline Geometry check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
                           const at::Tensor& k_out, const at::Tensor& inv_freq,
                           const c10::optional<at::Tensor>& cu_seqlens,
                           const c10::optional<at::Tensor>& grids, int64_t hp, int64_t wp,
                           const c10::optional<at::Tensor>& coord_transform,
                           int64_t num_prefix_tokens, bool inverse) {
  TORCH_CHECK(q.dim() == 4, "rope2d: q: expected a 4-D [B, N, H, D] view, got ", q.dim(), "-D");
  for (const auto* t : {&k, &q_out, &k_out}) {
    TORCH_CHECK(t->sizes() == q.sizes(), "rope2d: expected every tensor of shape ", q.sizes(),
                ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "rope2d: expected dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
    DF_CHECK_DEVICE(*t, q, "rope2d: q/k/out");
  }
  DF_CHECK_FLOAT(q, "rope2d: q");
  for (const auto* t : {&q, &k, &q_out, &k_out})
    TORCH_CHECK(t->stride(3) == 1, "rope2d: expected unit stride on the head dim, got ", t->stride(3));
  Geometry g;
  g.B = q.size(0); g.N = q.size(1); g.H = q.size(2); g.D = q.size(3);
  TORCH_CHECK(g.D % 4 == 0 && g.D > 0 && g.D <= kMaxHeadDim,
              "rope2d: head dim: expected a multiple of 4 in [4, 256], got ", g.D);
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.numel() == g.D / 4 &&
                  inv_freq.is_contiguous(),
              "rope2d: inv_freq: expected contiguous float32 [", g.D / 4, "]");
  DF_CHECK_DEVICE(inv_freq, q, "rope2d: inv_freq");
  TORCH_CHECK(num_prefix_tokens >= 0, "rope2d: num_prefix_tokens: expected >= 0, got ", num_prefix_tokens);
  g.packed = cu_seqlens.has_value();
  g.num_prefix_tokens = num_prefix_tokens;
  g.inverse = inverse;
  if (g.packed) {
    TORCH_CHECK(grids.has_value(), "rope2d: grids: expected int32 [n, 2] with cu_seqlens");
    TORCH_CHECK(g.B == 1, "rope2d: packed q: expected the view [1, T, H, D], got B = ", g.B);
    DF_CHECK_INT32(*cu_seqlens, "rope2d: cu_seqlens");
    DF_CHECK_INT32(*grids, "rope2d: grids");
    DF_CHECK_DEVICE(*cu_seqlens, q, "rope2d: cu_seqlens");
    DF_CHECK_DEVICE(*grids, q, "rope2d: grids");
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2 && cu_seqlens->is_contiguous(),
                "rope2d: cu_seqlens: expected contiguous [n+1], n >= 1");
    g.n_images = cu_seqlens->numel() - 1;
    TORCH_CHECK(grids->dim() == 2 && grids->size(0) == g.n_images && grids->size(1) == 2 &&
                    grids->is_contiguous(),
                "rope2d: grids: expected contiguous [", g.n_images, ", 2], got ", grids->sizes());
  } else {
    g.n_images = g.B;
    TORCH_CHECK(hp > 0 && wp > 0, "rope2d: grids: expected positive (Hp, Wp), got (", hp, ", ", wp, ")");
    const int64_t tokens = image_tokens(num_prefix_tokens, hp, wp, "rope2d");
    TORCH_CHECK(g.N == tokens, "rope2d: N: expected num_prefix_tokens + Hp*Wp = ", tokens, ", got ", g.N);
  }
  g.hp = hp; g.wp = wp;
  g.has_transform = coord_transform.has_value();
  g.transform_stride = 0;
  if (g.has_transform) {
    const auto& t = *coord_transform;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    (t.numel() == 4 || t.numel() == 4 * g.n_images),
                "rope2d: coord_transform: expected contiguous float32 [4] or [", g.n_images, ", 4]");
    DF_CHECK_DEVICE(t, q, "rope2d: coord_transform");
    g.transform_stride = t.numel() == 4 ? 0 : 4;
  }
  return g;
}

#ifdef DINOFAST_WITH_CUDA
// The CUDA kernel of the rope2d op (rope2d_cuda.cu); varlen attention's CUDA path calls it too.
void rope2d_cuda(const at::Tensor& q, const at::Tensor& k, at::Tensor q_out, at::Tensor k_out,
                 const at::Tensor& inv_freq, const c10::optional<at::Tensor>& cu_seqlens,
                 const c10::optional<at::Tensor>& grids, int64_t hp, int64_t wp,
                 const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens, bool inverse);
#endif

}  // namespace rope
}  // namespace dinofast
