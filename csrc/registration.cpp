// The one place that declares dinofast's C++/CUDA op schemas; each op's .cpp/.cu registers its
// CPU/CUDA kernels with TORCH_LIBRARY_IMPL. Python reaches them as torch.ops.dinofast_C.*.
#include <torch/extension.h>

#include "varlen_attention.h"

TORCH_LIBRARY(dinofast_C, m) {
  // Writes rotated q, k (4-D [B, N, H, D] views, unit stride on D) into q_out, k_out, which may
  // alias them. Packed when cu_seqlens is given (B == 1, grids int32 [n, 2]); else grid (hp, wp).
  m.def(
      "rope2d(Tensor q, Tensor k, Tensor(a!) q_out, Tensor(b!) k_out, Tensor inv_freq, "
      "Tensor? cu_seqlens, Tensor? grids, int hp, int wp, Tensor? coord_transform, "
      "int num_prefix_tokens, bool inverse) -> ()");
  // Varlen attention over a packed [T, H, D] sequence (unit stride on D): writes out and the fp32
  // log-sum-exp lse [H, T]; RoPE fused when inv_freq/grids are given (see csrc/varlen_attention.h).
  m.def(
      "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, Tensor cu_seqlens, "
      "int max_seqlen, float softmax_scale, Tensor? inv_freq, Tensor? grids, Tensor? coord_transform, "
      "int num_prefix_tokens) -> ()");
  m.def(
      "varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor cu_seqlens, int max_seqlen, float softmax_scale, "
      "Tensor? inv_freq, Tensor? grids, Tensor? coord_transform, int num_prefix_tokens) -> ()");
  // Pixel shuffle + projection: y [M, out] = shuffled(x) @ weight^T (+ bias). x is a 3-D [B, N, D]
  // view (packed: [1, T, D] with cu_seqlens, grids int32 [n, 2] and out_cu_seqlens [n+1]).
  m.def(
      "pixel_shuffle_project(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) y, Tensor? cu_seqlens, "
      "Tensor? grids, Tensor? out_cu_seqlens, int hp, int wp, int factor, int num_prefix_tokens) -> ()");
  // Its backward: each of grad_x [B, N, D], grad_weight, grad_bias that is given is written.
  m.def(
      "pixel_shuffle_project_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor(a!)? grad_x, "
      "Tensor(b!)? grad_weight, Tensor(c!)? grad_bias, Tensor? cu_seqlens, Tensor? grids, "
      "Tensor? out_cu_seqlens, int hp, int wp, int factor, int num_prefix_tokens) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("abi_version", [] { return DINOFAST_ABI_VERSION; }, "Op-schema version this _C was built with.");
  m.def("torch_version", [] { return std::string(DINOFAST_TORCH_VERSION); }, "torch it was built against.");
  m.def("cpu_bf16_attention_on_amx", &dinofast::varlen::cpu_bf16_forward_on_amx, pybind11::arg("head_dim"),
        "Whether the cpp varlen attention's bf16 forward runs on AMX tiles here.");
  m.def("cpu_fp32_attention_own_kernels", &dinofast::varlen::cpu_fp32_on_own_kernels, pybind11::arg("head_dim"),
        "Whether the cpp varlen attention's fp32 gemms run on its own AVX-512 kernels here.");
  m.def("with_cuda", [] {
#ifdef DINOFAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in.");
}
