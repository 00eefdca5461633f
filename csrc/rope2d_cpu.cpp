// 2D RoPE on CPU: at::parallel_for (OpenMP) over tokens; per token the D/2 angles are computed once
// and reused for every head of q and k; the inner loops over channels vectorise.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <vector>

#include "rope2d.h"

namespace dinofast {
namespace rope {
namespace {

// Rotate one head row. Loads go through the acc buffers first, so out may alias in.
template <typename scalar_t, typename acc_t>
inline void rotate_row(const scalar_t* in, scalar_t* out, const acc_t* cs, const acc_t* sn,
                       int64_t half, acc_t* x1, acc_t* x2) {
  for (int64_t d = 0; d < half; ++d) {
    x1[d] = static_cast<acc_t>(in[d]);
    x2[d] = static_cast<acc_t>(in[d + half]);
  }
  for (int64_t d = 0; d < half; ++d) {
    out[d] = static_cast<scalar_t>(x1[d] * cs[d] - x2[d] * sn[d]);
    out[d + half] = static_cast<scalar_t>(x2[d] * cs[d] + x1[d] * sn[d]);
  }
}

template <typename scalar_t>
inline void copy_row(const scalar_t* in, scalar_t* out, int64_t D) {
  if (in == out) return;
  for (int64_t d = 0; d < D; ++d) out[d] = in[d];
}

template <typename scalar_t>
void rope2d_cpu_impl(const at::Tensor& q, const at::Tensor& k, at::Tensor& q_out, at::Tensor& k_out,
                     const at::Tensor& inv_freq, const int32_t* cu, const int32_t* grids,
                     const float* transform, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = g.D / 2, quarter = g.D / 4;
  const float* freqs = inv_freq.data_ptr<float>();
  const scalar_t* qi = q.data_ptr<scalar_t>();
  const scalar_t* ki = k.data_ptr<scalar_t>();
  scalar_t* qo = q_out.data_ptr<scalar_t>();
  scalar_t* ko = k_out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.H * g.D));

  at::parallel_for(0, g.B * g.N, grain, [&](int64_t begin, int64_t end) {
    acc_t cs[kMaxHeadDim / 2], sn[kMaxHeadDim / 2], x1[kMaxHeadDim / 2], x2[kMaxHeadDim / 2];
    bool y_cached = false;
    int64_t y_img = -1;
    float y_last = 0.0f;
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / g.N, t = bt % g.N;
      const TokenPlace p = locate_token(g, cu, grids, transform, b, t);
      if (p.pos < 0) {  // prefix token: copied bit for bit (x*1 - y*0 would turn an Inf into NaN)
        for (int64_t h = 0; h < g.H; ++h) {
          copy_row(qi + b * q.stride(0) + t * q.stride(1) + h * q.stride(2),
                   qo + b * q_out.stride(0) + t * q_out.stride(1) + h * q_out.stride(2), g.D);
          copy_row(ki + b * k.stride(0) + t * k.stride(1) + h * k.stride(2),
                   ko + b * k_out.stride(0) + t * k_out.stride(1) + h * k_out.stride(2), g.D);
        }
        y_cached = false;
        continue;
      } else {
        // The first D/4 channels depend on the row only: consecutive tokens of a row reuse them.
        const bool same_row = y_cached && p.img == y_img && p.y == y_last;
        for (int64_t d = same_row ? quarter : 0; d < half; ++d) {
          const acc_t a = channel_angle(static_cast<int>(d), static_cast<int>(quarter), p.y, p.x, freqs);
          cs[d] = std::cos(a);
          sn[d] = g.inverse ? -std::sin(a) : std::sin(a);
        }
        y_cached = true; y_img = p.img; y_last = p.y;
      }
      for (int64_t h = 0; h < g.H; ++h) {
        rotate_row(qi + b * q.stride(0) + t * q.stride(1) + h * q.stride(2),
                   qo + b * q_out.stride(0) + t * q_out.stride(1) + h * q_out.stride(2), cs, sn, half, x1, x2);
        rotate_row(ki + b * k.stride(0) + t * k.stride(1) + h * k.stride(2),
                   ko + b * k_out.stride(0) + t * k_out.stride(1) + h * k_out.stride(2), cs, sn, half, x1, x2);
      }
    }
  });
}

void rope2d_cpu(const at::Tensor& q, const at::Tensor& k, at::Tensor q_out, at::Tensor k_out,
                const at::Tensor& inv_freq, const c10::optional<at::Tensor>& cu_seqlens,
                const c10::optional<at::Tensor>& grids, int64_t hp, int64_t wp,
                const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens, bool inverse) {
  const Geometry g = check_args(q, k, q_out, k_out, inv_freq, cu_seqlens, grids, hp, wp, coord_transform,
                                num_prefix_tokens, inverse);
  const int32_t* cu = nullptr;
  const int32_t* gr = nullptr;
  if (g.packed) {  // the CPU kernel reads these on the host: check the values it relies on
    cu = cu_seqlens->data_ptr<int32_t>();
    gr = grids->data_ptr<int32_t>();
    TORCH_CHECK(cu[0] == 0, "rope2d: cu_seqlens: expected cu_seqlens[0] == 0, got ", cu[0]);
    for (int64_t i = 0; i < g.n_images; ++i) {
      TORCH_CHECK(cu[i + 1] >= cu[i], "rope2d: cu_seqlens: expected non-decreasing values at ", i);
      TORCH_CHECK(gr[2 * i] > 0 && gr[2 * i + 1] > 0, "rope2d: grids: expected positive sides for image ", i);
      TORCH_CHECK(int64_t(cu[i + 1]) - cu[i] == image_tokens(g.num_prefix_tokens, gr[2 * i], gr[2 * i + 1], "rope2d"),
                  "rope2d: cu_seqlens: segment ", i, " expected num_prefix_tokens + Hp*Wp tokens");
    }
    TORCH_CHECK(cu[g.n_images] == g.N, "rope2d: cu_seqlens: expected last value ", g.N, ", got ", cu[g.n_images]);
  }
  const float* tr = g.has_transform ? coord_transform->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope2d_cpu", [&] {
    rope2d_cpu_impl<scalar_t>(q, k, q_out, k_out, inv_freq, cu, gr, tr, g);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dinofast_C, CPU, m) { m.impl("rope2d", &rope2d_cpu); }

}  // namespace rope
}  // namespace dinofast
