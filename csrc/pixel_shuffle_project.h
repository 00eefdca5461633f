// Pixel shuffle + projection: the index map, argument checks and the tiled GEMM drivers shared by
// pixel_shuffle_project_cpu.cpp (CPU) and pixel_shuffle_project_cuda.cu (CUDA).
// Index map (README, "Pixel shuffle + projection"), factor s, Gw = Wp/s:
//   A[m = I*Gw + J, (dy*s + dx)*D + d] = x[b, P + (I*s + dy)*Wp + (J*s + dx), d],   y = A @ W^T + b.
// The shuffled matrix A is never built whole: the drivers gather one panel of it at a time into a
// scratch buffer (at most kPanelBytes) and hand the panel to the BLAS/cuBLAS GEMM.
#pragma once
#include <algorithm>

#include "common.h"
#include "rope2d.h"  // rope::segment_of: the packed-token -> image search, shared by every packed op

namespace dinofast {
namespace shuffle {

// Scratch budget of one gathered panel. Each GEMM call re-packs its other operand (W, or grad_y for
// grad_weight), so panels must be tall enough to amortise that: 64 MiB is >= 1024 rows for every
// supported D*s*s in fp32, and small against the inputs it replaces at the sizes that matter.
constexpr int64_t kPanelBytes = int64_t(64) << 20;

struct Geometry {
  int64_t B, N, D;           // x viewed [B, N, D] (packed: [1, T, D])
  int64_t out_features, K;   // weight [out, K], K = D*s*s
  int64_t M;                 // output rows: B*Gh*Gw batched, sum_i Gh_i*Gw_i packed
  int64_t n_images;          // B batched, len(cu_seqlens)-1 packed
  int64_t hp, wp, G;         // batched grid and G = Gh*Gw tokens per image (unused when packed)
  int64_t factor, num_prefix_tokens;
  int64_t stride_b, stride_t;  // x strides (elements); unit stride on D
  bool packed;
};

// The packed metadata as raw pointers (host pointers on CPU, device pointers on CUDA).
struct Packed {
  const int32_t* cu = nullptr;      // [n+1] input token offsets
  const int32_t* grids = nullptr;   // [n, 2] (Hp, Wp) per image
  const int32_t* out_cu = nullptr;  // [n+1] output row offsets
};

// Where output row m reads from: batch b, the x token of its slot (dy, dx) = (0, 0), and the image
// width Wp (the token of slot (dy, dx) is tok + dy*Wp + dx).
struct RowSource {
  int64_t b, tok, wp;
};

DF_HD RowSource row_source(const Geometry& g, const Packed& p, int64_t m) {
  int64_t b = 0, start = 0, r, wp;
  if (g.packed) {
    const int64_t img = rope::segment_of(p.out_cu, g.n_images, m);
    r = m - p.out_cu[img];
    wp = p.grids[2 * img + 1];
    start = p.cu[img];
  } else {
    b = m / g.G;
    r = m % g.G;
    wp = g.wp;
  }
  const int64_t gw = wp / g.factor;
  return {b, start + g.num_prefix_tokens + (r / gw) * g.factor * wp + (r % gw) * g.factor, wp};
}

// Element offset in x of A[m, k] for k = slot*D + d, given row_source(m).
DF_HD int64_t x_offset(const Geometry& g, const RowSource& r, int64_t slot, int64_t d) {
  const int64_t tok = r.tok + (slot / g.factor) * r.wp + slot % g.factor;
  return r.b * g.stride_b + tok * g.stride_t + d;
}

// TORCH_CHECKs of the op's arguments (the Python layer has already raised ValueErrors; these keep
// direct torch.ops callers from reaching a kernel with bad pointers). y2 / grad_y are [M, out].
inline Geometry check_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& y2, const c10::optional<at::Tensor>& cu_seqlens,
                           const c10::optional<at::Tensor>& grids,
                           const c10::optional<at::Tensor>& out_cu_seqlens, int64_t hp, int64_t wp,
                           int64_t factor, int64_t num_prefix_tokens) {
  TORCH_CHECK(x.dim() == 3, op, ": x: expected a 3-D [B, N, D] view, got ", x.dim(), "-D");
  DF_CHECK_FLOAT(x, "pixel_shuffle_project: x");
  // a size-1 D addresses one element whatever its stride
  TORCH_CHECK(x.stride(2) == 1 || x.size(2) == 1, op, ": x: expected unit stride on D, got ", x.stride(2));
  TORCH_CHECK(factor >= 1, op, ": factor: expected >= 1, got ", factor);
  TORCH_CHECK(num_prefix_tokens >= 0, op, ": num_prefix_tokens: expected >= 0, got ", num_prefix_tokens);
  Geometry g;
  g.B = x.size(0); g.N = x.size(1); g.D = x.size(2);
  g.factor = factor; g.num_prefix_tokens = num_prefix_tokens;
  g.stride_b = x.stride(0); g.stride_t = x.stride(1);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), op, ": weight: expected contiguous [out, D*s*s]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight: expected dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  DF_CHECK_DEVICE(weight, x, "pixel_shuffle_project: weight");
  g.out_features = weight.size(0);
  g.K = weight.size(1);
  const int64_t k_expected = checked_mul(g.D, checked_mul(factor, factor, op, "factor*factor"), op, "D*s*s");
  TORCH_CHECK(g.K == k_expected, op, ": weight: expected in-features D*s*s = ", k_expected, ", got ", g.K);
  TORCH_CHECK(y2.dim() == 2 && y2.size(1) == g.out_features && y2.is_contiguous(), op,
              ": output/grad: expected contiguous [M, ", g.out_features, "], got ", y2.sizes());
  TORCH_CHECK(y2.scalar_type() == x.scalar_type(), op, ": output/grad: expected dtype ", x.scalar_type());
  DF_CHECK_DEVICE(y2, x, "pixel_shuffle_project: output/grad");
  g.M = y2.size(0);
  g.packed = cu_seqlens.has_value();
  g.hp = hp; g.wp = wp; g.G = 0;
  if (g.packed) {
    TORCH_CHECK(grids.has_value() && out_cu_seqlens.has_value(), op,
                ": grids, out_cu_seqlens: expected int32 tensors with cu_seqlens");
    TORCH_CHECK(g.B == 1, op, ": packed x: expected the view [1, T, D], got B = ", g.B);
    for (const auto* t : {&*cu_seqlens, &*grids, &*out_cu_seqlens}) {
      DF_CHECK_INT32(*t, "pixel_shuffle_project: cu_seqlens/grids/out_cu_seqlens");
      DF_CHECK_DEVICE(*t, x, "pixel_shuffle_project: cu_seqlens/grids/out_cu_seqlens");
      TORCH_CHECK(t->is_contiguous(), op, ": packed metadata: expected contiguous tensors");
    }
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2, op,
                ": cu_seqlens: expected [n+1] with n >= 1");
    g.n_images = cu_seqlens->numel() - 1;
    TORCH_CHECK(grids->dim() == 2 && grids->size(0) == g.n_images && grids->size(1) == 2, op,
                ": grids: expected [", g.n_images, ", 2], got ", grids->sizes());
    TORCH_CHECK(out_cu_seqlens->dim() == 1 && out_cu_seqlens->numel() == g.n_images + 1, op,
                ": out_cu_seqlens: expected [", g.n_images + 1, "]");
  } else {
    g.n_images = g.B;
    TORCH_CHECK(hp > 0 && wp > 0 && hp % factor == 0 && wp % factor == 0, op,
                ": grids: expected positive (Hp, Wp) divisible by factor ", factor, ", got (", hp, ", ", wp, ")");
    const int64_t tokens = image_tokens(num_prefix_tokens, hp, wp, op);
    TORCH_CHECK(g.N == tokens, op, ": N: expected num_prefix_tokens + Hp*Wp = ", tokens, ", got ", g.N);
    g.G = (hp / factor) * (wp / factor);
    const int64_t rows = checked_mul(g.B, g.G, op, "B*Gh*Gw");
    TORCH_CHECK(g.M == rows, op, ": output/grad: expected B*Gh*Gw = ", rows, " rows, got ", g.M);
  }
  return g;
}

// Host-side check of packed metadata values (CPU only: on CUDA they would need a device sync; the
// Python layer checks them there).
inline void check_packed_values(const char* op, const Geometry& g, const Packed& p) {
  TORCH_CHECK(p.cu[0] == 0 && p.out_cu[0] == 0, op, ": cu_seqlens, out_cu_seqlens: expected to start at 0");
  for (int64_t i = 0; i < g.n_images; ++i) {
    const int64_t hp = p.grids[2 * i], wp = p.grids[2 * i + 1];
    TORCH_CHECK(hp > 0 && wp > 0 && hp % g.factor == 0 && wp % g.factor == 0, op,
                ": grids: expected positive sides divisible by factor ", g.factor, " for image ", i, ", got (", hp,
                ", ", wp, ")");
    const int64_t tokens = image_tokens(g.num_prefix_tokens, hp, wp, op);
    TORCH_CHECK(int64_t(p.cu[i + 1]) - p.cu[i] == tokens, op, ": cu_seqlens: segment ", i,
                " expected num_prefix_tokens + Hp*Wp = ", tokens, " tokens, got ", int64_t(p.cu[i + 1]) - p.cu[i]);
    TORCH_CHECK(p.out_cu[i + 1] - p.out_cu[i] == (hp / g.factor) * (wp / g.factor), op,
                ": out_cu_seqlens: segment ", i, " expected Gh*Gw = ", (hp / g.factor) * (wp / g.factor));
  }
  TORCH_CHECK(p.cu[g.n_images] == g.N, op, ": cu_seqlens: expected last value ", g.N, ", got ", p.cu[g.n_images]);
  TORCH_CHECK(p.out_cu[g.n_images] == g.M, op, ": out_cu_seqlens: expected last value ", g.M, ", got ",
              p.out_cu[g.n_images]);
}

inline Packed packed_pointers(const Geometry& g, const c10::optional<at::Tensor>& cu_seqlens,
                              const c10::optional<at::Tensor>& grids,
                              const c10::optional<at::Tensor>& out_cu_seqlens) {
  Packed p;
  if (g.packed) {
    p.cu = cu_seqlens->data_ptr<int32_t>();
    p.grids = grids->data_ptr<int32_t>();
    p.out_cu = out_cu_seqlens->data_ptr<int32_t>();
  }
  return p;
}

// Rows of a panel of A: all M when that fits kPanelBytes, else as many as fit (at least 256, so
// that each GEMM call still amortises re-packing its other operand). One tall GEMM beats several
// short ones by 5-10% on CPU (measured with MKL), so panels are as tall as the budget allows.
inline int64_t panel_rows(const Geometry& g, int64_t cols, int64_t element_size) {
  const int64_t fit = kPanelBytes / std::max<int64_t>(1, cols * element_size);
  return std::max<int64_t>(1, std::min(g.M, std::max<int64_t>(fit, 256)));
}

// ---------------------------------------------------------------------------------------------
// Tiled drivers. `gather(panel, m0, k0)` fills panel [rows, cols] with A[m0 + i, k0 + j];
// (panel rows may be strided: stride(1) == 1, stride(0) >= cols);
// `scatter(panel, m0)` writes a [rows, K] panel of dA to the x rows it came from;
// `scratch(rows, cols)` returns an uninitialised [rows, cols] buffer of weight's dtype. These are
// the device-specific parts (an OpenMP loop and a reused buffer on CPU, kernels and the caching
// allocator on CUDA); the GEMMs are ATen's.
// ---------------------------------------------------------------------------------------------
template <class Gather, class Scratch>
void forward_tiled(const Geometry& g, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   at::Tensor& y2, const Gather& gather, const Scratch& scratch) {
  if (g.M == 0 || g.out_features == 0) return;
  const int64_t rows = panel_rows(g, g.K, weight.element_size());
  at::Tensor panel = scratch(rows, g.K);
  const at::Tensor wt = weight.t();
  for (int64_t m0 = 0; m0 < g.M; m0 += rows) {
    const int64_t n = std::min(rows, g.M - m0);
    at::Tensor a = panel.narrow(0, 0, n);
    gather(a, m0, 0);
    at::Tensor out = y2.narrow(0, m0, n);
    if (bias.has_value()) {
      at::addmm_out(out, *bias, a, wt);
    } else {
      at::mm_out(out, a, wt);
    }
  }
}

// grad_x rows of the prefix tokens get zero; every other row is written by `scatter`.
inline void zero_prefix_rows(const Geometry& g, at::Tensor& grad_x,
                             const c10::optional<at::Tensor>& cu_seqlens) {
  if (g.num_prefix_tokens == 0) return;
  if (!g.packed) {
    grad_x.narrow(1, 0, g.num_prefix_tokens).zero_();
    return;
  }
  // rows cu[i] + [0, P) of every image, as an index tensor (no host read of cu on CUDA)
  const at::Tensor starts = cu_seqlens->narrow(0, 0, g.n_images).to(at::kLong).unsqueeze(1);
  const at::Tensor rows = (starts + at::arange(g.num_prefix_tokens, starts.options())).flatten();
  grad_x.select(0, 0).index_fill_(0, rows, 0);
}

template <class Gather, class Scatter, class Scratch>
void backward_tiled(const Geometry& g, const at::Tensor& grad_y, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& grad_x, const c10::optional<at::Tensor>& grad_weight,
                    const c10::optional<at::Tensor>& grad_bias, const c10::optional<at::Tensor>& cu_seqlens,
                    const Gather& gather, const Scatter& scatter, const Scratch& scratch) {
  const int64_t es = weight.element_size();
  if (grad_bias.has_value()) {
    at::Tensor db = *grad_bias;
    at::sum_out(db, grad_y, {0});
  }
  if (grad_x.has_value()) {  // dA = grad_y @ W, one row panel at a time, scattered back to x rows
    at::Tensor dx = *grad_x;
    zero_prefix_rows(g, dx, cu_seqlens);
    if (g.M > 0) {
      const int64_t rows = panel_rows(g, g.K, es);
      at::Tensor panel = scratch(rows, g.K);
      for (int64_t m0 = 0; m0 < g.M; m0 += rows) {
        const int64_t n = std::min(rows, g.M - m0);
        at::Tensor da = panel.narrow(0, 0, n);
        at::mm_out(da, grad_y.narrow(0, m0, n), weight);
        scatter(da, m0);
      }
    }
  }
  if (grad_weight.has_value()) {  // dW = grad_y^T @ A: column panels of A, each reduced over all M
    at::Tensor dw = *grad_weight;
    if (g.M == 0) {
      dw.zero_();
      return;
    }
    // a full-M reduction per call keeps fp16/bf16 results to one rounding of an fp32 sum
    const int64_t cols = std::max<int64_t>(1, std::min(g.K, kPanelBytes / (g.M * es)));
    at::Tensor panel = scratch(g.M, cols);
    const at::Tensor gyt = grad_y.t();
    for (int64_t k0 = 0; k0 < g.K; k0 += cols) {
      const int64_t n = std::min(cols, g.K - k0);
      at::Tensor a = panel.narrow(1, 0, n);  // the last panel may be narrower: a strided view
      gather(a, 0, k0);
      at::Tensor out = dw.narrow(1, k0, n);
      at::mm_out(out, gyt, a);
    }
  }
}

}  // namespace shuffle
}  // namespace dinofast
