// Shared by every C++ and CUDA source: host/device qualifiers and input checks.
#pragma once
// ATen and the op registry only: torch/extension.h (pybind11, torch/all.h) is left to registration.cpp,
// which needs it, to keep every other translation unit quick to compile.
#include <ATen/ATen.h>
#include <torch/library.h>

#if defined(__CUDACC__)
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline
#endif

#define DF_CHECK_FLOAT(t, name)                                                                    \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||                 \
                  (t).scalar_type() == at::kBFloat16 || (t).scalar_type() == at::kDouble,          \
              name ": expected float32/float16/bfloat16/float64, got ", (t).scalar_type())
#define DF_CHECK_DEVICE(t, ref, name)                                                              \
  TORCH_CHECK((t).device() == (ref).device(), name ": expected device ", (ref).device(), ", got ", \
              (t).device())
#define DF_CHECK_INT32(t, name)                                                                    \
  TORCH_CHECK((t).scalar_type() == at::kInt, name ": expected int32, got ", (t).scalar_type())

namespace dinofast {

// a * b, or a TORCH_CHECK failure naming `what` when the product leaves int64 (sizes that come in
// as op arguments must not wrap around and pass a later size check).
inline int64_t checked_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t out = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &out), op, ": ", what, ": ", a, " * ", b, " overflows int64");
  return out;
}

inline int64_t checked_add(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t out = 0;
  TORCH_CHECK(!__builtin_add_overflow(a, b, &out), op, ": ", what, ": ", a, " + ", b, " overflows int64");
  return out;
}

// num_prefix_tokens + hp * wp tokens of one image, overflow-checked.
inline int64_t image_tokens(int64_t num_prefix_tokens, int64_t hp, int64_t wp, const char* op) {
  return checked_add(num_prefix_tokens, checked_mul(hp, wp, op, "Hp*Wp"), op, "num_prefix_tokens + Hp*Wp");
}

}  // namespace dinofast
