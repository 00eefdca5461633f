// 2D RoPE on CPU. The angle of a patch channel depends on the patch's row (first D/4 channels) or
// column (next D/4) only, so cos/sin are tabulated once per image and axis ((Hp + Wp) * D/4 values
// instead of Hp * Wp * D/2 per call), with the same float math as channel_angle; the rows of q and
// k are then pure loads, FMAs and stores. at::parallel_for (OpenMP) walks (b, h, t) rows in the
// order the tensors are laid out in memory (heads outer for a contiguous [B, H, N, D] tensor, tokens
// outer for transformers' [B, N, H, D] buffer), so each thread streams through contiguous memory.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <vector>

#include "rope2d.h"

namespace dinofast {
namespace rope {
namespace {

// cos/sin of every row (y) and column (x) of every image: y rows of image i start at
// y_offset[i] * quarter, x columns at x_offset[i] * quarter.
template <typename acc_t>
struct AngleTables {
  std::vector<acc_t> cos_y, sin_y, cos_x, sin_x;
  std::vector<int64_t> y_offset, x_offset;
};

template <typename acc_t>
AngleTables<acc_t> build_tables(const Geometry& g, const int32_t* grids, const float* transform,
                                const float* freqs) {
  const int64_t quarter = g.D / 4;
  const bool per_image = g.packed || g.transform_stride != 0;  // batched, one transform: one table
  const int64_t n_tables = per_image ? g.n_images : 1;
  AngleTables<acc_t> tb;
  tb.y_offset.resize(n_tables + 1);
  tb.x_offset.resize(n_tables + 1);
  tb.y_offset[0] = tb.x_offset[0] = 0;
  for (int64_t i = 0; i < n_tables; ++i) {
    tb.y_offset[i + 1] = tb.y_offset[i] + (g.packed ? grids[2 * i] : g.hp);
    tb.x_offset[i + 1] = tb.x_offset[i] + (g.packed ? grids[2 * i + 1] : g.wp);
  }
  const int64_t ny = checked_mul(tb.y_offset[n_tables], quarter, "rope2d", "angle table rows");
  const int64_t nx = checked_mul(tb.x_offset[n_tables], quarter, "rope2d", "angle table columns");
  tb.cos_y.resize(ny); tb.sin_y.resize(ny); tb.cos_x.resize(nx); tb.sin_x.resize(nx);
  const acc_t sign = g.inverse ? acc_t(-1) : acc_t(1);
  const int q = static_cast<int>(quarter);
  for (int64_t i = 0; i < n_tables; ++i) {
    const int64_t hp = tb.y_offset[i + 1] - tb.y_offset[i], wp = tb.x_offset[i + 1] - tb.x_offset[i];
    const float* t = transform ? transform + i * g.transform_stride : nullptr;
    // token_yx of (r, 0) gives row r's y and of (0, c) column c's x, transform included
    for (int64_t r = 0; r < hp; ++r) {
      float y, x;
      token_yx(r * wp, hp, wp, t, y, x);
      for (int d = 0; d < q; ++d) {
        const acc_t a = channel_angle(d, q, y, x, freqs);
        tb.cos_y[(tb.y_offset[i] + r) * quarter + d] = std::cos(a);
        tb.sin_y[(tb.y_offset[i] + r) * quarter + d] = sign * std::sin(a);
      }
    }
    for (int64_t c = 0; c < wp; ++c) {
      float y, x;
      token_yx(c, hp, wp, t, y, x);
      for (int d = q; d < 2 * q; ++d) {
        const acc_t a = channel_angle(d, q, y, x, freqs);
        tb.cos_x[(tb.x_offset[i] + c) * quarter + d - q] = std::cos(a);
        tb.sin_x[(tb.x_offset[i] + c) * quarter + d - q] = sign * std::sin(a);
      }
    }
  }
  return tb;
}

// Rotate one head row: channel pairs (d, d + D/2), y angles for d < D/4, x angles after. Each pair
// is loaded before either element is stored, so out may alias in.
template <typename scalar_t, typename acc_t>
inline void rotate_row(const scalar_t* __restrict__ in, scalar_t* out, const acc_t* __restrict__ cy,
                       const acc_t* __restrict__ sy, const acc_t* __restrict__ cx,
                       const acc_t* __restrict__ sx, int64_t quarter) {
  const int64_t half = 2 * quarter;
  acc_t x1[kMaxHeadDim / 2], x2[kMaxHeadDim / 2];
  for (int64_t d = 0; d < half; ++d) {
    x1[d] = static_cast<acc_t>(in[d]);
    x2[d] = static_cast<acc_t>(in[d + half]);
  }
  for (int64_t d = 0; d < quarter; ++d) {
    out[d] = static_cast<scalar_t>(x1[d] * cy[d] - x2[d] * sy[d]);
    out[d + half] = static_cast<scalar_t>(x2[d] * cy[d] + x1[d] * sy[d]);
  }
  for (int64_t d = 0; d < quarter; ++d) {
    const int64_t e = d + quarter;
    out[e] = static_cast<scalar_t>(x1[e] * cx[d] - x2[e] * sx[d]);
    out[e + half] = static_cast<scalar_t>(x2[e] * cx[d] + x1[e] * sx[d]);
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
  const int64_t quarter = g.D / 4;
  const AngleTables<acc_t> tb = build_tables<acc_t>(g, grids, transform, inv_freq.data_ptr<float>());
  const bool per_image = g.packed || g.transform_stride != 0;
  const scalar_t* qi = q.data_ptr<scalar_t>();
  const scalar_t* ki = k.data_ptr<scalar_t>();
  scalar_t* qo = q_out.data_ptr<scalar_t>();
  scalar_t* ko = k_out.data_ptr<scalar_t>();
  // Rows in memory order of q: tokens inner when they are closer together than heads. One work
  // unit is (b, outer index); its inner loop advances row/column counters instead of dividing.
  const bool heads_outer = q.stride(2) > q.stride(1);
  const int64_t outer = heads_outer ? g.H : g.N, inner = heads_outer ? g.N : g.H;
  const int64_t grain = std::max<int64_t>(1, 16384 / (inner * g.D));

  // Rotates (or, for a prefix token, copies) row (b, t, h) given its image table and patch (r, c).
  auto do_row = [&](int64_t b, int64_t t, int64_t h, int64_t table, int64_t r, int64_t c, bool prefix) {
    const scalar_t* qr = qi + b * q.stride(0) + t * q.stride(1) + h * q.stride(2);
    const scalar_t* kr = ki + b * k.stride(0) + t * k.stride(1) + h * k.stride(2);
    scalar_t* qw = qo + b * q_out.stride(0) + t * q_out.stride(1) + h * q_out.stride(2);
    scalar_t* kw = ko + b * k_out.stride(0) + t * k_out.stride(1) + h * k_out.stride(2);
    if (prefix) {  // copied bit for bit (x*1 - y*0 would turn an Inf into NaN)
      copy_row(qr, qw, g.D);
      copy_row(kr, kw, g.D);
      return;
    }
    const int64_t yo = (tb.y_offset[table] + r) * quarter, xo = (tb.x_offset[table] + c) * quarter;
    const acc_t *cy = tb.cos_y.data() + yo, *sy = tb.sin_y.data() + yo;
    const acc_t *cx = tb.cos_x.data() + xo, *sx = tb.sin_x.data() + xo;
    rotate_row(qr, qw, cy, sy, cx, sx, quarter);
    rotate_row(kr, kw, cy, sy, cx, sx, quarter);
  };
  // Image table and patch (r, c) of token t of batch row b; false for a prefix token.
  auto place = [&](int64_t b, int64_t t, int64_t& table, int64_t& r, int64_t& c) {
    int64_t img = b, pos = t - g.num_prefix_tokens, wp = g.wp;
    if (g.packed) {
      img = segment_of(cu, g.n_images, t);
      pos = t - cu[img] - g.num_prefix_tokens;
      wp = grids[2 * img + 1];
    }
    table = per_image ? img : 0;
    if (pos < 0) return false;
    r = pos / wp;
    c = pos % wp;
    return true;
  };

  at::parallel_for(0, g.B * outer, grain, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / outer, o = unit % outer;
      if (!heads_outer) {  // one token, every head
        int64_t table = 0, r = 0, c = 0;
        const bool patch = place(b, o, table, r, c);
        for (int64_t h = 0; h < g.H; ++h) do_row(b, o, h, table, r, c, !patch);
      } else if (!g.packed) {  // one head, every token of image b: the patch counters walk the grid
        const int64_t table = per_image ? b : 0;
        const int64_t P = std::min(g.num_prefix_tokens, g.N);
        for (int64_t t = 0; t < P; ++t) do_row(b, t, o, table, 0, 0, true);
        int64_t r = 0, c = 0;
        for (int64_t t = P; t < g.N; ++t) {
          do_row(b, t, o, table, r, c, false);
          if (++c == g.wp) { c = 0; ++r; }
        }
      } else {  // packed tokens with heads outer (an unusual stride order): place each token
        for (int64_t t = 0; t < g.N; ++t) {
          int64_t table = 0, r = 0, c = 0;
          const bool patch = place(b, t, table, r, c);
          do_row(b, t, o, table, r, c, !patch);
        }
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
