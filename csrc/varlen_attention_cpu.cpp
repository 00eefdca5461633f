// Varlen attention on CPU: tiled online softmax (flash-attention style) in fp32.
//
// Forward: one task per (segment, head, up to 16 blocks of kBlockQ queries). A task packs its query
// tiles (rotated by RoPE) into fp32, then walks the segment's keys kBlockK at a time:
// S = Q K^T and O += P V are BLAS gemms on cache-resident tiles (at::mm_out on blob views: MKL on x86),
// the row max / exp / sum between them is a vectorised loop. K/V tiles are rotated and converted
// to fp32 as they are packed; fp32 K/V without RoPE are read in place.
// Backward: one task per (segment, head): Q, K (rotated), V, dO packed once into fp32, then the
// FlashAttention-2 recurrences per (key tile, query tile); dQ accumulates in a task-local buffer, so
// no atomics and a deterministic result. dQ and dK are rotated back (the adjoint) as they are stored.
// Tasks are sorted by cost and handed out dynamically to the OpenMP threads (segments differ a lot).
#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "varlen_attention.h"

namespace dinofast {
namespace varlen {
namespace {

constexpr int64_t kBlockQ = 256;   // forward query tile
constexpr int64_t kBlockK = 512;   // forward key tile
constexpr int64_t kMaxBlocksPerTask = 16;
constexpr int64_t kBlockBwd = 256; // backward query and key tiles

// ------------------------------------------------------------------------------------------------
// gemm on row-major fp32 tiles through ATen (MKL/oneDNN pick the ISA at run time).
// C[m, n] = alpha * op(A) op(B) + beta * C; op(X) = X or X^T, given by its [rows, cols] strides.
// ------------------------------------------------------------------------------------------------
at::Tensor blob(const float* p, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  if (transposed) return at::from_blob(const_cast<float*>(p), {rows, cols}, {1, ld}, opts);
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, opts);
}

// A is [m, k] (or stored [k, m] when ta), B is [k, n] (or stored [n, k] when tb).
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  at::Tensor a = blob(A, m, k, lda, ta), b = blob(B, k, n, ldb, tb), c = blob(C, m, n, ldc, false);
  if (beta == 0.f) {
    at::mm_out(c, a, b);
    if (alpha != 1.f) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

// ------------------------------------------------------------------------------------------------
// Vectorisable exp (Cephes polynomial, about 1 ulp) and the per-row softmax steps. Compiled for
// AVX-512 and AVX2 besides the baseline; the loader picks the best clone for the machine.
// ------------------------------------------------------------------------------------------------
// The clones are chosen by CPU features at load time. no-trapping-math lets GCC if-convert the
// clamps below into vector selects on SSE/AVX2 (AVX-512 has masks and would not need it).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DF_FAST_MATH __attribute__((optimize("no-trapping-math")))
#define DF_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default"))) DF_FAST_MATH
#else
#define DF_FAST_MATH
#define DF_MULTIVERSION
#endif

// NaN passes through both clamps (each comparison is false for NaN) and comes out NaN: a NaN score
// (NaN query or key, or inf - inf after an +Inf score) makes the row NaN, as in the reference.
DF_FAST_MATH inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38: below it the result is 0 for softmax purposes
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r * r + r + 1.0f;
  // n is NaN only for a NaN input: any exponent then gives y * two_n = NaN.
  const int32_t bits = ((n == n ? static_cast<int32_t>(n) : 0) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return y * two_n;
}

DF_MULTIVERSION float row_max(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s[j] = exp(s[j] - shift); returns the sum.
DF_MULTIVERSION float exp_shift_sum(float* s, int64_t n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = fast_exp(s[j] - shift);
    s[j] = e;
    sum += e;
  }
  return sum;
}

// dS = P * (dP - delta), into dp.
DF_MULTIVERSION void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

DF_MULTIVERSION void scale_row(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// ------------------------------------------------------------------------------------------------
// RoPE on CPU: angles are separable (the first D/4 channels depend on the patch row only, the next
// D/4 on the column only), so one table per grid axis covers a whole segment: hp + wp rows of
// sin/cos instead of one per token.
// ------------------------------------------------------------------------------------------------
struct RopeTables {
  int64_t segment = -1, hp = 0, wp = 0, quarter = 0;
  std::vector<float> cy, sy, cx, sx;  // [hp, quarter], [wp, quarter]

  void build(int64_t seg, int64_t h, int64_t w, int64_t P, const float* t, const float* freqs, int64_t D) {
    if (seg == segment) return;
    segment = seg; hp = h; wp = w; quarter = D / 4;
    cy.resize(hp * quarter); sy.resize(hp * quarter); cx.resize(wp * quarter); sx.resize(wp * quarter);
    const int q = static_cast<int>(quarter);
    for (int64_t i = 0; i < hp; ++i)
      for (int d = 0; d < q; ++d) {
        const float a = rope_angle(P + i * wp, P, hp, wp, t, d, q, freqs);
        cy[i * quarter + d] = std::cos(a);
        sy[i * quarter + d] = std::sin(a);
      }
    for (int64_t j = 0; j < wp; ++j)
      for (int d = 0; d < q; ++d) {
        const float a = rope_angle(P + j, P, hp, wp, t, q + d, q, freqs);
        cx[j * quarter + d] = std::cos(a);
        sx[j * quarter + d] = std::sin(a);
      }
  }

  // Rotate the fp32 row x [D] of the patch with index pos (>= 0) in place; sign -1: the adjoint.
  // Channels [0, D/4) (and their partners at + D/2) take the row's angles, [D/4, D/2) the column's.
  void rotate(float* x, int64_t pos, float sign) const {
    const int64_t i = pos / wp, j = pos % wp, half = 2 * quarter;
    rotate_part(x, half, &cy[i * quarter], &sy[i * quarter], sign);
    rotate_part(x + quarter, half, &cx[j * quarter], &sx[j * quarter], sign);
  }

 private:
  void rotate_part(float* x, int64_t half, const float* c, const float* s, float sign) const {
    for (int64_t d = 0; d < quarter; ++d) {
      const float x1 = x[d], x2 = x[d + half], sn = sign * s[d];
      x[d] = x1 * c[d] - x2 * sn;
      x[d + half] = x2 * c[d] + x1 * sn;
    }
  }
};

struct RopeInput {
  const float* freqs = nullptr;
  const int32_t* grids = nullptr;
  const float* transform = nullptr;
};

// Copies rows [row0, row0 + n) of head h of x into dst [n, D] fp32, times `mult`. With rope tables,
// patch rows are rotated first and rounded to scalar_t, exactly what rope2d would have stored: the
// fused op equals rope2d followed by attention in every dtype.
template <typename scalar_t>
void pack_rows(const scalar_t* x, Strides st, int64_t h, int64_t row0, int64_t n, int64_t D, float* dst,
               float mult, const RopeTables* rope, int64_t seg_start, int64_t P) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* src = x + (row0 + r) * st.t + h * st.h;
    float* out = dst + r * D;
    const int64_t pos = row0 + r - seg_start - P;
    if (rope != nullptr && pos >= 0) {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(src[d]);
      rope->rotate(out, pos, 1.f);
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(static_cast<scalar_t>(out[d])) * mult;
    } else {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(src[d]) * mult;
    }
  }
}

// Writes src [n, D] fp32 into rows of one head of y, rotated back by the adjoint when rope is given.
template <typename scalar_t>
void store_rows(scalar_t* y, Strides st, int64_t h, int64_t row0, int64_t n, int64_t D, float* src,
                const RopeTables* rope, int64_t seg_start, int64_t P) {
  for (int64_t r = 0; r < n; ++r) {
    float* row = src + r * D;
    const int64_t pos = row0 + r - seg_start - P;
    if (rope != nullptr && pos >= 0) rope->rotate(row, pos, -1.f);
    scalar_t* out = y + (row0 + r) * st.t + h * st.h;
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(row[d]);
  }
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

struct Task {
  int64_t seg, head, row0, rows;
  double cost;
};

// Runs work(task, thread_state) over tasks, largest first, dynamically shared among threads.
template <typename State, typename F>
void run_tasks(std::vector<Task>& tasks, F work) {
  // stable: equal-cost tasks stay in (segment, head, rows) order, so threads share K/V in cache
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
  at::parallel_for(0, n_workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      State state;
      for (int64_t i = next.fetch_add(1); i < n_tasks; i = next.fetch_add(1)) work(tasks[i], state);
    }
  });
}

// Host copies of the segment bounds, checked: the CPU kernels rely on them.
std::vector<std::pair<int64_t, int64_t>> read_segments(const at::Tensor& cu_seqlens, const Problem& p,
                                                       const int32_t* grids) {
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0, "varlen_attention: cu_seqlens: expected cu_seqlens[0] == 0, got ", cu[0]);
  TORCH_CHECK(cu[p.n_segments] == p.T, "varlen_attention: cu_seqlens: expected last value ", p.T, ", got ",
              cu[p.n_segments]);
  std::vector<std::pair<int64_t, int64_t>> segs(p.n_segments);
  for (int64_t s = 0; s < p.n_segments; ++s) {
    TORCH_CHECK(cu[s + 1] >= cu[s], "varlen_attention: cu_seqlens: expected non-decreasing values at ", s);
    TORCH_CHECK(cu[s + 1] - cu[s] <= p.max_seqlen, "varlen_attention: max_seqlen: expected >= ",
                cu[s + 1] - cu[s], " (segment ", s, "), got ", p.max_seqlen);
    if (grids != nullptr) {
      TORCH_CHECK(grids[2 * s] > 0 && grids[2 * s + 1] > 0, "varlen_attention: grids: expected positive sides for image ", s);
      TORCH_CHECK(int64_t(cu[s + 1]) - cu[s] ==
                      image_tokens(p.num_prefix_tokens, grids[2 * s], grids[2 * s + 1], "varlen_attention"),
                  "varlen_attention: cu_seqlens: segment ", s, " expected num_prefix_tokens + Hp*Wp tokens");
    }
    segment_bounds(cu, s, p.T, segs[s].first, segs[s].second);
  }
  return segs;
}

RopeTables* tables_for(RopeTables& tables, const Problem& p, const RopeInput& ri, int64_t seg) {
  if (!p.has_rope) return nullptr;
  const float* t = p.has_transform ? ri.transform + seg * p.transform_stride : nullptr;
  tables.build(seg, ri.grids[2 * seg], ri.grids[2 * seg + 1], p.num_prefix_tokens, t, ri.freqs, p.D);
  return &tables;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
struct FwdState {
  std::vector<float> q, k, v, s, o, m, l;
  RopeTables rope;
};

template <typename scalar_t>
void forward_cpu(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse, const std::vector<std::pair<int64_t, int64_t>>& segs, const RopeInput& ri) {
  const int64_t D = p.D;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  const Strides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v), so = strides_of(out);
  // fp32 K/V without rotation feed the gemms in place (row stride = the tensor's T stride)
  const bool kv_in_place = std::is_same<scalar_t, float>::value;
  const bool k_in_place = kv_in_place && !p.has_rope;

  // A task owns up to kMaxBlocksPerTask query tiles of one (segment, head): each K/V tile it packs
  // (converted, rotated) serves all of them. Fewer tiles per task when tasks would be too few to keep
  // every thread busy.
  int64_t n_blocks = 0;
  for (const auto& seg : segs) n_blocks += p.H * ((seg.second - seg.first + kBlockQ - 1) / kBlockQ);
  const int64_t blocks_per_task =
      std::max<int64_t>(1, std::min<int64_t>(kMaxBlocksPerTask, n_blocks / (8 * at::get_num_threads())));
  const int64_t chunk = blocks_per_task * kBlockQ;
  std::vector<Task> tasks;
  for (int64_t s = 0; s < p.n_segments; ++s) {
    const int64_t L = segs[s].second - segs[s].first;
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t r = 0; r < L; r += chunk) {
        const int64_t rows = std::min(chunk, L - r);
        tasks.push_back({s, h, segs[s].first + r, rows, double(rows) * double(L)});
      }
  }
  run_tasks<FwdState>(tasks, [&](const Task& task, FwdState& st) {
    const int64_t start = segs[task.seg].first, end = segs[task.seg].second, h = task.head, R = task.rows;
    st.q.resize(R * D); st.k.resize(kBlockK * D); st.v.resize(kBlockK * D);
    st.s.resize(kBlockQ * kBlockK); st.o.assign(R * D, 0.f);
    st.m.assign(R, -std::numeric_limits<float>::infinity()); st.l.assign(R, 0.f);
    const RopeTables* rope = tables_for(st.rope, p, ri, task.seg);
    // the scale multiplies the finished dot products (as the reference's SDPA does), not Q: a huge
    // softmax_scale then overflows exactly where the reference's scores do
    pack_rows(qp, sq, h, task.row0, R, D, st.q.data(), 1.f, rope, start, p.num_prefix_tokens);
    float* S = st.s.data();
    for (int64_t k0 = start; k0 < end; k0 += kBlockK) {
      const int64_t N = std::min(kBlockK, end - k0);
      const float* kt;
      const float* vt;
      int64_t ldk = D, ldv = D;
      if (k_in_place) {
        kt = reinterpret_cast<const float*>(kp) + k0 * sk.t + h * sk.h;
        ldk = sk.t;
      } else {
        pack_rows(kp, sk, h, k0, N, D, st.k.data(), 1.f, rope, start, p.num_prefix_tokens);
        kt = st.k.data();
      }
      if (kv_in_place) {
        vt = reinterpret_cast<const float*>(vp) + k0 * sv.t + h * sv.h;
        ldv = sv.t;
      } else {
        pack_rows(vp, sv, h, k0, N, D, st.v.data(), 1.f, nullptr, start, 0);
        vt = st.v.data();
      }
      for (int64_t b0 = 0; b0 < R; b0 += kBlockQ) {  // each query tile against this K/V tile
        const int64_t M = std::min(kBlockQ, R - b0);
        float* o = st.o.data() + b0 * D;
        float* m = st.m.data() + b0;
        float* l = st.l.data() + b0;
        gemm(false, true, M, N, D, p.scale, st.q.data() + b0 * D, D, kt, ldk, 0.f, S, kBlockK);  // S = scale Q K^T
        for (int64_t r = 0; r < M; ++r) {  // online softmax
          float* srow = S + r * kBlockK;
          const float m_new = std::max(m[r], row_max(srow, N));
          const float alpha = m[r] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m[r] - m_new);
          l[r] = l[r] * alpha + exp_shift_sum(srow, N, m_new);
          if (alpha != 1.f) scale_row(o + r * D, D, alpha);
          m[r] = m_new;
        }
        gemm(false, false, M, D, N, 1.f, S, kBlockK, vt, ldv, 1.f, o, D);  // O += P V
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      scale_row(st.o.data() + r * D, D, 1.f / st.l[r]);
      lp[h * p.T + task.row0 + r] = st.m[r] + std::log(st.l[r]);
    }
    store_rows(op, so, h, task.row0, R, D, st.o.data(), nullptr, start, 0);
  });
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
struct BwdState {
  std::vector<float> q, k, v, dout, delta, dq, dk, dv, s, dp;
  RopeTables rope;
};

template <typename scalar_t>
void backward_cpu(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                  at::Tensor& dv, const std::vector<std::pair<int64_t, int64_t>>& segs, const RopeInput& ri) {
  const int64_t D = p.D, B = kBlockBwd;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* gp = dout.data_ptr<scalar_t>();
  const scalar_t* op = out.data_ptr<scalar_t>();
  const float* lp = lse.data_ptr<float>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();
  const Strides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v), sg = strides_of(dout),
                so = strides_of(out), sdq = strides_of(dq), sdk = strides_of(dk), sdv = strides_of(dv);

  std::vector<Task> tasks;
  for (int64_t s = 0; s < p.n_segments; ++s) {
    const int64_t L = segs[s].second - segs[s].first;
    if (L == 0) continue;
    for (int64_t h = 0; h < p.H; ++h) tasks.push_back({s, h, segs[s].first, L, double(L) * double(L)});
  }
  run_tasks<BwdState>(tasks, [&](const Task& task, BwdState& st) {
    const int64_t start = task.row0, L = task.rows, h = task.head, P = p.num_prefix_tokens;
    for (auto* buf : {&st.q, &st.k, &st.v, &st.dout, &st.dk, &st.dv}) buf->resize(L * D);
    st.dq.assign(L * D, 0.f);
    st.delta.resize(L); st.s.resize(B * B); st.dp.resize(B * B);
    RopeTables* rope = tables_for(st.rope, p, ri, task.seg);
    pack_rows(qp, sq, h, start, L, D, st.q.data(), 1.f, rope, start, P);
    pack_rows(kp, sk, h, start, L, D, st.k.data(), 1.f, rope, start, P);
    pack_rows(vp, sv, h, start, L, D, st.v.data(), 1.f, nullptr, start, 0);
    pack_rows(gp, sg, h, start, L, D, st.dout.data(), 1.f, nullptr, start, 0);
    for (int64_t r = 0; r < L; ++r) {  // delta = rowsum(dO * O)
      const scalar_t* orow = op + (start + r) * so.t + h * so.h;
      const float* grow = st.dout.data() + r * D;
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += grow[d] * static_cast<float>(orow[d]);
      st.delta[r] = acc;
    }
    const float* lse_row = lp + h * p.T + start;
    float *S = st.s.data(), *dP = st.dp.data();
    for (int64_t k0 = 0; k0 < L; k0 += B) {
      const int64_t N = std::min(B, L - k0);
      const float* kt = st.k.data() + k0 * D;
      const float* vt = st.v.data() + k0 * D;
      float* dkt = st.dk.data() + k0 * D;
      float* dvt = st.dv.data() + k0 * D;
      for (int64_t q0 = 0; q0 < L; q0 += B) {
        const int64_t M = std::min(B, L - q0);
        const float* qt = st.q.data() + q0 * D;
        const float* gt = st.dout.data() + q0 * D;
        gemm(false, true, M, N, D, p.scale, qt, D, kt, D, 0.f, S, B);  // S = scale Q K^T
        for (int64_t r = 0; r < M; ++r) exp_shift_sum(S + r * B, N, lse_row[q0 + r]);  // P
        gemm(true, false, N, D, M, 1.f, S, B, gt, D, q0 == 0 ? 0.f : 1.f, dvt, D);   // dV += P^T dO
        gemm(false, true, M, N, D, 1.f, gt, D, vt, D, 0.f, dP, B);                    // dP = dO V^T
        for (int64_t r = 0; r < M; ++r) softmax_grad_row(S + r * B, dP + r * B, N, st.delta[q0 + r]);
        gemm(true, false, N, D, M, p.scale, dP, B, qt, D, q0 == 0 ? 0.f : 1.f, dkt, D);  // dK += dS^T Q
        gemm(false, false, M, D, N, p.scale, dP, B, kt, D, 1.f, st.dq.data() + q0 * D, D);  // dQ += dS K
      }
    }
    store_rows(dqp, sdq, h, start, L, D, st.dq.data(), rope, start, P);
    store_rows(dkp, sdk, h, start, L, D, st.dk.data(), rope, start, P);
    store_rows(dvp, sdv, h, start, L, D, st.dv.data(), nullptr, start, 0);
  });
}

template <typename F>
void dispatch_dtype(at::ScalarType t, F f) {
  switch (t) {
    case at::kFloat: f(float()); break;
    case at::kHalf: f(at::Half()); break;
    case at::kBFloat16: f(at::BFloat16()); break;
    default: TORCH_CHECK(false, "varlen_attention: expected float32/float16/bfloat16, got ", t);
  }
}

RopeInput rope_input(const Problem& p, const c10::optional<at::Tensor>& inv_freq,
                     const c10::optional<at::Tensor>& grids, const c10::optional<at::Tensor>& coord_transform) {
  RopeInput ri;
  if (p.has_rope) {
    ri.freqs = inv_freq->data_ptr<float>();
    ri.grids = grids->data_ptr<int32_t>();
    ri.transform = p.has_transform ? coord_transform->data_ptr<float>() : nullptr;
  }
  return ri;
}

void varlen_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out,
                              at::Tensor lse, const at::Tensor& cu_seqlens, int64_t max_seqlen, double softmax_scale,
                              const c10::optional<at::Tensor>& inv_freq, const c10::optional<at::Tensor>& grids,
                              const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens) {
  const Problem p = check_fwd_args(q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids,
                                   coord_transform, num_prefix_tokens);
  const RopeInput ri = rope_input(p, inv_freq, grids, coord_transform);
  const auto segs = read_segments(cu_seqlens, p, ri.grids);
  if (p.T == 0 || p.H == 0) return;
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    forward_cpu<scalar_t>(p, q, k, v, out, lse, segs, ri);
  });
}

void varlen_attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse, at::Tensor dq, at::Tensor dk, at::Tensor dv,
                              const at::Tensor& cu_seqlens, int64_t max_seqlen, double softmax_scale,
                              const c10::optional<at::Tensor>& inv_freq, const c10::optional<at::Tensor>& grids,
                              const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens) {
  const Problem p = check_bwd_args(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, softmax_scale,
                                   inv_freq, grids, coord_transform, num_prefix_tokens);
  const RopeInput ri = rope_input(p, inv_freq, grids, coord_transform);
  const auto segs = read_segments(cu_seqlens, p, ri.grids);
  if (p.T == 0 || p.H == 0) return;
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    backward_cpu<scalar_t>(p, dout, q, k, v, out, lse, dq, dk, dv, segs, ri);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dinofast_C, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace varlen
}  // namespace dinofast
