// Pixel shuffle + projection on CUDA, the fallback to the Triton kernels: a gather kernel copies one
// panel of the shuffled matrix into scratch and cuBLAS (through ATen) multiplies it; the backward
// scatters dA panels back to x rows. Tiling and index map: pixel_shuffle_project.h.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "pixel_shuffle_project.h"

namespace dinofast {
namespace shuffle {
namespace {

constexpr int kThreads = 256;

// One block per panel row: panel[i, j] = A[m0 + i, k0 + j].
template <typename scalar_t>
__global__ void gather_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ panel, Geometry g, Packed p,
                              int64_t m0, int64_t k0, int64_t cols, int64_t ld) {
  const int64_t i = blockIdx.x;
  const RowSource r = row_source(g, p, m0 + i);
  scalar_t* dst = panel + i * ld;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const int64_t k = k0 + j;
    dst[j] = x[x_offset(g, r, k / g.D, k % g.D)];
  }
}

// One block per panel row: the row's s*s slots of dA go to the x rows they came from.
template <typename scalar_t>
__global__ void scatter_kernel(const scalar_t* __restrict__ panel, scalar_t* __restrict__ grad_x, Geometry g,
                               Packed p, int64_t m0) {
  const int64_t i = blockIdx.x;
  const RowSource r = row_source(g, p, m0 + i);
  const scalar_t* src = panel + i * g.K;
  for (int64_t k = threadIdx.x; k < g.K; k += blockDim.x) grad_x[x_offset(g, r, k / g.D, k % g.D)] = src[k];
}

void gather_cuda(const Geometry& g, const Packed& p, const at::Tensor& x, at::Tensor& panel, int64_t m0, int64_t k0) {
  if (panel.numel() == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_gather", [&] {
    gather_kernel<scalar_t><<<static_cast<unsigned>(panel.size(0)), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), panel.data_ptr<scalar_t>(), g, p, m0, k0, panel.size(1), panel.stride(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scatter_cuda(const Geometry& g, const Packed& p, at::Tensor& grad_x, const at::Tensor& panel, int64_t m0) {
  if (panel.numel() == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "pixel_shuffle_scatter", [&] {
    scatter_kernel<scalar_t><<<static_cast<unsigned>(panel.size(0)), kThreads, 0, stream>>>(
        panel.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), g, p, m0);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void forward_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  at::Tensor y, const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& grids,
                  const c10::optional<at::Tensor>& out_cu_seqlens, int64_t hp, int64_t wp, int64_t factor,
                  int64_t num_prefix_tokens) {
  const char* op = "pixel_shuffle_project";
  const Geometry g =
      check_args(op, x, weight, y, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, num_prefix_tokens);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out_features && bias->scalar_type() == x.scalar_type(),
                op, ": bias: expected [", g.out_features, "] of dtype ", x.scalar_type());
    DF_CHECK_DEVICE(*bias, x, "pixel_shuffle_project: bias");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const Packed p = packed_pointers(g, cu_seqlens, grids, out_cu_seqlens);
  forward_tiled(
      g, weight, bias, y, [&](at::Tensor& panel, int64_t m0, int64_t k0) { gather_cuda(g, p, x, panel, m0, k0); },
      [&](int64_t rows, int64_t cols) { return at::empty({rows, cols}, weight.options()); });
}

void backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& grad_x, const c10::optional<at::Tensor>& grad_weight,
                   const c10::optional<at::Tensor>& grad_bias, const c10::optional<at::Tensor>& cu_seqlens,
                   const c10::optional<at::Tensor>& grids, const c10::optional<at::Tensor>& out_cu_seqlens,
                   int64_t hp, int64_t wp, int64_t factor, int64_t num_prefix_tokens) {
  const char* op = "pixel_shuffle_project_backward";
  const Geometry g =
      check_args(op, x, weight, grad_y, cu_seqlens, grids, out_cu_seqlens, hp, wp, factor, num_prefix_tokens);
  for (const auto* t : {&grad_x, &grad_weight, &grad_bias}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->is_contiguous() && (*t)->scalar_type() == x.scalar_type(), op,
                  ": grads: expected contiguous tensors of dtype ", x.scalar_type());
      DF_CHECK_DEVICE(**t, x, "pixel_shuffle_project_backward: grads");
    }
  }
  TORCH_CHECK(!grad_x.has_value() || grad_x->sizes() == x.sizes(), op, ": grad_x: expected shape ", x.sizes());
  TORCH_CHECK(!grad_weight.has_value() || grad_weight->sizes() == weight.sizes(), op,
              ": grad_weight: expected shape ", weight.sizes());
  TORCH_CHECK(!grad_bias.has_value() || grad_bias->numel() == g.out_features, op, ": grad_bias: expected [",
              g.out_features, "]");
  const c10::cuda::CUDAGuard guard(x.device());
  const Packed p = packed_pointers(g, cu_seqlens, grids, out_cu_seqlens);
  Geometry gx = g;  // scatter writes through grad_x's own (contiguous) strides
  if (grad_x.has_value()) { gx.stride_b = grad_x->stride(0); gx.stride_t = grad_x->stride(1); }
  backward_tiled(
      g, grad_y, weight, grad_x, grad_weight, grad_bias, cu_seqlens,
      [&](at::Tensor& panel, int64_t m0, int64_t k0) { gather_cuda(g, p, x, panel, m0, k0); },
      [&](const at::Tensor& panel, int64_t m0) {
        at::Tensor dx = *grad_x;
        scatter_cuda(gx, p, dx, panel, m0);
      },
      [&](int64_t rows, int64_t cols) { return at::empty({rows, cols}, weight.options()); });
}

}  // namespace

TORCH_LIBRARY_IMPL(dinofast_C, CUDA, m) {
  m.impl("pixel_shuffle_project", &forward_cuda);
  m.impl("pixel_shuffle_project_backward", &backward_cuda);
}

}  // namespace shuffle
}  // namespace dinofast
