// Device half of the CUDA varlen attention (the host half is varlen_attention_cuda.cpp): moving the
// log-sum-exp between the op's packed layout lse [H, T] and the per-segment padded layout
// [n, H, L] that ATen's memory-efficient attention reads and writes. One thread per (head, token);
// the token's segment comes from a binary search of cu_seqlens (rope2d.h's segment_of).
// Kept apart from the host code so nvcc compiles one small kernel, not the op's host logic.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "varlen_attention.h"

namespace dinofast {
namespace varlen {
namespace {

constexpr int kThreads = 256;

struct PaddedLayout {
  int64_t stride_s, stride_h, width;  // width: rows each segment has room for
};

// to_padded: padded[s, h, i] = lse[h, t]; else lse[h, t] = padded[s, h, i]; t = cu[s] + i.
template <bool to_padded>
__global__ void lse_layout_kernel(float* __restrict__ lse, float* __restrict__ padded,
                                  const int32_t* __restrict__ cu, int64_t n_segments, int64_t H, int64_t T,
                                  PaddedLayout pl) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= H * T) return;
  const int64_t h = i / T, t = i % T;
  if (t < cu[0] || t >= cu[n_segments]) return;  // a token outside every segment has no lse
  const int64_t s = rope::segment_of(cu, n_segments, t);
  const int64_t row = t - cu[s];
  if (row >= pl.width) return;
  float* slot = padded + s * pl.stride_s + h * pl.stride_h + row;
  if (to_padded)
    *slot = lse[i];
  else
    lse[i] = *slot;
}

template <bool to_padded>
void convert(at::Tensor lse, at::Tensor padded, const at::Tensor& cu_seqlens) {
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.is_contiguous(),
              "varlen_attention (cuda): lse: expected contiguous float32 [H, T]");
  TORCH_CHECK(padded.scalar_type() == at::kFloat && padded.dim() == 3 && padded.stride(2) == 1,
              "varlen_attention (cuda): padded lse: expected float32 [n, H, L] with unit stride on L");
  const int64_t n = cu_seqlens.numel() - 1, H = lse.size(0), T = lse.size(1);
  TORCH_CHECK(padded.size(0) == n && padded.size(1) == H, "varlen_attention (cuda): padded lse: expected [", n,
              ", ", H, ", L], got ", padded.sizes());
  if (H == 0 || T == 0 || n == 0) return;
  const c10::cuda::CUDAGuard guard(lse.device());
  const int64_t blocks = (H * T + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= 2147483647LL, "varlen_attention (cuda): H * T too large: ", H, " * ", T);
  lse_layout_kernel<to_padded><<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      lse.data_ptr<float>(), padded.data_ptr<float>(), cu_seqlens.data_ptr<int32_t>(), n, H, T,
      PaddedLayout{padded.stride(0), padded.stride(1), padded.size(2)});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void lse_padded_to_packed(const at::Tensor& padded, const at::Tensor& cu_seqlens, at::Tensor& lse) {
  convert<false>(lse, padded, cu_seqlens);
}

void lse_packed_to_padded(const at::Tensor& lse, const at::Tensor& cu_seqlens, at::Tensor& padded) {
  convert<true>(lse, padded, cu_seqlens);
}

}  // namespace varlen
}  // namespace dinofast
