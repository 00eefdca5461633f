// Varlen attention on CUDA: a plain tiled fallback (the triton backend is the fast path on GPUs).
//
// One thread per query row (forward, dQ) or key row (dK/dV), blocks of kRows rows of one
// (segment, head); the other side streams through shared memory in tiles of kTileElems / D rows,
// converted to fp32 and, with RoPE, rotated and rounded to the input dtype as they are staged
// (the same semantics as rope2d followed by attention). Online softmax in fp32, lse saved in fp32.
// Index math and argument checks: varlen_attention.h (shared with the CPU kernel).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "varlen_attention.h"

namespace dinofast {
namespace varlen {
namespace {

constexpr int kRows = 64;          // threads per block: one row each
constexpr int kTileElems = 4096;   // fp32 elements per staged tile (x2 tiles: 32 KiB of shared memory)
constexpr int kMaxTileRows = 64;

struct RopeArgs {
  const float* freqs;
  const int32_t* grids;
  const float* transform;
};

struct Seg {
  int64_t start, end, hp, wp;
  const float* t_row;
};

__device__ Seg load_segment(const int32_t* cu, const Problem& p, const RopeArgs& ra, int64_t s) {
  Seg g;
  segment_bounds(cu, s, p.T, g.start, g.end);
  g.hp = g.wp = 1;
  g.t_row = nullptr;
  if (p.has_rope) {
    g.hp = ra.grids[2 * s] > 0 ? ra.grids[2 * s] : 1;  // never divide by zero on bad input
    g.wp = ra.grids[2 * s + 1] > 0 ? ra.grids[2 * s + 1] : 1;
    g.t_row = p.has_transform ? ra.transform + s * p.transform_stride : nullptr;
  }
  return g;
}

// Pair (x1, x2) = channels (d, d + D/2) of the token at `row` rotated by +-angle; identity for
// prefix tokens or without RoPE.
__device__ void rotate_pair(float& x1, float& x2, int64_t row, int d, const Problem& p, const Seg& g,
                            const RopeArgs& ra, float sign) {
  const int64_t pos = row - g.start;
  if (!p.has_rope || pos < p.num_prefix_tokens) return;
  float s, c;
  sincosf(rope_angle(pos, p.num_prefix_tokens, g.hp, g.wp, g.t_row, d, static_cast<int>(p.D / 4), ra.freqs), &s, &c);
  s *= sign;
  const float a = x1 * c - x2 * s, b = x2 * c + x1 * s;
  x1 = a;
  x2 = b;
}

template <typename scalar_t>
__device__ float round_to(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

// Stage rows [r0, r0 + n) of head h of x into tile [n, D] (fp32), rotated + rounded when `rotate`.
template <typename scalar_t>
__device__ void stage_rows(const scalar_t* x, Strides st, int64_t h, int64_t r0, int n, float* tile,
                           bool rotate, const Problem& p, const Seg& g, const RopeArgs& ra) {
  const int half = static_cast<int>(p.D / 2);
  for (int i = threadIdx.x; i < n * half; i += blockDim.x) {
    const int r = i / half, d = i % half;
    const scalar_t* src = x + (r0 + r) * st.t + h * st.h;
    float x1 = static_cast<float>(src[d]), x2 = static_cast<float>(src[d + half]);
    if (rotate && p.has_rope) {
      rotate_pair(x1, x2, r0 + r, d, p, g, ra, 1.f);
      x1 = round_to<scalar_t>(x1);
      x2 = round_to<scalar_t>(x2);
    }
    tile[r * p.D + d] = x1;
    tile[r * p.D + d + half] = x2;
  }
}

// One row of head h into registers (fp32), rotated + rounded when `rotate`, times mult.
template <typename scalar_t, int DMAX>
__device__ void load_row(const scalar_t* x, Strides st, int64_t h, int64_t row, float (&out)[DMAX], bool rotate,
                         float mult, const Problem& p, const Seg& g, const RopeArgs& ra) {
  const int half = static_cast<int>(p.D / 2);
  const scalar_t* src = x + row * st.t + h * st.h;
#pragma unroll
  for (int d = 0; d < DMAX / 2; ++d) {
    if (d < half) {
      float x1 = static_cast<float>(src[d]), x2 = static_cast<float>(src[d + half]);
      if (rotate && p.has_rope) {
        rotate_pair(x1, x2, row, d, p, g, ra, 1.f);
        x1 = round_to<scalar_t>(x1);
        x2 = round_to<scalar_t>(x2);
      }
      out[d] = x1 * mult;
      out[d + DMAX / 2] = x2 * mult;
    }
  }
}

// Store an fp32 register row (halves at [0, D/2) and [DMAX/2, DMAX/2 + D/2)), times mult, rotated
// back by the adjoint when `unrotate`.
template <typename scalar_t, int DMAX>
__device__ void store_row(scalar_t* y, Strides st, int64_t h, int64_t row, const float (&in)[DMAX], float mult,
                          bool unrotate, const Problem& p, const Seg& g, const RopeArgs& ra) {
  const int half = static_cast<int>(p.D / 2);
  scalar_t* dst = y + row * st.t + h * st.h;
#pragma unroll
  for (int d = 0; d < DMAX / 2; ++d) {
    if (d < half) {
      float x1 = in[d] * mult, x2 = in[d + DMAX / 2] * mult;
      if (unrotate) rotate_pair(x1, x2, row, d, p, g, ra, -1.f);
      dst[d] = static_cast<scalar_t>(x1);
      dst[d + half] = static_cast<scalar_t>(x2);
    }
  }
}

// Dot of a register row (split halves) with a staged tile row.
template <int DMAX>
__device__ float dot_row(const float (&a)[DMAX], const float* b, int half) {
  float acc = 0.f;
#pragma unroll
  for (int d = 0; d < DMAX / 2; ++d)
    if (d < half) acc += a[d] * b[d] + a[d + DMAX / 2] * b[d + half];
  return acc;
}

template <int DMAX>
__device__ void axpy_row(float (&acc)[DMAX], float w, const float* b, int half) {
#pragma unroll
  for (int d = 0; d < DMAX / 2; ++d)
    if (d < half) {
      acc[d] += w * b[d];
      acc[d + DMAX / 2] += w * b[d + half];
    }
}

struct Ptrs {
  Strides q, k, v, o, g, dq, dk, dv;
};

template <typename scalar_t, int DMAX>
__global__ void fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                           const scalar_t* __restrict__ v, scalar_t* __restrict__ out, float* __restrict__ lse,
                           const int32_t* __restrict__ cu, RopeArgs ra, Problem p, Ptrs st, int tile_rows) {
  extern __shared__ float smem[];
  float* ks = smem;
  float* vs = smem + tile_rows * p.D;
  const int64_t s = blockIdx.x, h = blockIdx.z;
  const Seg g = load_segment(cu, p, ra, s);
  const int64_t row0 = g.start + static_cast<int64_t>(blockIdx.y) * kRows;
  if (row0 >= g.end) return;  // the whole block leaves together: no barrier is skipped
  const int64_t row = row0 + threadIdx.x;
  const bool active = row < g.end;
  const int half = static_cast<int>(p.D / 2);
  float qr[DMAX], acc[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) acc[d] = qr[d] = 0.f;
  if (active) load_row<scalar_t, DMAX>(q, st.q, h, row, qr, true, p.scale, p, g, ra);
  float m = -INFINITY, l = 0.f;
  float sc[kMaxTileRows];
  for (int64_t k0 = g.start; k0 < g.end; k0 += tile_rows) {
    const int n = static_cast<int>(g.end - k0 < tile_rows ? g.end - k0 : tile_rows);
    __syncthreads();
    stage_rows(k, st.k, h, k0, n, ks, true, p, g, ra);
    stage_rows(v, st.v, h, k0, n, vs, false, p, g, ra);
    __syncthreads();
    if (!active) continue;
    float tile_max = -INFINITY;
    for (int j = 0; j < n; ++j) {
      sc[j] = dot_row(qr, ks + j * p.D, half);
      tile_max = fmaxf(tile_max, sc[j]);
    }
    const float m_new = fmaxf(m, tile_max);
    const float alpha = __expf(m - m_new);  // 0 on the first tile (m = -inf)
    l *= alpha;
#pragma unroll
    for (int d = 0; d < DMAX; ++d) acc[d] *= alpha;
    for (int j = 0; j < n; ++j) {
      const float pj = __expf(sc[j] - m_new);
      l += pj;
      axpy_row(acc, pj, vs + j * p.D, half);
    }
    m = m_new;
  }
  if (active) {
    store_row<scalar_t, DMAX>(out, st.o, h, row, acc, 1.f / l, false, p, g, ra);
    lse[h * p.T + row] = m + logf(l);
  }
}

template <typename scalar_t>
__global__ void delta_kernel(const scalar_t* __restrict__ out, const scalar_t* __restrict__ dout,
                             float* __restrict__ delta, Problem p, Ptrs st) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.T * p.H) return;
  const int64_t t = i / p.H, h = i % p.H;
  const scalar_t* o = out + t * st.o.t + h * st.o.h;
  const scalar_t* g = dout + t * st.g.t + h * st.g.h;
  float acc = 0.f;
  for (int64_t d = 0; d < p.D; ++d) acc += static_cast<float>(o[d]) * static_cast<float>(g[d]);
  delta[h * p.T + t] = acc;
}

// dK, dV: one thread per key row; query rows (rotated Q, dO, lse, delta) stream through shared memory.
template <typename scalar_t, int DMAX>
__global__ void dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                            const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout,
                            const float* __restrict__ lse, const float* __restrict__ delta,
                            scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, const int32_t* __restrict__ cu,
                            RopeArgs ra, Problem p, Ptrs st, int tile_rows) {
  extern __shared__ float smem[];
  float* qs = smem;
  float* gs = smem + tile_rows * p.D;
  const int64_t s = blockIdx.x, h = blockIdx.z;
  const Seg g = load_segment(cu, p, ra, s);
  const int64_t row0 = g.start + static_cast<int64_t>(blockIdx.y) * kRows;
  if (row0 >= g.end) return;
  const int64_t row = row0 + threadIdx.x;
  const bool active = row < g.end;
  const int half = static_cast<int>(p.D / 2);
  float kr[DMAX], vr[DMAX], dkr[DMAX], dvr[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) kr[d] = vr[d] = dkr[d] = dvr[d] = 0.f;
  if (active) {
    load_row<scalar_t, DMAX>(k, st.k, h, row, kr, true, p.scale, p, g, ra);
    load_row<scalar_t, DMAX>(v, st.v, h, row, vr, false, 1.f, p, g, ra);
  }
  for (int64_t q0 = g.start; q0 < g.end; q0 += tile_rows) {
    const int n = static_cast<int>(g.end - q0 < tile_rows ? g.end - q0 : tile_rows);
    __syncthreads();
    stage_rows(q, st.q, h, q0, n, qs, true, p, g, ra);
    stage_rows(dout, st.g, h, q0, n, gs, false, p, g, ra);
    __syncthreads();
    if (!active) continue;
    for (int j = 0; j < n; ++j) {
      const float* qj = qs + j * p.D;
      const float* gj = gs + j * p.D;
      const float pj = __expf(dot_row(kr, qj, half) - lse[h * p.T + q0 + j]);
      axpy_row(dvr, pj, gj, half);
      const float ds = pj * (dot_row(vr, gj, half) - delta[h * p.T + q0 + j]);
      axpy_row(dkr, ds, qj, half);
    }
  }
  if (active) {
    store_row<scalar_t, DMAX>(dk, st.dk, h, row, dkr, p.scale, true, p, g, ra);
    store_row<scalar_t, DMAX>(dv, st.dv, h, row, dvr, 1.f, false, p, g, ra);
  }
}

// dQ: one thread per query row; key rows (rotated K, V) stream through shared memory.
template <typename scalar_t, int DMAX>
__global__ void dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                          const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta, scalar_t* __restrict__ dq,
                          const int32_t* __restrict__ cu, RopeArgs ra, Problem p, Ptrs st, int tile_rows) {
  extern __shared__ float smem[];
  float* ks = smem;
  float* vs = smem + tile_rows * p.D;
  const int64_t s = blockIdx.x, h = blockIdx.z;
  const Seg g = load_segment(cu, p, ra, s);
  const int64_t row0 = g.start + static_cast<int64_t>(blockIdx.y) * kRows;
  if (row0 >= g.end) return;
  const int64_t row = row0 + threadIdx.x;
  const bool active = row < g.end;
  const int half = static_cast<int>(p.D / 2);
  float qr[DMAX], gr[DMAX], dqr[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) qr[d] = gr[d] = dqr[d] = 0.f;
  float row_lse = 0.f, row_delta = 0.f;
  if (active) {
    load_row<scalar_t, DMAX>(q, st.q, h, row, qr, true, p.scale, p, g, ra);
    load_row<scalar_t, DMAX>(dout, st.g, h, row, gr, false, 1.f, p, g, ra);
    row_lse = lse[h * p.T + row];
    row_delta = delta[h * p.T + row];
  }
  for (int64_t k0 = g.start; k0 < g.end; k0 += tile_rows) {
    const int n = static_cast<int>(g.end - k0 < tile_rows ? g.end - k0 : tile_rows);
    __syncthreads();
    stage_rows(k, st.k, h, k0, n, ks, true, p, g, ra);
    stage_rows(v, st.v, h, k0, n, vs, false, p, g, ra);
    __syncthreads();
    if (!active) continue;
    for (int j = 0; j < n; ++j) {
      const float pj = __expf(dot_row(qr, ks + j * p.D, half) - row_lse);
      const float ds = pj * (dot_row(gr, vs + j * p.D, half) - row_delta);
      axpy_row(dqr, ds, ks + j * p.D, half);
    }
  }
  if (active) store_row<scalar_t, DMAX>(dq, st.dq, h, row, dqr, p.scale, true, p, g, ra);
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

RopeArgs rope_args(const Problem& p, const c10::optional<at::Tensor>& inv_freq, const c10::optional<at::Tensor>& grids,
                   const c10::optional<at::Tensor>& coord_transform) {
  RopeArgs ra{nullptr, nullptr, nullptr};
  if (p.has_rope) {
    ra.freqs = inv_freq->data_ptr<float>();
    ra.grids = grids->data_ptr<int32_t>();
    ra.transform = p.has_transform ? coord_transform->data_ptr<float>() : nullptr;
  }
  return ra;
}

// Calls f(scalar_t tag, DMAX constant) for q's dtype and the smallest register row that holds D.
template <typename F>
void dispatch(at::ScalarType dtype, int64_t D, F f) {
  auto by_dim = [&](auto tag) {
    if (D <= 64) f(tag, std::integral_constant<int, 64>());
    else if (D <= 128) f(tag, std::integral_constant<int, 128>());
    else f(tag, std::integral_constant<int, 256>());
  };
  switch (dtype) {
    case at::kFloat: by_dim(float()); break;
    case at::kHalf: by_dim(at::Half()); break;
    case at::kBFloat16: by_dim(at::BFloat16()); break;
    default: TORCH_CHECK(false, "varlen_attention (cuda): expected float32/float16/bfloat16, got ", dtype);
  }
}

struct Launch {
  dim3 grid;
  int tile_rows;
  size_t smem;
};

Launch launch_for(const Problem& p) {
  Launch l;
  const int64_t row_blocks = std::max<int64_t>(1, (p.max_seqlen + kRows - 1) / kRows);
  TORCH_CHECK(row_blocks <= 65535 && p.H <= 65535, "varlen_attention (cuda): max_seqlen / heads too large");
  l.grid = dim3(static_cast<unsigned>(p.n_segments), static_cast<unsigned>(row_blocks), static_cast<unsigned>(p.H));
  l.tile_rows = static_cast<int>(std::min<int64_t>(kMaxTileRows, kTileElems / p.D));
  l.smem = 2 * static_cast<size_t>(l.tile_rows) * p.D * sizeof(float);
  return l;
}

void varlen_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out,
                               at::Tensor lse, const at::Tensor& cu_seqlens, int64_t max_seqlen, double softmax_scale,
                               const c10::optional<at::Tensor>& inv_freq, const c10::optional<at::Tensor>& grids,
                               const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens) {
  const Problem p = check_args(q, {{&k, "k"}, {&v, "v"}, {&out, "out"}}, lse, cu_seqlens, max_seqlen, softmax_scale,
                               inv_freq, grids, coord_transform, num_prefix_tokens);
  if (p.T == 0 || p.H == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const RopeArgs ra = rope_args(p, inv_freq, grids, coord_transform);
  Ptrs st{strides_of(q), strides_of(k), strides_of(v), strides_of(out), {}, {}, {}, {}};
  const Launch l = launch_for(p);
  dispatch(q.scalar_type(), p.D, [&](auto tag, auto dmax) {
    using scalar_t = decltype(tag);
    fwd_kernel<scalar_t, decltype(dmax)::value><<<l.grid, kRows, l.smem, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), cu_seqlens.data_ptr<int32_t>(), ra, p, st, l.tile_rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void varlen_attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, const at::Tensor& lse, at::Tensor dq, at::Tensor dk, at::Tensor dv,
                               const at::Tensor& cu_seqlens, int64_t max_seqlen, double softmax_scale,
                               const c10::optional<at::Tensor>& inv_freq, const c10::optional<at::Tensor>& grids,
                               const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens) {
  const Problem p = check_args(q, {{&k, "k"}, {&v, "v"}, {&out, "out"}, {&dout, "grad_out"}, {&dq, "dq"},
                                   {&dk, "dk"}, {&dv, "dv"}},
                               lse, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids, coord_transform,
                               num_prefix_tokens);
  if (p.T == 0 || p.H == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const RopeArgs ra = rope_args(p, inv_freq, grids, coord_transform);
  Ptrs st{strides_of(q), strides_of(k), strides_of(v), strides_of(out), strides_of(dout),
          strides_of(dq), strides_of(dk), strides_of(dv)};
  at::Tensor delta = at::empty({p.H, p.T}, lse.options());
  const Launch l = launch_for(p);
  dispatch(q.scalar_type(), p.D, [&](auto tag, auto dmax) {
    using scalar_t = decltype(tag);
    constexpr int DMAX = decltype(dmax)::value;
    const int64_t n = p.T * p.H;
    delta_kernel<scalar_t><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
        out.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(), delta.data_ptr<float>(), p, st);
    dkdv_kernel<scalar_t, DMAX><<<l.grid, kRows, l.smem, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), delta.data_ptr<float>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
        cu_seqlens.data_ptr<int32_t>(), ra, p, st, l.tile_rows);
    dq_kernel<scalar_t, DMAX><<<l.grid, kRows, l.smem, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<scalar_t>(), cu_seqlens.data_ptr<int32_t>(), ra,
        p, st, l.tile_rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(dinofast_C, CUDA, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cuda);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cuda);
}

}  // namespace varlen
}  // namespace dinofast
