// Varlen attention on CUDA: dinofast's RoPE and ATen's fused attention kernels (tensor cores).
//
//   1. RoPE (when inv_freq is given): the CUDA rope2d kernel writes rotated copies of q and k,
//      rounded to the input dtype: exactly rope2d followed by attention.
//   2. Attention over the packed segments, by dtype and GPU:
//      - fp16/bf16 on sm_80+: at::_flash_attention_forward/_backward (FlashAttention-2 as built
//        into PyTorch) with cu_seqlens. Its varlen log-sum-exp is float32 [H, T], the op's layout.
//      - otherwise (fp32, or an older GPU): at::_efficient_attention_forward/_backward (PyTorch's
//        CUTLASS memory-efficient attention; fp32 runs on tensor cores with 3xTF32 on sm_80+, about
//        fp32 accuracy at a fraction of the fp16 speed). Its log-sum-exp is padded per segment
//        [n, H, L]; varlen_attention_lse_cuda.cu converts it.
//   3. Backward: ATen's kernels give dQ, dK of the rotated q, k; the inverse rotation (rope2d with
//      inverse=true, the rotation's adjoint) turns them into the gradients of the op's q, k.
//
// Costs beyond the attention kernels: with RoPE one read+write of q and k per pass (forward, and
// again in the backward, which re-rotates instead of saving the copies), plus a copy of the
// outputs into the op's buffers. No host synchronisation: ATen's kernels take max_seqlen as a
// host integer, which the op already has. cu_seqlens is clamped on the device to a
// non-decreasing sequence within [0, T], so a bad direct call cannot make a kernel read outside
// q/k/v; the Python op has already checked it exactly, and that max_seqlen bounds every segment
// (ATen's kernels size their grids, and the memory-efficient kernel its lse rows, from it; a
// device-side check would need a host sync).
// Argument checks: varlen_attention.h (shared with the CPU kernel).
#ifdef DINOFAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <tuple>

#include "rope2d.h"
#include "varlen_attention.h"

namespace dinofast {
namespace varlen {
namespace {

// ATen's memory-efficient attention pads each segment's lse to a multiple of this many rows.
constexpr int64_t kEfficientLseAlign = 32;

struct Prepared {
  at::Tensor q, k;        // rotated copies when RoPE is on, else the inputs
  at::Tensor cu_seqlens;  // clamped: non-decreasing, within [0, T]
  int64_t max_seqlen;     // min(max_seqlen, T) >= 1
  bool flash;             // fp16/bf16 on sm_80+: FlashAttention-2; else memory-efficient attention
};

bool use_flash(const at::Tensor& q) {
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  return at::cuda::getDeviceProperties(q.device().index())->major >= 8;
}

// Rotates q, k into fresh buffers (inverse=false) with the CUDA rope2d kernel, as 4-D [1, T, H, D].
void rotate(const at::Tensor& q, const at::Tensor& k, at::Tensor q_out, at::Tensor k_out, const at::Tensor& cu,
            const c10::optional<at::Tensor>& inv_freq, const c10::optional<at::Tensor>& grids,
            const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens, bool inverse) {
  rope::rope2d_cuda(q.unsqueeze(0), k.unsqueeze(0), q_out.unsqueeze(0), k_out.unsqueeze(0), *inv_freq, cu, grids,
                    /*hp=*/0, /*wp=*/0, coord_transform, num_prefix_tokens, inverse);
}

Prepared prepare(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                 const c10::optional<at::Tensor>& inv_freq, const c10::optional<at::Tensor>& grids,
                 const c10::optional<at::Tensor>& coord_transform) {
  // ATen's kernels index tokens with 32-bit integers, as cu_seqlens does.
  TORCH_CHECK(p.T <= std::numeric_limits<int32_t>::max(),
              "varlen_attention (cuda): T: expected at most 2**31 - 1 tokens, got ", p.T);
  TORCH_CHECK(p.max_seqlen >= 1, "varlen_attention (cuda): max_seqlen: expected >= 1 for T > 0, got ",
              p.max_seqlen);
  Prepared r;
  r.cu_seqlens = std::get<0>(at::cummax(cu_seqlens.clamp(0, p.T), 0)).contiguous();
  r.max_seqlen = std::min(p.max_seqlen, p.T);
  r.flash = use_flash(q);
  r.q = q;
  r.k = k;
  if (p.has_rope) {
    r.q = at::empty_like(q, at::MemoryFormat::Contiguous);
    r.k = at::empty_like(k, at::MemoryFormat::Contiguous);
    rotate(q, k, r.q, r.k, r.cu_seqlens, inv_freq, grids, coord_transform, p.num_prefix_tokens, false);
  }
  return r;
}

void varlen_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out,
                               at::Tensor lse, const at::Tensor& cu_seqlens, int64_t max_seqlen, double softmax_scale,
                               const c10::optional<at::Tensor>& inv_freq, const c10::optional<at::Tensor>& grids,
                               const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens) {
  const Problem p = check_fwd_args(q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids,
                                   coord_transform, num_prefix_tokens);
  if (p.T == 0 || p.H == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared r = prepare(p, q, k, cu_seqlens, inv_freq, grids, coord_transform);
  if (r.flash) {
    const auto res = at::_flash_attention_forward(r.q, r.k, v, r.cu_seqlens, r.cu_seqlens, r.max_seqlen,
                                                  r.max_seqlen, /*dropout_p=*/0.0, /*is_causal=*/false,
                                                  /*return_debug_mask=*/false, softmax_scale);
    const at::Tensor& flash_lse = std::get<1>(res);
    TORCH_CHECK(flash_lse.sizes() == lse.sizes(), "varlen_attention (cuda): this torch's flash attention returned "
                "a log-sum-exp of shape ", flash_lse.sizes(), ", expected the varlen layout ", lse.sizes());
    out.copy_(std::get<0>(res));
    lse.copy_(flash_lse);
  } else {
    const auto res = at::_efficient_attention_forward(
        r.q.unsqueeze(0), r.k.unsqueeze(0), v.unsqueeze(0), /*bias=*/c10::nullopt, r.cu_seqlens, r.cu_seqlens,
        r.max_seqlen, r.max_seqlen, /*dropout_p=*/0.0, /*custom_mask_type=*/0, /*compute_log_sumexp=*/true,
        softmax_scale);
    out.copy_(std::get<0>(res).squeeze(0));
    lse_padded_to_packed(std::get<1>(res), r.cu_seqlens, lse);
  }
}

void varlen_attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse, at::Tensor dq, at::Tensor dk, at::Tensor dv,
                               const at::Tensor& cu_seqlens, int64_t max_seqlen, double softmax_scale,
                               const c10::optional<at::Tensor>& inv_freq, const c10::optional<at::Tensor>& grids,
                               const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens) {
  const Problem p = check_bwd_args(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, softmax_scale,
                                   inv_freq, grids, coord_transform, num_prefix_tokens);
  if (p.T == 0 || p.H == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared r = prepare(p, q, k, cu_seqlens, inv_freq, grids, coord_transform);
  at::Tensor dq_rot, dk_rot, dv_new;
  if (r.flash) {
    // Dropout is off: ATen's kernels never read the RNG state, but the schema wants the tensors.
    const auto rng_opts = q.options().dtype(at::kLong);
    std::tie(dq_rot, dk_rot, dv_new) = at::_flash_attention_backward(
        dout, r.q, r.k, v, out, lse, r.cu_seqlens, r.cu_seqlens, r.max_seqlen, r.max_seqlen, /*dropout_p=*/0.0,
        /*is_causal=*/false, at::zeros({2}, rng_opts), at::zeros({}, rng_opts), softmax_scale);
  } else {
    const int64_t width = (r.max_seqlen + kEfficientLseAlign - 1) / kEfficientLseAlign * kEfficientLseAlign;
    at::Tensor padded = at::zeros({p.n_segments, p.H, width}, lse.options());
    lse_packed_to_padded(lse, r.cu_seqlens, padded);
    const auto seed_opts = q.options().dtype(at::kLong);
    const auto res = at::_efficient_attention_backward(
        dout.unsqueeze(0), r.q.unsqueeze(0), r.k.unsqueeze(0), v.unsqueeze(0), /*bias=*/c10::nullopt,
        out.unsqueeze(0), r.cu_seqlens, r.cu_seqlens, r.max_seqlen, r.max_seqlen, padded, /*dropout_p=*/0.0,
        at::zeros({}, seed_opts), at::zeros({}, seed_opts), /*custom_mask_type=*/0, /*bias_requires_grad=*/false,
        softmax_scale);
    dq_rot = std::get<0>(res).squeeze(0);
    dk_rot = std::get<1>(res).squeeze(0);
    dv_new = std::get<2>(res).squeeze(0);
  }
  dv.copy_(dv_new);
  if (p.has_rope) {
    // The rotation is orthogonal per channel pair: the gradient w.r.t. q is R^T dQ_rot.
    rotate(dq_rot, dk_rot, dq, dk, r.cu_seqlens, inv_freq, grids, coord_transform, p.num_prefix_tokens, true);
  } else {
    dq.copy_(dq_rot);
    dk.copy_(dk_rot);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dinofast_C, CUDA, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cuda);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cuda);
}

}  // namespace varlen
}  // namespace dinofast
#endif  // DINOFAST_WITH_CUDA
