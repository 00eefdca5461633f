// Pixel shuffle + projection on CPU: panels of the shuffled matrix are gathered into scratch with
// at::parallel_for (one copy per (row, slot) run of D contiguous channels, streaming stores for
// multi-MiB panels) and multiplied by ATen's BLAS GEMM (MKL / oneDNN; bf16 on AMX where present).
// Tiling and index map: pixel_shuffle_project.h.
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "pixel_shuffle_project.h"

namespace dinofast {
namespace shuffle {
namespace {

constexpr const char* kOp = "pixel_shuffle_project";
// Copies smaller than this run on the calling thread (waking a second thread costs more). Measured on
// an idle 2-core AMX box, bf16, 2 threads, B=1 (panels of 1.5-6 MiB): 256 KiB per thread beats 4 MiB
// by 3-9% of the whole op and 64 KiB is no better; under load a 4 MiB grain measured better, because
// a second thread that has to wait for a core then stalls the copy.
constexpr int64_t kParallelBytes = int64_t(256) << 10;

// Panels at least this large are written with streaming (non-temporal) stores: a multi-MiB panel
// does not stay in L2 anyway, and ordinary stores first read every destination line, then leave it
// dirty for the GEMM's own traffic to write back. Measured with bf16 GEMMs (AMX), 1 thread,
// panels of 6-28 MiB: the whole op 1.5-5% faster; a 1.5 MiB panel 4-5% slower (the GEMM no longer
// finds it in cache), hence the threshold.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// dst <- src, n bytes, with streaming stores where dst is 16-byte aligned (SSE2: every x86-64).
inline void copy_streaming(char* dst, const char* src, int64_t n) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    if (i < n) std::memcpy(dst + i, src + i, n - i);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

// panel[i, j] = A[m0 + i, k0 + j]; copies runs of channels that stay inside one slot.
void gather_cpu(const Geometry& g, const Packed& p, const at::Tensor& x, at::Tensor& panel, int64_t m0,
                int64_t k0) {
  const int64_t rows = panel.size(0), cols = panel.size(1), es = x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(panel.data_ptr());
  const int64_t ld = panel.stride(0);
  const bool streaming = rows * cols * es >= kStreamBytes;
  const int64_t grain = std::max<int64_t>(1, kParallelBytes / std::max<int64_t>(1, cols * es));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const RowSource r = row_source(g, p, m0 + i);
      for (int64_t j = 0; j < cols;) {
        const int64_t k = k0 + j, slot = k / g.D, d = k % g.D;
        const int64_t run = std::min(g.D - d, cols - j);
        char* to = dst + (i * ld + j) * es;
        const char* from = src + x_offset(g, r, slot, d) * es;
        if (streaming) {
          copy_streaming(to, from, run * es);
        } else {
          std::memcpy(to, from, run * es);
        }
        j += run;
      }
    }
#if defined(__SSE2__)
    if (streaming) _mm_sfence();  // streaming stores are weakly ordered: drain them before the GEMM reads
#endif
  });
}

// x rows <- rows of the dA panel [rows, K] for output rows m0.. (each x row is written once).
void scatter_cpu(const Geometry& g, const Packed& p, at::Tensor& grad_x, const at::Tensor& panel, int64_t m0) {
  const int64_t rows = panel.size(0), es = grad_x.element_size();
  const char* src = static_cast<const char*>(panel.data_ptr());
  char* dst = static_cast<char*>(grad_x.data_ptr());
  const int64_t grain = std::max<int64_t>(1, kParallelBytes / std::max<int64_t>(1, g.K * es));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const RowSource r = row_source(g, p, m0 + i);
      for (int64_t slot = 0; slot < g.factor * g.factor; ++slot)
        std::memcpy(dst + x_offset(g, r, slot, 0) * es, src + (i * g.K + slot * g.D) * es, g.D * es);
    }
  });
}

// A [rows, cols] buffer carved from one per-thread allocation that is kept between calls: fresh
// multi-MiB allocations come back from the OS as unmapped pages, and faulting them in costs as much
// as the gather itself. Bounded by about kPanelBytes (see panel_rows).
at::Tensor scratch_cpu(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  thread_local at::Tensor buffer;
  const int64_t bytes = rows * cols * options.dtype().itemsize();
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, at::TensorOptions(at::kByte));
  return at::from_blob(buffer.data_ptr(), {rows, cols}, options);
}

void check_bias(const Geometry& g, const at::Tensor& x, const c10::optional<at::Tensor>& bias, const char* name) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out_features && bias->is_contiguous(), kOp, ": ", name,
              ": expected contiguous [", g.out_features, "], got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), kOp, ": ", name, ": expected dtype ", x.scalar_type());
  DF_CHECK_DEVICE(*bias, x, "pixel_shuffle_project: bias");
}

void forward_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 at::Tensor y, const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& grids,
                 const c10::optional<at::Tensor>& out_cu_seqlens, int64_t hp, int64_t wp, int64_t factor,
                 int64_t num_prefix_tokens) {
  const Geometry g =
      check_args(kOp, x, weight, y, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, num_prefix_tokens);
  check_bias(g, x, bias, "bias");
  const Packed p = packed_pointers(g, cu_seqlens, grids, out_cu_seqlens);
  if (g.packed) check_packed_values(kOp, g, p);
  forward_tiled(
      g, weight, bias, y, [&](at::Tensor& panel, int64_t m0, int64_t k0) { gather_cpu(g, p, x, panel, m0, k0); },
      [&](int64_t rows, int64_t cols) { return scratch_cpu(rows, cols, weight.options()); });
}

void backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& grad_x, const c10::optional<at::Tensor>& grad_weight,
                  const c10::optional<at::Tensor>& grad_bias, const c10::optional<at::Tensor>& cu_seqlens,
                  const c10::optional<at::Tensor>& grids, const c10::optional<at::Tensor>& out_cu_seqlens,
                  int64_t hp, int64_t wp, int64_t factor, int64_t num_prefix_tokens) {
  const char* op = "pixel_shuffle_project_backward";
  const Geometry g =
      check_args(op, x, weight, grad_y, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, num_prefix_tokens);
  const Packed p = packed_pointers(g, cu_seqlens, grids, out_cu_seqlens);
  if (g.packed) check_packed_values(op, g, p);
  if (grad_x.has_value()) {
    TORCH_CHECK(grad_x->sizes() == x.sizes() && grad_x->is_contiguous() &&
                    grad_x->scalar_type() == x.scalar_type() && grad_x->device() == x.device(),
                op, ": grad_x: expected a contiguous tensor like x ", x.sizes());
  }
  if (grad_weight.has_value()) {
    TORCH_CHECK(grad_weight->sizes() == weight.sizes() && grad_weight->is_contiguous() &&
                    grad_weight->scalar_type() == x.scalar_type() && grad_weight->device() == x.device(),
                op, ": grad_weight: expected a contiguous tensor like weight ", weight.sizes());
  }
  check_bias(g, x, grad_bias, "grad_bias");
  // scatter writes through grad_x's own strides: give it a Geometry with them
  Geometry gx = g;
  if (grad_x.has_value()) { gx.stride_b = grad_x->stride(0); gx.stride_t = grad_x->stride(1); }
  backward_tiled(
      g, grad_y, weight, grad_x, grad_weight, grad_bias, cu_seqlens,
      [&](at::Tensor& panel, int64_t m0, int64_t k0) { gather_cpu(g, p, x, panel, m0, k0); },
      [&](const at::Tensor& panel, int64_t m0) {
        at::Tensor dx = *grad_x;
        scatter_cpu(gx, p, dx, panel, m0);
      },
      [&](int64_t rows, int64_t cols) { return scratch_cpu(rows, cols, weight.options()); });
}

}  // namespace

TORCH_LIBRARY_IMPL(dinofast_C, CPU, m) {
  m.impl("pixel_shuffle_project", &forward_cpu);
  m.impl("pixel_shuffle_project_backward", &backward_cpu);
}

}  // namespace shuffle
}  // namespace dinofast
