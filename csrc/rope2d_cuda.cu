// 2D RoPE on CUDA: one block per token. Its D/2 angles go to shared memory once, then the
// block's threads rotate every (head, channel pair) of q and k. Index math: rope2d.h.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "rope2d.h"

namespace dinofast {
namespace rope {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void rope2d_cuda_kernel(const scalar_t* __restrict__ qi, const scalar_t* __restrict__ ki,
                                   scalar_t* qo, scalar_t* ko, const float* __restrict__ freqs,
                                   const int32_t* __restrict__ cu, const int32_t* __restrict__ grids,
                                   const float* __restrict__ transform, Geometry g,
                                   int64_t sqi_b, int64_t sqi_t, int64_t sqi_h, int64_t ski_b, int64_t ski_t,
                                   int64_t ski_h, int64_t sqo_b, int64_t sqo_t, int64_t sqo_h,
                                   int64_t sko_b, int64_t sko_t, int64_t sko_h) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t cs[kMaxHeadDim / 2], sn[kMaxHeadDim / 2];
  const int64_t bt = blockIdx.x;
  const int64_t b = bt / g.N, t = bt % g.N;
  const TokenPlace p = locate_token(g, cu, grids, transform, b, t);
  const int half = static_cast<int>(g.D / 2), quarter = static_cast<int>(g.D / 4);
  for (int d = threadIdx.x; d < half; d += blockDim.x) {
    if (p.pos < 0) {  // prefix token: identity rotation
      cs[d] = acc_t(1);
      sn[d] = acc_t(0);
    } else {
      float s, c;
      sincosf(channel_angle(d, quarter, p.y, p.x, freqs), &s, &c);
      cs[d] = c;
      sn[d] = g.inverse ? -s : s;
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < g.H * half; i += blockDim.x) {
    const int64_t h = i / half, d = i % half;
    const scalar_t* qrow = qi + b * sqi_b + t * sqi_t + h * sqi_h;
    const scalar_t* krow = ki + b * ski_b + t * ski_t + h * ski_h;
    scalar_t* qorow = qo + b * sqo_b + t * sqo_t + h * sqo_h;
    scalar_t* korow = ko + b * sko_b + t * sko_t + h * sko_h;
    // each thread reads both halves of its pair before writing them: safe when out aliases in
    const acc_t q1 = qrow[d], q2 = qrow[d + half], k1 = krow[d], k2 = krow[d + half];
    qorow[d] = static_cast<scalar_t>(q1 * cs[d] - q2 * sn[d]);
    qorow[d + half] = static_cast<scalar_t>(q2 * cs[d] + q1 * sn[d]);
    korow[d] = static_cast<scalar_t>(k1 * cs[d] - k2 * sn[d]);
    korow[d + half] = static_cast<scalar_t>(k2 * cs[d] + k1 * sn[d]);
  }
}

}  // namespace

void rope2d_cuda(const at::Tensor& q, const at::Tensor& k, at::Tensor q_out, at::Tensor k_out,
                 const at::Tensor& inv_freq, const c10::optional<at::Tensor>& cu_seqlens,
                 const c10::optional<at::Tensor>& grids, int64_t hp, int64_t wp,
                 const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens, bool inverse) {
  const Geometry g = check_args(q, k, q_out, k_out, inv_freq, cu_seqlens, grids, hp, wp, coord_transform,
                                num_prefix_tokens, inverse);
  if (g.B * g.N == 0 || g.H == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const int32_t* cu = g.packed ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  const int32_t* gr = g.packed ? grids->data_ptr<int32_t>() : nullptr;
  const float* tr = g.has_transform ? coord_transform->data_ptr<float>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope2d_cuda", [&] {
    rope2d_cuda_kernel<scalar_t><<<static_cast<unsigned>(g.B * g.N), kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), q_out.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(),
        inv_freq.data_ptr<float>(), cu, gr, tr, g, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
        k.stride(1), k.stride(2), q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0),
        k_out.stride(1), k_out.stride(2));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(dinofast_C, CUDA, m) { m.impl("rope2d", &rope2d_cuda); }

}  // namespace rope
}  // namespace dinofast
