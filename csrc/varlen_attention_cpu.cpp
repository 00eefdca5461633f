// Varlen attention on CPU: tiled online softmax (flash-attention style) in fp32.
//
// Forward: one task per (segment, head, up to 16 blocks of kBlockQ queries). A task packs its query
// tiles (rotated by RoPE) into fp32, then walks the segment's keys kBlockK at a time:
// S = Q K^T and O += P V on cache-resident tiles, the row max / exp / sum between them a vectorised
// loop. The gemms are FMA kernels of its own on AVX-512 (D a multiple of 64: K^T packed once per key
// tile, 6 x 64 register blocks, the scale and the row max folded into S's stores), else BLAS gemms
// (at::mm_out on blob views: MKL on x86). K/V tiles are rotated and converted to fp32 as they are
// packed; fp32 Q/K without RoPE are read in place.
// Backward: one task per (segment, head): Q, K (rotated), V, dO packed once into fp32, then the
// FlashAttention-2 recurrences per (key tile, query tile), on the same FMA kernels where the forward
// has them (backward_tiles_own); dQ accumulates in a task-local buffer, so no atomics and a
// deterministic result. dQ and dK are rotated back (the adjoint) as they are stored.
// Tasks are sorted by cost and handed out dynamically to the OpenMP threads (segments differ a lot).
//
// fp16/bf16 where oneDNN has a packed-B brgemm for the dtype (AMX: bf16 on Sapphire Rapids and
// later, fp16 with AMX-FP16): the same tiling, but every gemm takes operands in the input dtype
// and accumulates in fp32 (cpublas::brgemm), as flash-attention does on GPUs: Q, K, V, dO are used
// as stored (rotated and rounded to the dtype with RoPE), P and dS are rounded to the dtype before
// their gemms; softmax statistics, O, dQ, dK, dV accumulate in fp32. Elsewhere, or with oneDNN
// disabled (torch.backends.mkldnn.flags(enabled=False)), fp16/bf16 are converted to fp32 as above.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <utility>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"
#include "varlen_attention.h"

namespace dinofast {
namespace varlen {
namespace {

constexpr int64_t kBlockQ = 256;   // forward query tile
constexpr int64_t kBlockK = 512;   // forward key tile
constexpr int64_t kMaxBlocksPerTask = 16;
constexpr int64_t kBlockBwd = 256; // backward query and key tiles
constexpr float kLog2e = 1.44269504088896341f;

// p + i, or null where the optional row p is (lse_log2e: null when the fused exp is off).
inline const float* offset_or_null(const float* p, int64_t i) { return p != nullptr ? p + i : nullptr; }

// Per-thread scratch buffers start on a cache line: an AMX tile row (64 bytes) that straddles two
// lines splits every tile load and store (O += P V ran 3x slower from malloc's 16-byte alignment).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    void* ptr = ::operator new(n * sizeof(T), std::align_val_t(64));
    return static_cast<T*>(ptr);
  }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;

// Row stride of a tile n elements wide: one cache line past n. With a power-of-two stride (512 fp32
// scores = 2 KB) the rows of a gemm's C or A tile all fall in a few L1 sets and evict each other:
// brgemm M=256 N=64 K=64 writing into rows 2 KB apart ran at 470 GFLOP/s, 2,112 B apart at 820.
template <typename T>
constexpr int64_t padded_ld(int64_t n) { return n + 64 / int64_t(sizeof(T)); }
constexpr int64_t kLdS = padded_ld<float>(kBlockK);       // forward scores
constexpr int64_t kLdSBwd = padded_ld<float>(kBlockBwd);  // backward scores, dP, dQ^T

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
// Below -87 the result is exactly 0 (exp(-87) ~ 1.6e-38; fp32 exp is denormal or 0 there): a -inf
// score gives P = 0, so 0 * inf in a later product is NaN as in the reference, not a tiny P * inf = inf.
DF_FAST_MATH inline float fast_exp(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
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
  return underflow ? 0.0f : y * two_n;
}

#ifdef DF_HAVE_AVX512_PATH
// Four independent vmaxps chains: the compiler's single chain waits out the instruction's latency
// every 16 floats. A NaN may or may not win the max; the row's exps are NaN either way.
DF_AVX512 float row_max_avx512(const float* s, int64_t n) {
  const __m512 lo = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = lo, m1 = lo, m2 = lo, m3 = lo;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + j + 16));
    m2 = _mm512_max_ps(m2, _mm512_loadu_ps(s + j + 32));
    m3 = _mm512_max_ps(m3, _mm512_loadu_ps(s + j + 48));
  }
  for (; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1u);
    m0 = _mm512_mask_max_ps(m0, k, m0, _mm512_maskz_loadu_ps(k, s + j));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}
#endif

DF_MULTIVERSION float row_max_portable(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

float row_max(const float* s, int64_t n) {
#ifdef DF_HAVE_AVX512_PATH
  if (cpu_has_avx512()) return row_max_avx512(s, n);
#endif
  return row_max_portable(s, n);
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

// The fp32 rows' passes (AVX-512 where the CPU has it; defined with the vector helpers below):
// the forward's s = scale * s rounded in place, returning its max, and s = exp(s - shift),
// returning the sum; the backward's P row s = exp(scale * s rounded - shift).
float scale_and_max(float* s, int64_t n, float scale);
float exp_shift_sum_row(float* s, int64_t n, float shift);
void scaled_exp_row(float* s, int64_t n, float scale, float shift);

// The fp32 gemms on AVX-512 FMAs of its own (defined with the vector helpers below), where
// fp32_kernels(D): S [M, N] (row stride lds) = scale * Q [M, D] (row stride ldq) K^T, each product
// rounded (scale_and_max's scores), from K^T packed by pack_transposed, with each row's max in
// row_max [M] unless it is null; O [M, D] (row stride ldo) += P V, V [N, D] (row stride ldv), P's
// element (r, j) at p[r * ldp + j * step] (step 1: P [M, N] row-major; ldp 1: P^T of a row-major
// P). MKL's sgemm packs both operands on every call (~11% of the forward); here K^T is packed once
// per key tile, and P and V are read where they lie.
bool fp32_kernels(int64_t D);
int64_t packed_kt_ld(int64_t N);  // row stride of packed K^T: N rounded up to 64 (zeros past N)
void pack_transposed(const float* x, int64_t ldx, int64_t N, int64_t D, float* xt);  // X^T (K^T, V^T)
void scores_fp32(const float* q, int64_t ldq, int64_t M, const float* kt, int64_t N, int64_t D, float scale, float* s,
                 int64_t lds, float* row_max);
void accumulate_pv_fp32(const float* p, int64_t ldp, int64_t step, int64_t M, const float* v, int64_t ldv, int64_t N,
                        int64_t D, float* o, int64_t ldo);

// dS = P * (dP - delta), into dp.
DF_MULTIVERSION void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

DF_MULTIVERSION void scale_row(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// Rounds fp32 to bf16 bit patterns (round to nearest even; NaN stays a quiet NaN), as c10::BFloat16 does.
DF_MULTIVERSION void round_bf16(const float* x, uint16_t* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    std::memcpy(&u, x + j, sizeof(u));
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    y[j] = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(r);
  }
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

// A patch row (pos = its index among the segment's patches, >= 0) under RoPE: src [D] rotated into
// fp32 tmp [D], returns true; prefix tokens and rows without RoPE: false, tmp untouched.
template <typename scalar_t>
bool rotated_row(const scalar_t* src, int64_t D, const RopeTables* rope, int64_t pos, float* tmp) {
  if (rope == nullptr || pos < 0) return false;
  for (int64_t d = 0; d < D; ++d) tmp[d] = static_cast<float>(src[d]);
  rope->rotate(tmp, pos, 1.f);
  return true;
}

// Copies rows [row0, row0 + n) of head h of x into dst [n, D] fp32, times `mult`. With rope tables,
// patch rows are rotated first and rounded to scalar_t, exactly what rope2d would have stored: the
// fused op equals rope2d followed by attention in every dtype.
template <typename scalar_t>
void pack_rows(const scalar_t* x, Strides st, int64_t h, int64_t row0, int64_t n, int64_t D, float* dst,
               float mult, const RopeTables* rope, int64_t seg_start, int64_t P) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* src = x + (row0 + r) * st.t + h * st.h;
    float* out = dst + r * D;
    if (rotated_row(src, D, rope, row0 + r - seg_start - P, out)) {
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
    if constexpr (std::is_same<scalar_t, at::BFloat16>::value) {
      round_bf16(row, reinterpret_cast<uint16_t*>(out), D);  // vectorised; the same rounding
    } else {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(row[d]);
    }
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

// Data pointers and (token, head) strides of the forward's and the backward's tensors.
template <typename scalar_t>
struct FwdPointers {
  const scalar_t *q, *k, *v;
  scalar_t* out;
  float* lse;
  Strides sq, sk, sv, so;
  FwdPointers(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, at::Tensor& out_, at::Tensor& lse_)
      : q(q_.data_ptr<scalar_t>()), k(k_.data_ptr<scalar_t>()), v(v_.data_ptr<scalar_t>()),
        out(out_.data_ptr<scalar_t>()), lse(lse_.data_ptr<float>()), sq(strides_of(q_)), sk(strides_of(k_)),
        sv(strides_of(v_)), so(strides_of(out_)) {}
};

template <typename scalar_t>
struct BwdPointers {
  const scalar_t *q, *k, *v, *dout, *out;
  const float* lse;
  scalar_t *dq, *dk, *dv;
  Strides sq, sk, sv, sg, so, sdq, sdk, sdv;
  BwdPointers(const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
              const at::Tensor& out_, const at::Tensor& lse_, at::Tensor& dq_, at::Tensor& dk_, at::Tensor& dv_)
      : q(q_.data_ptr<scalar_t>()), k(k_.data_ptr<scalar_t>()), v(v_.data_ptr<scalar_t>()),
        dout(dout_.data_ptr<scalar_t>()), out(out_.data_ptr<scalar_t>()), lse(lse_.data_ptr<float>()),
        dq(dq_.data_ptr<scalar_t>()), dk(dk_.data_ptr<scalar_t>()), dv(dv_.data_ptr<scalar_t>()),
        sq(strides_of(q_)), sk(strides_of(k_)), sv(strides_of(v_)), sg(strides_of(dout_)), so(strides_of(out_)),
        sdq(strides_of(dq_)), sdk(strides_of(dk_)), sdv(strides_of(dv_)) {}
};

// A forward task owns up to kMaxBlocksPerTask query tiles of one (segment, head): each K/V tile it
// packs (converted, rotated) serves all of them. Fewer tiles per task when tasks would be too few to
// keep every thread busy.
std::vector<Task> forward_tasks(const Problem& p, const std::vector<std::pair<int64_t, int64_t>>& segs) {
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
  return tasks;
}

// One backward task per non-empty (segment, head).
std::vector<Task> backward_tasks(const Problem& p, const std::vector<std::pair<int64_t, int64_t>>& segs) {
  std::vector<Task> tasks;
  for (int64_t s = 0; s < p.n_segments; ++s) {
    const int64_t L = segs[s].second - segs[s].first;
    if (L == 0) continue;
    for (int64_t h = 0; h < p.H; ++h) tasks.push_back({s, h, segs[s].first, L, double(L) * double(L)});
  }
  return tasks;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
struct FwdState {
  Buffer<float> q, k, v, kt, s, o, m, l, tile_max;
  RopeTables rope;
};

template <typename scalar_t>
void forward_cpu(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse, const std::vector<std::pair<int64_t, int64_t>>& segs, const RopeInput& ri) {
  const int64_t D = p.D;
  const FwdPointers<scalar_t> t(q, k, v, out, lse);
  const scalar_t *qp = t.q, *kp = t.k, *vp = t.v;
  scalar_t* op = t.out;
  float* lp = t.lse;
  const Strides sq = t.sq, sk = t.sk, sv = t.sv, so = t.so;
  // fp32 K/V without rotation feed the gemms in place (row stride = the tensor's T stride)
  const bool kv_in_place = std::is_same<scalar_t, float>::value;
  const bool k_in_place = kv_in_place && !p.has_rope;

  const bool own = fp32_kernels(D);  // K^T packed and the gemms on AVX-512 (MKL otherwise)
  std::vector<Task> tasks = forward_tasks(p, segs);
  run_tasks<FwdState>(tasks, [&](const Task& task, FwdState& st) {
    const int64_t start = segs[task.seg].first, end = segs[task.seg].second, h = task.head, R = task.rows;
    st.q.resize(R * D); st.k.resize(kBlockK * D); st.v.resize(kBlockK * D);
    if (own) {
      st.kt.resize(D * packed_kt_ld(kBlockK));
      st.tile_max.resize(kBlockQ);
    }
    st.s.resize(kBlockQ * kLdS); st.o.assign(R * D, 0.f);
    st.m.assign(R, -std::numeric_limits<float>::infinity()); st.l.assign(R, 0.f);
    const RopeTables* rope = tables_for(st.rope, p, ri, task.seg);
    // the scale multiplies the finished dot products (as the reference's SDPA does), not Q: a huge
    // softmax_scale then overflows exactly where the reference's scores do
    const float* qrows = st.q.data();
    int64_t ldq = D;
    if (own && k_in_place) {  // fp32 without RoPE: the own kernel reads Q where it lies
      qrows = reinterpret_cast<const float*>(qp) + task.row0 * sq.t + h * sq.h;
      ldq = sq.t;
    } else {
      pack_rows(qp, sq, h, task.row0, R, D, st.q.data(), 1.f, rope, start, p.num_prefix_tokens);
    }
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
      if (own) pack_transposed(kt, ldk, N, D, st.kt.data());
      if (kv_in_place && !own) {  // the own kernel reads V rows in order: packed, they are not a page apart
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
        if (own)
          scores_fp32(qrows + b0 * ldq, ldq, M, st.kt.data(), N, D, p.scale, S, kLdS, st.tile_max.data());
        else
          gemm(false, true, M, N, D, 1.f, qrows + b0 * ldq, ldq, kt, ldk, 0.f, S, kLdS);  // S = Q K^T
        for (int64_t r = 0; r < M; ++r) {  // online softmax on the scores scale * S
          float* srow = S + r * kLdS;
          const float m_new = std::max(m[r], own ? st.tile_max[r] : scale_and_max(srow, N, p.scale));
          const float alpha = m[r] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m[r] - m_new);
          l[r] = l[r] * alpha + exp_shift_sum_row(srow, N, m_new);
          if (alpha != 1.f) scale_row(o + r * D, D, alpha);
          m[r] = m_new;
        }
        if (own)
          accumulate_pv_fp32(S, kLdS, 1, M, vt, ldv, N, D, o, D);
        else
          gemm(false, false, M, D, N, 1.f, S, kLdS, vt, ldv, 1.f, o, D);  // O += P V
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
  Buffer<float> q, k, v, dout, delta, dq, dk, dv, s, dp, kt, vt;
  RopeTables rope;
};

// The backward's tiles through BLAS gemms: per (key tile, query tile) S = Q K^T, P = exp(scale S -
// lse), dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dK += scale dS^T Q, dQ += scale dS K.
// st holds the packed rows (q, k, v, dout [L, D]), delta, and zeroed dq.
void backward_tiles_blas(BwdState& st, int64_t L, int64_t D, float scale, const float* lse_row) {
  const int64_t B = kBlockBwd;
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
      gemm(false, true, M, N, D, 1.f, qt, D, kt, D, 0.f, S, kLdSBwd);  // S = Q K^T
      for (int64_t r = 0; r < M; ++r) scaled_exp_row(S + r * kLdSBwd, N, scale, lse_row[q0 + r]);  // P
      gemm(true, false, N, D, M, 1.f, S, kLdSBwd, gt, D, q0 == 0 ? 0.f : 1.f, dvt, D);  // dV += P^T dO
      gemm(false, true, M, N, D, 1.f, gt, D, vt, D, 0.f, dP, kLdSBwd);              // dP = dO V^T
      for (int64_t r = 0; r < M; ++r) softmax_grad_row(S + r * kLdSBwd, dP + r * kLdSBwd, N, st.delta[q0 + r]);
      gemm(true, false, N, D, M, scale, dP, kLdSBwd, qt, D, q0 == 0 ? 0.f : 1.f, dkt, D);  // dK += dS^T Q
      gemm(false, false, M, D, N, scale, dP, kLdSBwd, kt, D, 1.f, st.dq.data() + q0 * D, D);  // dQ += dS K
    }
  }
}

// The same tiles on the fp32 kernels of its own (fp32_kernels): per key tile, K^T and V^T
// packed once, and dK, dQ take the softmax scale once, at the end.
void backward_tiles_own(BwdState& st, int64_t L, int64_t D, float scale, const float* lse_row) {
  const int64_t B = kBlockBwd;
  st.kt.resize(D * packed_kt_ld(B));
  st.vt.resize(D * packed_kt_ld(B));
  std::fill(st.dk.begin(), st.dk.end(), 0.f);
  std::fill(st.dv.begin(), st.dv.end(), 0.f);
  float *S = st.s.data(), *dP = st.dp.data();
  for (int64_t k0 = 0; k0 < L; k0 += B) {
    const int64_t N = std::min(B, L - k0);
    pack_transposed(st.k.data() + k0 * D, D, N, D, st.kt.data());
    pack_transposed(st.v.data() + k0 * D, D, N, D, st.vt.data());
    for (int64_t q0 = 0; q0 < L; q0 += B) {
      const int64_t M = std::min(B, L - q0);
      const float* qt = st.q.data() + q0 * D;
      const float* gt = st.dout.data() + q0 * D;
      scores_fp32(qt, D, M, st.kt.data(), N, D, scale, S, kLdSBwd, nullptr);  // scale S, rounded
      for (int64_t r = 0; r < M; ++r) exp_shift_sum_row(S + r * kLdSBwd, N, lse_row[q0 + r]);  // P
      accumulate_pv_fp32(S, 1, kLdSBwd, N, gt, D, M, D, st.dv.data() + k0 * D, D);  // dV += P^T dO
      scores_fp32(gt, D, M, st.vt.data(), N, D, 1.f, dP, kLdSBwd, nullptr);          // dP = dO V^T
      for (int64_t r = 0; r < M; ++r) softmax_grad_row(S + r * kLdSBwd, dP + r * kLdSBwd, N, st.delta[q0 + r]);
      accumulate_pv_fp32(dP, 1, kLdSBwd, N, qt, D, M, D, st.dk.data() + k0 * D, D);  // dK += dS^T Q
      accumulate_pv_fp32(dP, kLdSBwd, 1, M, st.k.data() + k0 * D, D, N, D, st.dq.data() + q0 * D, D);  // dQ += dS K
    }
  }
  scale_row(st.dk.data(), L * D, scale);
  scale_row(st.dq.data(), L * D, scale);
}

template <typename scalar_t>
void backward_cpu(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                  at::Tensor& dv, const std::vector<std::pair<int64_t, int64_t>>& segs, const RopeInput& ri) {
  const int64_t D = p.D;
  const BwdPointers<scalar_t> t(dout, q, k, v, out, lse, dq, dk, dv);
  const scalar_t *qp = t.q, *kp = t.k, *vp = t.v, *gp = t.dout, *op = t.out;
  const float* lp = t.lse;
  scalar_t *dqp = t.dq, *dkp = t.dk, *dvp = t.dv;
  const Strides sq = t.sq, sk = t.sk, sv = t.sv, sg = t.sg, so = t.so, sdq = t.sdq, sdk = t.sdk, sdv = t.sdv;

  const bool own = fp32_kernels(D);  // the gemms on AVX-512 (MKL otherwise)
  std::vector<Task> tasks = backward_tasks(p, segs);
  run_tasks<BwdState>(tasks, [&](const Task& task, BwdState& st) {
    const int64_t start = task.row0, L = task.rows, h = task.head, P = p.num_prefix_tokens;
    for (auto* buf : {&st.q, &st.k, &st.v, &st.dout, &st.dk, &st.dv}) buf->resize(L * D);
    st.dq.assign(L * D, 0.f);
    st.delta.resize(L); st.s.resize(kBlockBwd * kLdSBwd); st.dp.resize(kBlockBwd * kLdSBwd);
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
    if (own)
      backward_tiles_own(st, L, D, p.scale, lse_row);
    else
      backward_tiles_blas(st, L, D, p.scale, lse_row);
    store_rows(dqp, sdq, h, start, L, D, st.dq.data(), rope, start, P);
    store_rows(dkp, sdk, h, start, L, D, st.dk.data(), rope, start, P);
    store_rows(dvp, sdv, h, start, L, D, st.dv.data(), nullptr, start, 0);
  });
}

// ------------------------------------------------------------------------------------------------
// fp16/bf16 on low-precision gemms (oneDNN brgemm with a VNNI-packed B, fp32 accumulation).
// brgemm computes C[M, N] (+)= A[M, K] B[K, N]: A row-major (lda), B packed in blocks of 64 columns,
// each [K/2, 64, 2] (pairs of consecutive k interleaved), K even. Operands are handled as raw 16-bit
// patterns (uint16_t) while they are moved around, and typed only at the brgemm call.
// ------------------------------------------------------------------------------------------------
constexpr int64_t kPackN = 64;  // columns per packed B block (oneDNN's packed-B ld is at most 64)
constexpr int64_t kLdP = padded_ld<uint16_t>(kBlockK);       // forward P rows
constexpr int64_t kLdPBwd = padded_ld<uint16_t>(kBlockBwd);  // backward P^T, dS^T, K^T rows

// The low-precision gemms serve dtype t when oneDNN has packed-B kernels for it (could_pack is false
// with oneDNN disabled by the user, so torch.backends.mkldnn.flags(enabled=False) selects fp32).
bool use_low_precision_gemms(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) && at::native::cpublas::could_pack(t);
}

// oneDNN JIT-compiles and caches one kernel per gemm shape, per thread, for the life of the process:
// tiles are padded so that shapes take few values whatever the segment lengths (rows of A to
// kPadM, the reduction dim to kPadK, packed B blocks to their full 64 columns), with zeros where
// the padding meets the other operand and room in C for the extra rows/columns.
constexpr int64_t kPadM = 32, kPadK = 64;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

#ifdef DF_HAVE_AVX512_PATH

// r[c] = column c of the 16 x 16 matrix of 32-bit elements whose rows were r[0..15]: pairs of rows
// interleaved (epi32), then quads (epi64), then the four 128-bit lanes gathered across vectors.
DF_AVX512 inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int b = 0; b < 16; b += 4) {  // lane k of u[b + j]: column 4k + j, rows b..b+3
    u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
    u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
    u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
    u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

// dst[c * ldd + i] = src[i * lds + c] for i < n_rows, c < n_cols (<= 16 each), 32-bit elements; with
// full_rows, every dst row gets 16 elements (zeros past n_rows).
DF_AVX512 void transpose_block_avx512(const uint32_t* src, int64_t lds, int64_t n_rows, int64_t n_cols, uint32_t* dst,
                                      int64_t ldd, bool full_rows) {
  const __mmask16 cols = n_cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n_cols) - 1u);
  const __mmask16 rows = full_rows || n_rows >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n_rows) - 1u);
  __m512i r[16];
  for (int64_t i = 0; i < 16; ++i) r[i] = i < n_rows ? _mm512_maskz_loadu_epi32(cols, src + i * lds) : _mm512_setzero_si512();
  transpose16x16_epi32(r);
  for (int64_t c = 0; c < n_cols; ++c) _mm512_mask_storeu_epi32(dst + c * ldd, rows, r[c]);
}

// The k pairs of one packed B block (see pack_b_rows): out[2j] = r0[j], out[2j + 1] = r1[j] (0 past
// row K) for j < nc, zero up to 64 columns; 32 columns per vpermt2w, masked loads for the tails.
DF_AVX512 void pack_block_avx512(const uint16_t* rows, int64_t ld, int64_t K, int64_t nc, uint16_t* blk) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  __mmask32 masks[2];
  for (int64_t h = 0; h < 2; ++h) {
    const int64_t rem = std::max<int64_t>(0, std::min<int64_t>(32, nc - 32 * h));
    masks[h] = rem == 32 ? ~__mmask32(0) : __mmask32((1u << rem) - 1u);
  }
  for (int64_t kp = 0; 2 * kp < K; ++kp) {
    const uint16_t* r0 = rows + 2 * kp * ld;
    uint16_t* out = blk + kp * 2 * kPackN;
    for (int64_t h = 0; h < 2; ++h) {
      const __m512i a = _mm512_maskz_loadu_epi16(masks[h], r0 + 32 * h);
      const __m512i b = 2 * kp + 1 < K ? _mm512_maskz_loadu_epi16(masks[h], r0 + ld + 32 * h) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + 64 * h, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(out + 64 * h + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}
#endif

// Packed B from rows [K, n_cols] (row stride ld): block c holds columns [64c, 64c + 64) as
// [k_pad/2, 64, 2] (k_pad >= K, even), blocks block_stride apart. Rows [K, k_pad) and columns past
// n_cols are zero, so they add nothing whatever the other operand holds there.
void pack_block(const uint16_t* rows, int64_t ld, int64_t K, int64_t nc, uint16_t* blk) {
#ifdef DF_HAVE_AVX512_PATH
  if (cpu_has_avx512()) return pack_block_avx512(rows, ld, K, nc, blk);
#endif
  for (int64_t kp = 0; 2 * kp < K; ++kp) {
    const uint16_t* r0 = rows + 2 * kp * ld;
    const uint16_t* r1 = 2 * kp + 1 < K ? r0 + ld : nullptr;
    uint16_t* out = blk + kp * 2 * kPackN;
    for (int64_t j = 0; j < nc; ++j) {
      out[2 * j] = r0[j];
      out[2 * j + 1] = r1 != nullptr ? r1[j] : uint16_t(0);
    }
    std::memset(out + 2 * nc, 0, (kPackN - nc) * 2 * sizeof(uint16_t));
  }
}

void pack_b_rows(const uint16_t* rows, int64_t ld, int64_t K, int64_t n_cols, uint16_t* dst, int64_t block_stride,
                 int64_t k_pad) {
  const int64_t pairs = (K + 1) / 2;
  for (int64_t c0 = 0; c0 < n_cols; c0 += kPackN) {
    uint16_t* blk = dst + (c0 / kPackN) * block_stride;
    pack_block(rows + c0, ld, K, std::min(kPackN, n_cols - c0), blk);
    std::memset(blk + pairs * 2 * kPackN, 0, (k_pad / 2 - pairs) * 2 * kPackN * sizeof(uint16_t));
  }
}

// Packed B = X^T from the rows of X [n_rows, D] (row stride ld), D even: block j holds X's rows
// [64j, 64j + 64) as columns, [D/2, 64, 2], blocks D * 64 apart; columns past n_rows are zero.
void pack_b_transposed(const uint16_t* rows, int64_t ld, int64_t n_rows, int64_t D, uint16_t* dst) {
  const int64_t pairs = D / 2;
  for (int64_t j0 = 0; j0 < n_rows; j0 += kPackN) {
    const int64_t nr = std::min(kPackN, n_rows - j0);
    uint32_t* blk = reinterpret_cast<uint32_t*>(dst + (j0 / kPackN) * D * kPackN);
#ifdef DF_HAVE_AVX512_PATH
    if (cpu_has_avx512() && ld % 2 == 0) {  // the pairs of a row as 32-bit elements: a 32-bit transpose
      for (int64_t n0 = 0; n0 < kPackN; n0 += 16)
        for (int64_t kp0 = 0; kp0 < pairs; kp0 += 16)
          transpose_block_avx512(reinterpret_cast<const uint32_t*>(rows + (j0 + n0) * ld) + kp0, ld / 2,
                                 std::clamp<int64_t>(nr - n0, 0, 16), std::min<int64_t>(16, pairs - kp0),
                                 blk + kp0 * kPackN + n0, kPackN, /*full_rows=*/true);
      continue;
    }
#endif
    for (int64_t n = 0; n < nr; ++n) {
      const uint16_t* row = rows + (j0 + n) * ld;
      for (int64_t kp = 0; kp < pairs; ++kp) {
        uint32_t pair;
        std::memcpy(&pair, row + 2 * kp, sizeof(pair));
        blk[kp * kPackN + n] = pair;
      }
    }
    if (nr < kPackN)
      for (int64_t kp = 0; kp < pairs; ++kp) std::memset(blk + kp * kPackN + nr, 0, (kPackN - nr) * sizeof(uint32_t));
  }
}

// C[M, N] (+)= A B through oneDNN's brgemm, with A and B holding scalar_t (fp16/bf16) bit patterns.
template <typename scalar_t>
void brgemm_lp(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add_C,
               const uint16_t* A, const uint16_t* B, float* C) {
  if (M == 0 || N == 0) return;
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, reinterpret_cast<const scalar_t*>(A),
                              reinterpret_cast<const scalar_t*>(B), C, /*is_vnni=*/true);
}

// C [M, n_cols] (+)= A [M, K] B, B packed by pack_b_rows / pack_b_transposed (blocks block_stride apart).
// full_blocks: every block computes all its 64 columns (C has room up to n_cols rounded up to 64,
// and B's columns past n_cols are zero), so the last block's width does not vary.
template <typename scalar_t>
void gemm_packed(int64_t M, int64_t n_cols, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                 int64_t block_stride, float* C, int64_t ldc, bool add_C, bool full_blocks = false) {
  for (int64_t c0 = 0; c0 < n_cols; c0 += kPackN)
    brgemm_lp<scalar_t>(M, full_blocks ? kPackN : std::min(kPackN, n_cols - c0), K, lda, kPackN, ldc, add_C, A,
                        B + (c0 / kPackN) * block_stride, C + c0);
}

template <typename scalar_t>
void round_row(const float* x, uint16_t* y, int64_t n) {
  if constexpr (std::is_same<scalar_t, at::BFloat16>::value) {
    round_bf16(x, y, n);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t v = static_cast<scalar_t>(x[j]);
      std::memcpy(y + j, &v, sizeof(uint16_t));
    }
  }
}

// s[j] = exp(s[j] * scale - lse[j]): the probabilities of one key against a row of queries. The
// product is rounded before the subtraction (no fma contraction), as the reference's scores are.
DF_MULTIVERSION __attribute__((optimize("fp-contract=off"))) void exp_scaled_minus(float* s, int64_t n, float scale,
                                                                                   const float* lse) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = fast_exp(s[j] * scale - lse[j]);
}

// dS = P * (dP - delta[j]), into dp: one key against a row of queries.
DF_MULTIVERSION void softmax_grad_cols(const float* p, float* dp, int64_t n, const float* delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta[j]);
}

// The elementwise passes between the low-precision gemms, fused: each reads a row of fp32 scores
// once and writes the dtype's operand for the next gemm. AVX-512 versions (exp by 2^n scaling with
// vscalefps, rounding by vcvtneps2bf16) where the CPU has them (every CPU with AMX does); the
// portable loops otherwise.
#ifdef DF_HAVE_AVX512_PATH

// c[0] + c[1] r + ... + c[5] r^5, by Horner's rule.
DF_AVX512 inline __m512 poly5(__m512 r, const float (&c)[6]) {
  __m512 y = _mm512_set1_ps(c[5]);
  for (int i = 4; i >= 0; --i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c[i]));
  return y;
}

// exp(x) = 2^n e^r, n = round(x / ln 2), r = x - n ln 2 in one fma, e^r by a degree-5 polynomial
// fitted for relative error on |r| <= ln(2)/2: within 4e-7 of exp where exp(x) > 1e-30 (a few fp32
// ulp; the bf16 operands made from it round at 4e-3). vscalefps applies 2^n with IEEE overflow and
// underflow, so only -inf needs a clamp (to -104, where exp rounds to 0). A NaN lane stays NaN
// (max(lo, x) returns x for a NaN x). +inf never reaches it: every caller subtracts the row's max
// score or its log-sum-exp.
DF_AVX512 inline __m512 exp16(__m512 x) {
  static constexpr float kExpR[6] = {1.0000001192092896f, 0.9999997019767761f, 0.49998894333839417f,
                                     0.16667574644088745f, 0.04191538318991661f, 0.008297654800117016f};
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945f), x);
  return _mm512_scalef_ps(poly5(r, kExpR), n);
}

// 2^x for x <= 0 (or a little above): 2^x = 2^floor(x) 2^r, r = x - floor(x) in [0, 1] from
// vreduceps (rounding down), 2^r by a polynomial c fitted for relative error on [0, 1], and
// vscalefps applying 2^floor(x) from x itself (it floors its exponent argument): no separate round
// or subtract. -inf gives r = 0 and 2^-inf = 0 with no clamp; NaN stays NaN; r rounding up to 1 (x
// just below an integer) still pairs with floor(x). The elementwise passes between the gemms are
// bound by the vector units: every op counted.
template <size_t kTerms>
DF_AVX512 inline __m512 exp2_poly16(__m512 x, const float (&c)[kTerms]) {
  const __m512 r = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 y = _mm512_set1_ps(c[kTerms - 1]);
  for (int i = int(kTerms) - 2; i >= 0; --i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(y, x);
}

// Degree 4, within 2.7e-6 of 2^r: P rounds to bf16 (3.9e-3), and lse = m + log(l) stays at fp32
// accuracy (a degree-3 fit, 7.5e-5, would not).
DF_AVX512 inline __m512 exp2_16(__m512 x) {
  static constexpr float kExp2R[5] = {1.0000026226043701f, 0.6930038332939148f, 0.24144276976585388f,
                                      0.05201148986816406f, 0.013534137047827244f};
  return exp2_poly16(x, kExp2R);
}

// Degree 5, within 1.7e-7 of 2^r (a few fp32 ulp): for fp32 P.
DF_AVX512 inline __m512 exp2_16_fp32(__m512 x) {
  static constexpr float kExp2R[6] = {0.9999999403953552f, 0.6931530833244324f, 0.24015361070632935f,
                                      0.05582631751894951f, 0.008989342488348484f, 0.0018775747157633305f};
  return exp2_poly16(x, kExp2R);
}

// Whether exp(y * scale - shift) may run as 2^(y * scale log2(e) - shift log2(e)) in one fma: no
// overflow of either constant (huge scales and shifts keep the reference's order, so that
// infinities come out as they do there).
inline bool fused_exp_ok(float scale, float shift) {
  return scale * kLog2e < 1e30f && std::fabs(shift) < 1e30f;
}

// 16 fp32 lanes rounded to bf16 (nearest even; NaN -> quiet NaN) by AVX512-BF16's vcvtneps2bf16,
// which also flushes fp32 denormals (below 1.2e-38) to zero: P and dS values of no weight here.
DF_AVX512 inline __m256i to_bf16x16(__m512 x) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)); }

DF_AVX512 inline __mmask16 tail_mask(int64_t rem) {
  return rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u);
}

// scale_and_max on AVX-512 (the scores rounded as the reference's).
DF_AVX512 float scale_max_avx512(float* s, int64_t n, float scale) {
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 y = mul_rounded(_mm512_maskz_loadu_ps(m, s + j), sc);
    _mm512_mask_storeu_ps(s + j, m, y);
    mx = _mm512_mask_max_ps(mx, m, mx, y);
  }
  return _mm512_reduce_max_ps(mx);
}

// s = exp(s - shift), kScaled: exp(scale * s rounded - shift), in place; returns the fp32 sum.
// kFused: as 2^(s c - shift log2(e)) in one fma (see fused_exp_ok), c = log2(e) or scale log2(e):
// that skips the rounding of scale * s and carries that of shift log2(e), an error the same for the
// whole row, at the level of shift's own fp32 rounding.
template <bool kScaled, bool kFused>
DF_AVX512 float exp_rows_avx512(float* s, int64_t n, float scale, float shift) {
  const __m512 sc = _mm512_set1_ps(scale), sh = _mm512_set1_ps(shift);
  const __m512 c = _mm512_set1_ps((kScaled ? scale : 1.f) * kLog2e), shc = _mm512_set1_ps(shift * kLog2e);
  const auto exp_of = [&](__m512 x) DF_AVX512 {
    if constexpr (kFused)
      return exp2_16_fp32(_mm512_fmsub_ps(x, c, shc));
    else
      return exp16(_mm512_sub_ps(kScaled ? mul_rounded(x, sc) : x, sh));
  };
  __m512 sum = _mm512_setzero_ps(), sum2 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {  // two independent sums; the tail below masked
    const __m512 x0 = _mm512_loadu_ps(s + j), x1 = _mm512_loadu_ps(s + j + 16);
    const __m512 e0 = exp_of(x0);
    const __m512 e1 = exp_of(x1);
    _mm512_storeu_ps(s + j, e0);
    _mm512_storeu_ps(s + j + 16, e1);
    sum = _mm512_add_ps(sum, e0);
    sum2 = _mm512_add_ps(sum2, e1);
  }
  sum = _mm512_add_ps(sum, sum2);
  for (; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e = exp_of(_mm512_maskz_loadu_ps(m, s + j));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// p[j] = bf16(exp(s[j] * scale - shift)); returns the fp32 sum of the exps. The fused exp where
// fused_exp_ok (as in softmax_row_avx512).
DF_AVX512 float exp_sum_to_bf16_avx512(const float* s, int64_t n, float scale, float shift, uint16_t* p) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 sh = _mm512_set1_ps(shift), sc = _mm512_set1_ps(scale);
  const __m512 c = _mm512_set1_ps(scale * kLog2e), shc = _mm512_set1_ps(shift * kLog2e);
  const bool fused = fused_exp_ok(scale, shift);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 x = _mm512_maskz_loadu_ps(m, s + j);
    const __m512 e = fused ? exp2_16(_mm512_fmsub_ps(x, c, shc)) : exp16(_mm512_sub_ps(mul_rounded(x, sc), sh));
    sum = _mm512_mask_add_ps(sum, m, sum, e);
    _mm256_mask_storeu_epi16(p + j, m, to_bf16x16(e));
  }
  return _mm512_reduce_add_ps(sum);
}

// One key's row of the backward, both elementwise passes in one: e = exp(s * scale - lse) in fp32,
// p = bf16(e), ds = bf16(e * (dp - delta)). Always inlined where n is a constant (the AMX kernel's
// full items): the loop and its tail masks then fold away.
DF_AVX512 inline __attribute__((always_inline)) void probs_and_grads_row_avx512(
    const float* s, const float* dp, int64_t n, float scale, const float* lse, const float* lse_log2e,
    const float* delta, uint16_t* p, uint16_t* ds) {
  const __m512 sc = _mm512_set1_ps(scale), c = _mm512_set1_ps(scale * kLog2e);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e =
        lse_log2e != nullptr
            ? exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + j), c, _mm512_maskz_loadu_ps(m, lse_log2e + j)))
            : exp16(_mm512_sub_ps(mul_rounded(_mm512_maskz_loadu_ps(m, s + j), sc), _mm512_maskz_loadu_ps(m, lse + j)));
    _mm256_mask_storeu_epi16(p + j, m, to_bf16x16(e));
    const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp + j), _mm512_maskz_loadu_ps(m, delta + j));
    _mm256_mask_storeu_epi16(ds + j, m, to_bf16x16(_mm512_mul_ps(e, g)));
  }
}

DF_AVX512 void probs_and_grads_to_bf16_avx512(const float* s, const float* dp, int64_t n, float scale,
                                              const float* lse, const float* lse_log2e, const float* delta,
                                              uint16_t* p, uint16_t* ds) {
  probs_and_grads_row_avx512(s, dp, n, scale, lse, lse_log2e, delta, p, ds);
}
#endif

#ifdef DF_HAVE_AVX512_PATH
constexpr int64_t kPrefetchRows = 8;

// RopeTables::rotate of one bf16 row (D a multiple of 64) into bf16 (rotate_bf16_row: what rope2d
// stores). The rows of one head lie a token stride apart (a few KiB: a page each), where the
// hardware prefetchers do not follow: the row kPrefetchRows strides ahead is fetched (a hint: past
// the end of the tensor is harmless).
DF_AVX512 void rotate_bf16_avx512(const uint16_t* src, int64_t row_stride, const RopeTables& rope, int64_t pos,
                                  uint16_t* out) {
  const int64_t q = rope.quarter;
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(src) + kPrefetchRows * row_stride * sizeof(uint16_t);
  for (int64_t b = 0; b < 4 * q * int64_t(sizeof(uint16_t)); b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T0);
  const int64_t i = pos / rope.wp, j = pos % rope.wp;
  rotate_bf16_row(src, out, &rope.cy[i * q], &rope.sy[i * q], &rope.cx[j * q], &rope.sx[j * q], q);
}
#endif

float scale_and_max(float* s, int64_t n, float scale) {
#ifdef DF_HAVE_AVX512_PATH
  if (cpu_has_avx512()) return scale_max_avx512(s, n, scale);
#endif
  scale_row(s, n, scale);
  return row_max(s, n);
}

float exp_shift_sum_row(float* s, int64_t n, float shift) {
#ifdef DF_HAVE_AVX512_PATH
  if (cpu_has_avx512())
    return fused_exp_ok(1.f, shift) ? exp_rows_avx512<false, true>(s, n, 1.f, shift)
                                    : exp_rows_avx512<false, false>(s, n, 1.f, shift);
#endif
  return exp_shift_sum(s, n, shift);
}

void scaled_exp_row(float* s, int64_t n, float scale, float shift) {
#ifdef DF_HAVE_AVX512_PATH
  if (cpu_has_avx512()) {
    if (fused_exp_ok(scale, shift))
      exp_rows_avx512<true, true>(s, n, scale, shift);
    else
      exp_rows_avx512<true, false>(s, n, scale, shift);
    return;
  }
#endif
  scale_row(s, n, scale);
  exp_shift_sum(s, n, shift);
}

#ifdef DF_HAVE_AVX512_PATH
// Register blocks of the fp32 kernels: kRows rows x kVecs 16-wide vectors of columns (24
// accumulators of the 32 registers; each step broadcasts kRows values and loads kVecs vectors).
constexpr int kFp32Rows = 6, kFp32Vecs = 4, kFp32Cols = 16 * kFp32Vecs;

// S rows [kRows] x kFp32Cols columns from Q rows (broadcast one dim at a time) and a packed K^T row.
// The finished dot products are multiplied by the scale (rounded, as the reference's scores) and
// each row's valid columns (valid[]) folded into its 16 running maxima, max16[r].
template <int kRows>
DF_AVX512 inline void scores_block(const float* q, int64_t ldq, const float* kt, int64_t ldkt, int64_t D, float scale,
                                   const __mmask16* valid, float* s, int64_t lds, float* max16) {
  __m512 acc[kRows][kFp32Vecs];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kFp32Vecs; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 b[kFp32Vecs];
    for (int c = 0; c < kFp32Vecs; ++c) b[c] = _mm512_loadu_ps(kt + d * ldkt + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      const __m512 a = _mm512_set1_ps(q[r * ldq + d]);
      for (int c = 0; c < kFp32Vecs; ++c) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < kRows; ++r) {
    __m512 mx = _mm512_setzero_ps();
    if (max16 != nullptr) mx = _mm512_loadu_ps(max16 + 16 * r);
    for (int c = 0; c < kFp32Vecs; ++c) {
      const __m512 y = mul_rounded(acc[r][c], sc);
      _mm512_storeu_ps(s + r * lds + 16 * c, y);
      mx = _mm512_mask_max_ps(mx, valid[c], mx, y);
    }
    if (max16 != nullptr) _mm512_storeu_ps(max16 + 16 * r, mx);
  }
}

// O rows [kRows] x kFp32Cols columns += P (element (r, j) at p[r * ldp + j * step]: P or, with
// ldp 1 and step its row stride, P^T; broadcast one j at a time) x V row j.
template <int kRows>
DF_AVX512 inline void pv_block(const float* p, int64_t ldp, int64_t step, int64_t N, const float* v, int64_t ldv,
                               float* o, int64_t ldo) {
  __m512 acc[kRows][kFp32Vecs];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kFp32Vecs; ++c) acc[r][c] = _mm512_loadu_ps(o + r * ldo + 16 * c);
  for (int64_t j = 0; j < N; ++j) {
    __m512 b[kFp32Vecs];
    for (int c = 0; c < kFp32Vecs; ++c) b[c] = _mm512_loadu_ps(v + j * ldv + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      const __m512 a = _mm512_set1_ps(p[r * ldp + j * step]);
      for (int c = 0; c < kFp32Vecs; ++c) acc[r][c] = _mm512_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kFp32Vecs; ++c) _mm512_storeu_ps(o + r * ldo + 16 * c, acc[r][c]);
}

// block<rows>(args...) for rows = min(kFp32Rows, rest) <= 6, the row count a compile-time constant.
#define DF_FP32_ROW_BLOCK(block, rows, ...)                 \
  switch (rows) {                                           \
    case 6: block<6>(__VA_ARGS__); break;                   \
    case 5: block<5>(__VA_ARGS__); break;                   \
    case 4: block<4>(__VA_ARGS__); break;                   \
    case 3: block<3>(__VA_ARGS__); break;                   \
    case 2: block<2>(__VA_ARGS__); break;                   \
    default: block<1>(__VA_ARGS__); break;                  \
  }

DF_AVX512 void scores_fp32_avx512(const float* q, int64_t ldq, int64_t M, const float* kt, int64_t N, int64_t D,
                                  float scale, float* s, int64_t lds, float* row_max) {
  const int64_t ldkt = packed_kt_ld(N);
  thread_local Buffer<float> max16;  // 16 running maxima per row: one horizontal max per row at the end
  if (row_max != nullptr) max16.assign(M * 16, -std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0; j0 < N; j0 += kFp32Cols) {  // one strip of K^T (16 KB at D 64) against every row
    __mmask16 valid[kFp32Vecs];
    for (int c = 0; c < kFp32Vecs; ++c) valid[c] = tail_mask(std::max<int64_t>(0, N - j0 - 16 * c));
    for (int64_t r0 = 0; r0 < M; r0 += kFp32Rows) {
      DF_FP32_ROW_BLOCK(scores_block, std::min<int64_t>(kFp32Rows, M - r0), q + r0 * ldq, ldq, kt + j0, ldkt, D,
                        scale, valid, s + r0 * lds + j0, lds, row_max != nullptr ? max16.data() + 16 * r0 : nullptr)
    }
  }
  if (row_max == nullptr) return;
  for (int64_t r = 0; r < M; ++r) row_max[r] = _mm512_reduce_max_ps(_mm512_loadu_ps(max16.data() + 16 * r));
}

DF_AVX512 void accumulate_pv_fp32_avx512(const float* p, int64_t ldp, int64_t step, int64_t M, const float* v,
                                         int64_t ldv, int64_t N, int64_t D, float* o, int64_t ldo) {
  for (int64_t r0 = 0; r0 < M; r0 += kFp32Rows)
    for (int64_t c0 = 0; c0 < D; c0 += kFp32Cols) {
      DF_FP32_ROW_BLOCK(pv_block, std::min<int64_t>(kFp32Rows, M - r0), p + r0 * ldp, ldp, step, N, v + c0, ldv,
                        o + r0 * ldo + c0, ldo)
    }
}
#endif

int64_t packed_kt_ld(int64_t N) { return round_up(N, 64); }

#ifdef DF_HAVE_AVX512_PATH
bool fp32_kernels(int64_t D) {
  return D % 64 == 0 && std::getenv("DINOFAST_CPU_ISA") == nullptr && cpu_has_avx512();
}

// X^T [D][packed_kt_ld(N)] from rows X [N][D] (row stride ldx), in 16 x 16 transposes.
void pack_transposed(const float* x, int64_t ldx, int64_t N, int64_t D, float* xt) {
  const int64_t ldkt = packed_kt_ld(N);
  for (int64_t j0 = 0; j0 < ldkt; j0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 16)
      transpose_block_avx512(reinterpret_cast<const uint32_t*>(x + j0 * ldx + d0), ldx,
                             std::clamp<int64_t>(N - j0, 0, 16), std::min<int64_t>(16, D - d0),
                             reinterpret_cast<uint32_t*>(xt + d0 * ldkt + j0), ldkt, /*full_rows=*/true);
}

void scores_fp32(const float* q, int64_t ldq, int64_t M, const float* kt, int64_t N, int64_t D, float scale, float* s,
                 int64_t lds, float* row_max) {
  scores_fp32_avx512(q, ldq, M, kt, N, D, scale, s, lds, row_max);
}

void accumulate_pv_fp32(const float* p, int64_t ldp, int64_t step, int64_t M, const float* v, int64_t ldv, int64_t N,
                        int64_t D, float* o, int64_t ldo) {
  accumulate_pv_fp32_avx512(p, ldp, step, M, v, ldv, N, D, o, ldo);
}
#else
bool fp32_kernels(int64_t) { return false; }  // the kernels below are never called then
void pack_transposed(const float*, int64_t, int64_t, int64_t, float*) {}
void scores_fp32(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float, float*, int64_t, float*) {}
void accumulate_pv_fp32(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*,
                        int64_t) {}
#endif

template <typename scalar_t>
constexpr bool kIsBf16 = std::is_same<scalar_t, at::BFloat16>::value;

// `return call;` where bf16 rows take the fused AVX-512 pass (bf16 on a CPU that has it).
#ifdef DF_HAVE_AVX512_PATH
#define DF_BF16_AVX512_RETURN(scalar_t, call) \
  if (kIsBf16<scalar_t> && cpu_has_avx512()) return call
#else
#define DF_BF16_AVX512_RETURN(scalar_t, call)
#endif

// P row of the forward: p = round(exp(s * scale - shift)) (s: dot products, clobbered); returns
// the fp32 sum of the exps.
template <typename scalar_t>
float exp_sum_to_lp(float* s, int64_t n, float scale, float shift, uint16_t* p) {
  DF_BF16_AVX512_RETURN(scalar_t, exp_sum_to_bf16_avx512(s, n, scale, shift, p));
  scale_row(s, n, scale);
  const float sum = exp_shift_sum(s, n, shift);
  round_row<scalar_t>(s, p, n);
  return sum;
}

// One key's rows of P^T and dS^T in the backward: p = round(exp(s * scale - lse)), ds = round(that
// fp32 exp * (dp - delta)) (s and dp clobbered). lse_log2e (lse * log2(e), or null): the bf16 path
// then computes the exp as 2^(s scale log2(e) - lse log2(e)), one fma and exp2_16 (see
// softmax_row_avx512 for why that is as accurate as P's bf16 rounding needs).
template <typename scalar_t>
void probs_and_grads_to_lp(float* s, float* dp, int64_t n, float scale, const float* lse, const float* lse_log2e,
                           const float* delta, uint16_t* p, uint16_t* ds) {
  DF_BF16_AVX512_RETURN(scalar_t, probs_and_grads_to_bf16_avx512(s, dp, n, scale, lse, lse_log2e, delta, p, ds));
  exp_scaled_minus(s, n, scale, lse);
  round_row<scalar_t>(s, p, n);
  softmax_grad_cols(s, dp, n, delta);
  round_row<scalar_t>(dp, ds, n);
}

// Rows [row0, row0 + n) of head h of x as scalar_t rows dst [n, D]: patch rows rotated in fp32 and
// rounded to scalar_t (exactly what rope2d stores), the others copied.
template <typename scalar_t>
void rows_lp(const scalar_t* x, Strides st, int64_t h, int64_t row0, int64_t n, int64_t D, uint16_t* dst,
             const RopeTables* rope, int64_t seg_start, int64_t P, float* tmp) {
#ifdef DF_HAVE_AVX512_PATH
  const bool vector_rope = kIsBf16<scalar_t> && rope != nullptr && D % 64 == 0 && cpu_has_avx512();
#else
  const bool vector_rope = false;
#endif
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* src = x + (row0 + r) * st.t + h * st.h;
    uint16_t* out = dst + r * D;
    const int64_t pos = row0 + r - seg_start - P;
    if (vector_rope && pos >= 0) {
#ifdef DF_HAVE_AVX512_PATH
      rotate_bf16_avx512(reinterpret_cast<const uint16_t*>(src), st.t, *rope, pos, out);
#endif
    } else if (rotated_row(src, D, rope, pos, tmp)) {
      round_row<scalar_t>(tmp, out, D);
    } else {
      std::memcpy(out, src, D * sizeof(uint16_t));
    }
  }
}

template <typename scalar_t>
const uint16_t* head_rows(const scalar_t* x, Strides st, int64_t h, int64_t row0) {
  return reinterpret_cast<const uint16_t*>(x + row0 * st.t + h * st.h);
}

// Rows [row0, row0 + n) of head h as a gemm's A operand: read in place (ld = the T stride), or, when
// `copy`, gathered into buf [n_alloc, D] (ld = D): patch rows RoPE-rotated, rows [n, n_alloc) zero.
template <typename scalar_t>
const uint16_t* gemm_rows(const scalar_t* x, Strides st, int64_t h, int64_t row0, int64_t n, int64_t n_alloc,
                          int64_t D, bool copy, const RopeTables* rope, int64_t seg_start, int64_t P,
                          Buffer<uint16_t>& buf, float* tmp, int64_t& ld) {
  if (!copy) {
    ld = st.t;
    return head_rows(x, st, h, row0);
  }
  buf.resize(n_alloc * D);
  rows_lp(x, st, h, row0, n, D, buf.data(), rope, seg_start, P, tmp);
  std::fill(buf.begin() + n * D, buf.begin() + n_alloc * D, uint16_t(0));
  ld = D;
  return buf.data();
}

// Per-thread state of the low-precision kernels; gives back the AMX tile state the brgemms set up
// when the thread is done.
struct LowPrecisionState {
  ~LowPrecisionState() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }
  RopeTables rope;
  Buffer<float> tmp;
};


// ------------------------------------------------------------------------------------------------
// bf16 forward on AMX tiles directly, where the CPU has AMX-BF16 and D is a multiple of 32: per 16
// queries and 64 keys, S = Q K^T in four 16x16 fp32 tiles, the online softmax on them with AVX-512,
// then O += P V in tiles (O in memory, four 16-column tiles at a time). The neighbouring blocks'
// tile products are issued between this block's softmax rows, so the AMX unit works while the
// vector units compute exps: a brgemm call returns only when its products are done, so the two
// could not overlap.
// The backward's S^T and dP^T (D = 64) run the same way. DINOFAST_CPU_ISA=avx512 (or lower) turns
// both off (tests run both ways).
// ------------------------------------------------------------------------------------------------
#ifdef DF_HAVE_AVX512_PATH
#define DF_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
// Always inlined: called with a constant step number, a step's branches and register switch fold away.
#define DF_AMX_INLINE DF_AMX inline __attribute__((always_inline))

bool cpu_has_amx_bf16() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!cpu_has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    // Linux hands out the tile register state on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

bool use_amx_tiles(int64_t D) {
  const char* cap = std::getenv("DINOFAST_CPU_ISA");
  return D % 32 == 0 && cap == nullptr && cpu_has_amx_bf16();
}

// Every tile 16 rows of 64 bytes: tiles 0-3 accumulate (S or O), 4 and 7 hold A, 5 and 6 hold B.
// A and B alternate between two tiles: a load into a tile waits until the product reading it is
// done, so one B tile would serialise every load behind the previous product.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

constexpr int64_t kAmxRows = 16, kAmxKeys = 64, kAmxChunk = 64;

// Accumulator tile j += tile a (A) x B loaded into tile t from b (row stride 256 B: the packed-B
// layout); tile j stored to its 16 columns of c. Macros: the tile intrinsics take literal registers.
#define DF_AMX_MADD(j, a, t, b)         \
  do {                                  \
    _tile_loadd(t, (b), 4 * kPackN);    \
    _tile_dpbf16ps(j, a, t);            \
  } while (0)
#define DF_AMX_STORE(j, c, ldc_bytes) _tile_stored(j, (c) + 16 * j, (ldc_bytes))

// The online softmax of one row of a 16 x 64 block of dot products s (columns past n_keys masked
// by valid unless full): p = bf16(e^(scale s - m)) computed as 2^(s c - m log2(e)), c = scale
// log2(e), in one fma per 16 scores, with the fp32 powers summed into the row's 16 lanes of l16
// (reduced once, at the end: no horizontal sum per block). The shift m is in the reference's units
// (scale * s rounded: the row max rounds like the reference's, as rounding is monotone and
// scale > 0). Against the reference's (scale s - m) log2(e), the fma's exponent skips the rounding of
// scale s (a relative 6e-8) and carries that of m log2(e), the same for the whole row and at the
// level of m's own fp32 rounding in lse = m + log(l): far below the 3.9e-3 at which P rounds to
// bf16. Past |m| = 1e30, or for a scale whose c overflows, the reference's order runs instead
// (scale s rounded, minus m, times log2(e)), so that infinities and overflows come out as they do
// there. The shift m (the row's max so far) moves only when a score passes it by more than 8 (so
// p <= e^8, far from bf16's range limits); then the row of O and of l16 are rescaled. Most blocks
// only compare their max. A NaN score makes its row NaN whether or not the max sees it (the shift
// is then either NaN or left alone, and the NaN power reaches O and l16).
DF_AMX_INLINE void softmax_row_avx512(const float* srow, bool full, const __mmask16* valid, float scale, float& m,
                                      float* l, float* orow, int64_t D, uint16_t* prow) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const __m512 ninf = _mm512_set1_ps(-kInf);
  __m512 x[4];
  for (int i = 0; i < 4; ++i)
    x[i] = full ? _mm512_loadu_ps(srow + 16 * i) : _mm512_mask_loadu_ps(ninf, valid[i], srow + 16 * i);
  const __m512 top = mul_rounded(_mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3])),
                                 _mm512_set1_ps(scale));
  if (_mm512_cmp_ps_mask(top, _mm512_set1_ps(m + 8.f), _CMP_GT_OQ) != 0 || m == -kInf) {
    const float mb = _mm512_reduce_max_ps(top);
    const float alpha = m == -kInf ? 0.f : std::exp(m - mb);
    scale_row(l, 16, alpha);
    scale_row(orow, D, alpha);
    m = mb;
  }
  __m512 e[4];  // masked columns: -inf, p = 0
  if (fused_exp_ok(scale, m)) {
    const __m512 cv = _mm512_set1_ps(scale * kLog2e), shift = _mm512_set1_ps(m * kLog2e);
    for (int i = 0; i < 4; ++i) e[i] = exp2_16(_mm512_fmsub_ps(x[i], cv, shift));
  } else {
    const __m512 sc = _mm512_set1_ps(scale), shift = _mm512_set1_ps(m), log2e = _mm512_set1_ps(kLog2e);
    for (int i = 0; i < 4; ++i) e[i] = exp2_16(_mm512_mul_ps(_mm512_sub_ps(mul_rounded(x[i], sc), shift), log2e));
  }
  _mm512_storeu_ps(l, _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(l), _mm512_add_ps(e[0], e[1])), _mm512_add_ps(e[2], e[3])));
  for (int i = 0; i < 4; i += 2)
    _mm512_storeu_si512(prow + 16 * i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e[i + 1], e[i])));
}

DF_AMX inline void key_masks(int64_t n_keys, __mmask16* valid) {
  for (int i = 0; i < 4; ++i) valid[i] = tail_mask(std::max<int64_t>(0, n_keys - 16 * i));
}

// S = Q K^T and O += P V as steps of one or two tile instructions, so that they can be spread
// between the rows of a softmax (the core keeps only a few hundred instructions in flight: tile
// products issued in one run stall the vector work behind them once that window fills).
// Accumulator j += A (tile 4 or 7) x B (tile 5 for even j, 6 for odd): a runtime choice among the
// literal registers the intrinsics need.
DF_AMX_INLINE void amx_madd(int j, int a, const uint16_t* b) {
  switch (2 * j + (a == 7)) {
    case 0: DF_AMX_MADD(0, 4, 5, b); break;
    case 1: DF_AMX_MADD(0, 7, 5, b); break;
    case 2: DF_AMX_MADD(1, 4, 6, b); break;
    case 3: DF_AMX_MADD(1, 7, 6, b); break;
    case 4: DF_AMX_MADD(2, 4, 5, b); break;
    case 5: DF_AMX_MADD(2, 7, 5, b); break;
    case 6: DF_AMX_MADD(3, 4, 6, b); break;
    default: DF_AMX_MADD(3, 7, 6, b); break;
  }
}

DF_AMX_INLINE void amx_load_a(int a, const uint16_t* x, int64_t stride_bytes) {
  if (a == 4)
    _tile_loadd(4, x, stride_bytes);
  else
    _tile_loadd(7, x, stride_bytes);
}

// Accumulators j < tiles stored to (store) or loaded from their 16 columns of c, two per step.
DF_AMX_INLINE void amx_move_pair(bool store, int first, int tiles, float* c, int64_t ldc_bytes) {
  if (first == 0) {
    if (store) DF_AMX_STORE(0, c, ldc_bytes); else _tile_loadd(0, c, ldc_bytes);
    if (tiles > 1) { if (store) DF_AMX_STORE(1, c, ldc_bytes); else _tile_loadd(1, c + 16, ldc_bytes); }
  } else {
    if (tiles > 2) { if (store) DF_AMX_STORE(2, c, ldc_bytes); else _tile_loadd(2, c + 32, ldc_bytes); }
    if (tiles > 3) { if (store) DF_AMX_STORE(3, c, ldc_bytes); else _tile_loadd(3, c + 48, ldc_bytes); }
  }
}

// S [16][64] (fp32) = the 16 queries at q (row stride ldq) against the 64 keys of packed K^T block
// kblk: a zeroing step, four products per 32 dims (A alternating between tiles 4 and 7), two stores.
constexpr int score_steps(int64_t D) { return int(4 * (D / 32) + 3); }

DF_AMX_INLINE void amx_scores_step(int k, const uint16_t* q, int64_t ldq, const uint16_t* kblk, int64_t D, float* s) {
  const int products = int(4 * (D / 32));
  if (k == 0) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    amx_load_a(4, q, ldq * 2);
  } else if (k <= products) {
    const int t = (k - 1) / 4, j = (k - 1) % 4, a = t % 2 != 0 ? 7 : 4;
    amx_madd(j, a, kblk + 16 * t * 2 * kPackN + 32 * j);
    if (j == 3 && t + 1 < products / 4) amx_load_a(11 - a, q + 32 * (t + 1), ldq * 2);  // the other A tile
  } else {
    amx_move_pair(/*store=*/true, k == products + 1 ? 0 : 2, 4, s, 4 * kAmxKeys);
  }
}

// O [16][D] += P [16][64] (bf16) V, V's 64 rows from pair kp0 of the packed-V blocks (v: that pair
// of block 0, blocks v_block_stride apart): per 64 columns of O, two load steps, eight products
// (two of 32 keys per tile, P in tiles 4 and 7), two stores.
constexpr int accumulate_steps(int64_t D) { return int(12 * ((D + kPackN - 1) / kPackN)); }

DF_AMX_INLINE void amx_accumulate_step(int k, const uint16_t* p, const uint16_t* v, int64_t v_block_stride, int64_t D,
                                       float* o) {
  const int64_t c0 = (k / 12) * kPackN;
  const int kk = k % 12, tiles = int(std::min<int64_t>(4, (D - c0) / 16));
  float* oc = o + c0;
  if (kk < 2) {
    amx_move_pair(/*store=*/false, 2 * kk, tiles, oc, D * 4);
    if (kk == 1) amx_load_a(4, p, 2 * kAmxKeys);
  } else if (kk < 10) {
    const int j = (kk - 2) % 4, half = (kk - 2) / 4;
    if (j < tiles) amx_madd(j, half != 0 ? 7 : 4, v + (c0 / kPackN) * v_block_stride + half * 16 * 2 * kPackN + 32 * j);
    if (kk == 5) amx_load_a(7, p + 32, 2 * kAmxKeys);
  } else {
    amx_move_pair(/*store=*/true, kk == 10 ? 0 : 2, tiles, oc, D * 4);
  }
}

// An item of 16 rows unrolled: row R's elementwise work (item.row<R>()), then its share of the
// item's Item::kTotal tile steps (item.step<K>()), all at compile time. Every step's tile registers
// are then literals: no dispatch between the rows, whose scalar work would otherwise compete with the
// vector work for the ports.
template <int From, int To, class Item>
DF_AMX_INLINE void issue_steps(const Item& item) {
  if constexpr (From < To) {
    item.template step<From>();
    issue_steps<From + 1, To>(item);
  }
}

template <class Item, int... R>
DF_AMX_INLINE void run_unrolled(const Item& item, std::integer_sequence<int, R...>) {
  ((item.template row<R>(), issue_steps<Item::kTotal * R / kAmxRows, Item::kTotal * (R + 1) / kAmxRows>(item)), ...);
}

template <class Item>
DF_AMX_INLINE void run_unrolled(const Item& item) {
  run_unrolled(item, std::make_integer_sequence<int, int(kAmxRows)>{});
}

// One item of the pipeline below in the common case, for run_unrolled: 16 rows, D = kD (64 or 128:
// the head dims of DINOv3's models), and both neighbours' steps to issue (items i-1 and i+1 exist);
// S before P V, as in the general loop.
template <int64_t kD>
struct FullItem {
  static constexpr int kScore = score_steps(kD), kTotal = score_steps(kD) + accumulate_steps(kD);
  const float* s_cur;
  uint16_t* p_cur;
  const __mmask16* valid;
  bool full;
  float scale;
  float *m, *l16, *o;  // at the item's first row
  const uint16_t *q_next, *kblk_next, *p_prev, *v_prev;
  int64_t ldq, v_block_stride;
  float *s_next, *o_prev;

  template <int K>
  DF_AMX_INLINE void step() const {
    if constexpr (K < kScore)
      amx_scores_step(K, q_next, ldq, kblk_next, kD, s_next);
    else
      amx_accumulate_step(K - kScore, p_prev, v_prev, v_block_stride, kD, o_prev);
  }
  template <int R>
  DF_AMX_INLINE void row() const {
    softmax_row_avx512(s_cur + R * kAmxKeys, full, valid, scale, m[R], l16 + 16 * R, o + R * kD, kD,
                       p_cur + R * kAmxKeys);
  }
};

// One query tile (M rows at q, row stride ldq; rows up to M rounded to 16 readable, zero past M)
// against one key tile of N keys, K^T and V packed as for gemm_packed (V blocks v_block_stride
// apart): updates O [M][D] (fp32, rows up to M rounded to 16 writable), the shifts m and the sums
// l16 (16 lanes per row). Software-pipelined: the (key block, group of 16 queries) items of 64
// queries run in sequence, and while item i's softmax runs row by row, item i+1's S and item
// i-1's P V are issued between its rows. s_buf (fp32) and p_buf (bf16) hold two 16 x 64 items each.
DF_AMX void attend_tile_amx(const uint16_t* q, int64_t ldq, int64_t M, const uint16_t* kpack, const uint16_t* vpack,
                            int64_t v_block_stride, int64_t N, int64_t D, float scale, float* o, float* m, float* l16,
                            float* s_buf, uint16_t* p_buf) {
  constexpr int64_t kTile = kAmxRows * kAmxKeys;
  const int n_score = score_steps(D), n_accumulate = accumulate_steps(D);
  const int64_t n_blocks = (N + kAmxKeys - 1) / kAmxKeys;
  for (int64_t c0 = 0; c0 < M; c0 += kAmxChunk) {
    const int64_t n_groups = (std::min(kAmxChunk, M - c0) + kAmxRows - 1) / kAmxRows, n_items = n_blocks * n_groups;
    const auto g0_of = [&](int64_t i) { return c0 + (i % n_groups) * kAmxRows; };
    const auto kblk_of = [&](int64_t i) { return kpack + (i / n_groups) * D * kPackN; };
    const auto v_of = [&](int64_t i) { return vpack + (i / n_groups) * kAmxKeys / 2 * 2 * kPackN; };
    for (int k = 0; k < n_score; ++k) amx_scores_step(k, q + g0_of(0) * ldq, ldq, kblk_of(0), D, s_buf);
    for (int64_t i = 0; i < n_items; ++i) {
      const int64_t g0 = g0_of(i), rows = std::min(kAmxRows, M - g0);
      const float* s_cur = s_buf + (i % 2) * kTile;
      uint16_t* p_cur = p_buf + (i % 2) * kTile;
      __mmask16 valid[4];
      const int64_t n_keys = std::min(kAmxKeys, N - (i / n_groups) * kAmxKeys);
      const bool full = n_keys == kAmxKeys;
      key_masks(n_keys, valid);
      const int64_t next = std::min(i + 1, n_items - 1), prev = std::max<int64_t>(i - 1, 0);
      int ks = i + 1 < n_items ? 0 : n_score, ka = i > 0 ? 0 : n_accumulate;  // steps left to issue
      const uint16_t* q_next = q + g0_of(next) * ldq;
      const uint16_t* kblk_next = kblk_of(next);
      float* s_next = s_buf + (next % 2) * kTile;
      const uint16_t* p_prev = p_buf + (prev % 2) * kTile;
      const uint16_t* v_prev = v_of(prev);
      float* o_prev = o + g0_of(prev) * D;
      if (ka == 0 && n_groups == 1)  // item i-1 is this group's previous block: its O first, whole
        for (; ka < n_accumulate; ++ka) amx_accumulate_step(ka, p_prev, v_prev, v_block_stride, D, o_prev);
      if ((D == 64 || D == 128) && rows == kAmxRows && ks == 0 && ka == 0) {
        if (D == 64)
          run_unrolled(FullItem<64>{s_cur, p_cur, valid, full, scale, m + g0, l16 + 16 * g0, o + g0 * D, q_next,
                                    kblk_next, p_prev, v_prev, ldq, v_block_stride, s_next, o_prev});
        else
          run_unrolled(FullItem<128>{s_cur, p_cur, valid, full, scale, m + g0, l16 + 16 * g0, o + g0 * D, q_next,
                                     kblk_next, p_prev, v_prev, ldq, v_block_stride, s_next, o_prev});
        continue;
      }
      const int total = (n_score - ks) + (n_accumulate - ka);
      int issued = 0;
      for (int64_t r = 0; r < kAmxRows; ++r) {
        if (r < rows)
          softmax_row_avx512(s_cur + r * kAmxKeys, full, valid, scale, m[g0 + r], l16 + 16 * (g0 + r),
                             o + (g0 + r) * D, D, p_cur + r * kAmxKeys);
        else
          std::memset(p_cur + r * kAmxKeys, 0, kAmxKeys * sizeof(uint16_t));
        // S before P V: P V's O loads reuse the tiles S stores from
        for (const int until = int(total * (r + 1) / kAmxRows); issued < until; ++issued) {
          if (ks < n_score)
            amx_scores_step(ks++, q_next, ldq, kblk_next, D, s_next);
          else
            amx_accumulate_step(ka++, p_prev, v_prev, v_block_stride, D, o_prev);
        }
      }
    }
    const int64_t last = n_items - 1;
    for (int k = 0; k < n_accumulate; ++k)
      amx_accumulate_step(k, p_buf + (last % 2) * kTile, v_of(last), v_block_stride, D, o + g0_of(last) * D);
  }
}

// Backward, D = 64: the rows of P^T and dS^T (bf16, row stride ld_out) of N keys against M
// queries. S^T = K Q^T and dP^T = V dO^T run in tiles, 16 keys x 64 queries at a time (K, V: rows
// of 64, zero past N up to a multiple of 16; Q^T, dO^T packed by pack_b_transposed), and the next
// block's products are issued between the rows of this block's elementwise pass, as in the
// forward. s_buf: 4 x 16 x 64 floats (S^T and dP^T of two blocks).
DF_AMX_INLINE void bwd_scores_step(int k, const uint16_t* k_rows, const uint16_t* v_rows, const uint16_t* qt_blk,
                                   const uint16_t* gt_blk, float* s) {
  constexpr int64_t D = 64;
  if (k < score_steps(D))
    amx_scores_step(k, k_rows, D, qt_blk, D, s);
  else
    amx_scores_step(k - score_steps(D), v_rows, D, gt_blk, D, s + kAmxRows * kAmxKeys);
}

// One item of probs_and_grads_amx_d64 in the common case, for run_unrolled: 16 keys, 64
// queries, and the next item's S^T and dP^T steps to issue.
struct BwdFullItem {
  static constexpr int kTotal = 2 * score_steps(64);
  const float *s, *lse, *lse_log2e, *delta;  // at the item's first key row / query column
  uint16_t *pt, *dst;
  int64_t ld_out;
  float scale;
  const uint16_t *k_next, *v_next, *qt_next, *gt_next;
  float* s_next;

  template <int K>
  DF_AMX_INLINE void step() const {
    bwd_scores_step(K, k_next, v_next, qt_next, gt_next, s_next);
  }
  template <int R>
  DF_AMX_INLINE void row() const {
    probs_and_grads_row_avx512(s + R * kAmxKeys, s + kAmxRows * kAmxKeys + R * kAmxKeys, kAmxKeys, scale, lse,
                               lse_log2e, delta, pt + R * ld_out, dst + R * ld_out);
  }
};

DF_AMX void probs_and_grads_amx_d64(const uint16_t* k, const uint16_t* v, int64_t N, const uint16_t* qt_pack,
                                    const uint16_t* gt_pack, int64_t M, float scale, const float* lse,
                                    const float* lse_log2e, const float* delta, float* s_buf, uint16_t* pt,
                                    uint16_t* dst, int64_t ld_out) {
  constexpr int64_t D = 64, kTile = kAmxRows * kAmxKeys;
  // item i: key group i % n_groups of query block i / n_groups (a block's Q^T, dO^T tiles stay in L1)
  const int64_t n_groups = (N + kAmxRows - 1) / kAmxRows, n_items = n_groups * ((M + kAmxKeys - 1) / kAmxKeys);
  const auto rows_of = [&](const uint16_t* x, int64_t i) { return x + (i % n_groups) * kAmxRows * D; };
  const auto block_of = [&](const uint16_t* pack, int64_t i) { return pack + (i / n_groups) * D * kPackN; };
  for (int step = 0; step < 2 * score_steps(D); ++step)
    bwd_scores_step(step, rows_of(k, 0), rows_of(v, 0), block_of(qt_pack, 0), block_of(gt_pack, 0), s_buf);
  for (int64_t i = 0; i < n_items; ++i) {
    const int64_t g0 = (i % n_groups) * kAmxRows, c0 = (i / n_groups) * kAmxKeys;
    const int64_t rows = std::min(kAmxRows, N - g0), cols = std::min(kAmxKeys, M - c0);
    const float* s = s_buf + (i % 2) * 2 * kTile;
    const int64_t next = std::min(i + 1, n_items - 1);
    const uint16_t *k_next = rows_of(k, next), *v_next = rows_of(v, next);
    const uint16_t *qt_next = block_of(qt_pack, next), *gt_next = block_of(gt_pack, next);
    float* s_next = s_buf + (next % 2) * 2 * kTile;
    const int total = i + 1 < n_items ? 2 * score_steps(D) : 0;
    if (rows == kAmxRows && cols == kAmxKeys && total == BwdFullItem::kTotal) {
      run_unrolled(BwdFullItem{s, lse + c0, offset_or_null(lse_log2e, c0), delta + c0,
                               pt + g0 * ld_out + c0, dst + g0 * ld_out + c0, ld_out, scale, k_next, v_next, qt_next,
                               gt_next, s_next});
      continue;
    }
    int issued = 0;
    for (int64_t r = 0; r < rows; ++r) {
      probs_and_grads_to_bf16_avx512(s + r * kAmxKeys, s + kTile + r * kAmxKeys, cols, scale, lse + c0,
                                     offset_or_null(lse_log2e, c0), delta + c0,
                                     pt + (g0 + r) * ld_out + c0, dst + (g0 + r) * ld_out + c0);
      for (const int until = int(total * (r + 1) / rows); issued < until; ++issued)
        bwd_scores_step(issued, k_next, v_next, qt_next, gt_next, s_next);
    }
  }
}

// Sets this thread's tile configuration for attend_tile_amx. torch's brgemm remembers the kernel
// whose configuration it loaded last: releasing it first makes its next call load its own again.
DF_AMX void amx_begin() {
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  static const TileConfig cfg;
  _tile_loadconfig(&cfg);
}

DF_AMX void amx_end() { _tile_release(); }
#else
bool use_amx_tiles(int64_t) { return false; }
#endif

struct FwdLpState : LowPrecisionState {
  Buffer<uint16_t> q, k, kpack, vpack, p;
  Buffer<float> s, o, m, l;
#ifdef DF_HAVE_AVX512_PATH
  bool tiles = false;  // this thread's AMX tiles configured for attend_tile_amx
  ~FwdLpState() {
    if (tiles) amx_end();
  }
#endif
};

template <typename scalar_t>
void forward_cpu_lp(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse, const std::vector<std::pair<int64_t, int64_t>>& segs, const RopeInput& ri) {
  const int64_t D = p.D, P = p.num_prefix_tokens;
  const FwdPointers<scalar_t> t(q, k, v, out, lse);
  const scalar_t *qp = t.q, *kp = t.k, *vp = t.v;
  scalar_t* op = t.out;
  float* lp = t.lse;
  const Strides sq = t.sq, sk = t.sk, sv = t.sv, so = t.so;
  const int64_t n_dblocks = (D + kPackN - 1) / kPackN;
  std::vector<Task> tasks = forward_tasks(p, segs);
  const bool amx = kIsBf16<scalar_t> && use_amx_tiles(D);
  run_tasks<FwdLpState>(tasks, [&](const Task& task, FwdLpState& st) {
    const int64_t start = segs[task.seg].first, end = segs[task.seg].second, h = task.head, R = task.rows;
#ifdef DF_HAVE_AVX512_PATH
    if (amx && !st.tiles) {
      amx_begin();
      st.tiles = true;
    }
#endif
    st.tmp.resize(D);
    st.kpack.resize(kBlockK * D);
    st.vpack.resize(n_dblocks * kBlockK * kPackN);
    st.p.resize(kBlockQ * kLdP);
    st.s.resize(kBlockQ * kLdS);
    const int64_t Rp = round_up(R, kPadM);  // the gemms run on Rp rows; rows >= R are dropped
    st.o.assign(Rp * D, 0.f);
    st.m.assign(R, -std::numeric_limits<float>::infinity());
    st.l.assign(amx ? 16 * R : R, 0.f);  // the AMX forward sums each row in 16 lanes
    const RopeTables* rope = tables_for(st.rope, p, ri, task.seg);
    // Q (A operand) is read in place unless RoPE rotates it or its last tile's pad rows [R, Rp) would
    // run past the tensor's last token: pad rows only make rows of S, P and O that are never used
    int64_t ldq;
    const bool copy_q = rope != nullptr || task.row0 + Rp > p.T;
    const uint16_t* qrows = gemm_rows(qp, sq, h, task.row0, R, Rp, D, copy_q, rope, start, P, st.q, st.tmp.data(), ldq);
    float* S = st.s.data();
    uint16_t* Pm = st.p.data();
    for (int64_t k0 = start; k0 < end; k0 += kBlockK) {
      const int64_t N = std::min(kBlockK, end - k0), Np = round_up(N, kPadK);
      int64_t ldk;
      const uint16_t* krows =
          gemm_rows(kp, sk, h, k0, N, N, D, rope != nullptr, rope, start, P, st.k, st.tmp.data(), ldk);
      pack_b_transposed(krows, ldk, N, D, st.kpack.data());                            // K^T
      pack_b_rows(head_rows(vp, sv, h, k0), sv.t, N, D, st.vpack.data(), Np * kPackN, Np);  // V
      for (int64_t b0 = 0; b0 < R; b0 += kBlockQ) {  // each query tile against this K/V tile
        const int64_t M = std::min(kBlockQ, R - b0), Mp = round_up(M, kPadM);
        float* o = st.o.data() + b0 * D;
        float* m = st.m.data() + b0;
        float* l = st.l.data() + b0;
#ifdef DF_HAVE_AVX512_PATH
        if (amx) {
          attend_tile_amx(qrows + b0 * ldq, ldq, M, st.kpack.data(), st.vpack.data(), Np * kPackN, N, D, p.scale,
                          o, m, st.l.data() + 16 * b0, S, Pm);
          continue;
        }
#endif
        gemm_packed<scalar_t>(Mp, N, D, qrows + b0 * ldq, ldq, st.kpack.data(), D * kPackN, S, kLdS, false,
                              true);
        for (int64_t r = 0; r < M; ++r) {  // online softmax; P rounded to scalar_t for the P V gemm
          float* srow = S + r * kLdS;
          // max of the scores = scale * (max of the dots): rounding is monotone and scale > 0
          const float m_new = std::max(m[r], row_max(srow, N) * p.scale);
          const float alpha = m[r] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(m[r] - m_new);
          l[r] = l[r] * alpha + exp_sum_to_lp<scalar_t>(srow, N, p.scale, m_new, Pm + r * kLdP);
          if (alpha != 1.f) scale_row(o + r * D, D, alpha);
          m[r] = m_new;
          std::memset(Pm + r * kLdP + N, 0, (Np - N) * sizeof(uint16_t));  // meet V's zero pad rows
        }
        gemm_packed<scalar_t>(Mp, D, Np, Pm, kLdP, st.vpack.data(), Np * kPackN, o, D, true);  // O += P V
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const float l = amx ? std::accumulate(st.l.begin() + 16 * r, st.l.begin() + 16 * r + 16, 0.f) : st.l[r];
      scale_row(st.o.data() + r * D, D, 1.f / l);
      lp[h * p.T + task.row0 + r] = st.m[r] + std::log(l);
    }
    store_rows(op, so, h, task.row0, R, D, st.o.data(), nullptr, start, 0);
  });
}

// dQ [L][D] from the dQ^T tiles [tile][D][kLdSBwd] (kBlockBwd rows of dQ per tile).
void transpose_tiles(const float* dqt, int64_t L, int64_t D, float* dq) {
  for (int64_t t0 = 0; t0 < L; t0 += kBlockBwd) {
    const float* tile = dqt + (t0 / kBlockBwd) * D * kLdSBwd;
    const int64_t rows = std::min(kBlockBwd, L - t0);
#ifdef DF_HAVE_AVX512_PATH
    if (cpu_has_avx512()) {
      for (int64_t d0 = 0; d0 < D; d0 += 16)
        for (int64_t r0 = 0; r0 < rows; r0 += 16)
          transpose_block_avx512(reinterpret_cast<const uint32_t*>(tile + d0 * kLdSBwd + r0), kLdSBwd,
                                 std::min<int64_t>(16, D - d0), std::min<int64_t>(16, rows - r0),
                                 reinterpret_cast<uint32_t*>(dq + (t0 + r0) * D + d0), D, /*full_rows=*/false);
      continue;
    }
#endif
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < rows; ++r) dq[(t0 + r) * D + d] = tile[d * kLdSBwd + r];
  }
}

struct BwdLpState : LowPrecisionState {
  Buffer<uint16_t> q, k, v, kt, qt_pack, gt_pack, g_pack, q_pack, pt, dst, ds_pack;
  Buffer<float> delta, dqt, dq, dk, dv, s, dp, amx_s, lse_log2e;
};

// Backward in key-major form, so that P^T and dS^T come out of the elementwise passes as row-major A
// operands: per (key tile, query tile), with N keys and M queries,
//   S^T = K Q^T, P^T = exp(scale S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//   dK += dS^T Q, dQ^T += K^T dS^T; dK and dQ take the softmax scale once, at the end.
template <typename scalar_t>
void backward_cpu_lp(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                     at::Tensor& dk, at::Tensor& dv, const std::vector<std::pair<int64_t, int64_t>>& segs,
                     const RopeInput& ri) {
  const int64_t D = p.D, B = kBlockBwd, P = p.num_prefix_tokens;
  const BwdPointers<scalar_t> t(dout, q, k, v, out, lse, dq, dk, dv);
  const scalar_t *qp = t.q, *kp = t.k, *vp = t.v, *gp = t.dout, *op = t.out;
  const float* lp = t.lse;
  scalar_t *dqp = t.dq, *dkp = t.dk, *dvp = t.dv;
  const Strides sq = t.sq, sk = t.sk, sv = t.sv, sg = t.sg, so = t.so, sdq = t.sdq, sdk = t.sdk, sdv = t.sdv;
  const int64_t n_dblocks = (D + kPackN - 1) / kPackN;
  std::vector<Task> tasks = backward_tasks(p, segs);
  const bool amx = kIsBf16<scalar_t> && D == 64 && use_amx_tiles(D);  // S^T, dP^T on AMX tiles of its own
  run_tasks<BwdLpState>(tasks, [&](const Task& task, BwdLpState& st) {
    const int64_t start = task.row0, L = task.rows, h = task.head;
    const int64_t Lp = round_up(L, kPadK);  // rows [L, Lp) of the copies and packs are zero
    const int64_t n_lblocks = (L + kPackN - 1) / kPackN;
    st.tmp.resize(D);
    RopeTables* rope = tables_for(st.rope, p, ri, task.seg);
    // K and V (A operands) copied with zero pad rows; Q (RoPE) rotated; dO read in place
    int64_t ldq;
    const uint16_t* qrows =
        gemm_rows(qp, sq, h, start, L, L, D, rope != nullptr, rope, start, P, st.q, st.tmp.data(), ldq);
    const uint16_t* grows = head_rows(gp, sg, h, start);
    st.k.assign(Lp * D, 0);
    st.v.assign(Lp * D, 0);
    rows_lp(kp, sk, h, start, L, D, st.k.data(), rope, start, P, st.tmp.data());
    rows_lp(vp, sv, h, start, L, D, st.v.data(), nullptr, start, 0, st.tmp.data());
    const uint16_t *krows = st.k.data(), *vrows = st.v.data();
    // B operands shared by every tile pair of the task, and K^T as the A operand of dQ^T
    st.qt_pack.resize(n_lblocks * D * kPackN);
    st.gt_pack.resize(n_lblocks * D * kPackN);
    st.q_pack.resize(n_dblocks * Lp * kPackN);
    st.g_pack.resize(n_dblocks * Lp * kPackN);
    pack_b_transposed(qrows, ldq, L, D, st.qt_pack.data());
    pack_b_transposed(grows, sg.t, L, D, st.gt_pack.data());
    pack_b_rows(qrows, ldq, L, D, st.q_pack.data(), Lp * kPackN, Lp);
    pack_b_rows(grows, sg.t, L, D, st.g_pack.data(), Lp * kPackN, Lp);
    // K^T and the dQ^T accumulator in [tile][D][B] blocks: fixed leading dims whatever L is
    const int64_t n_tiles = (L + B - 1) / B;
    st.kt.assign(n_tiles * D * kLdPBwd, 0);
    for (int64_t t0 = 0; t0 < L; t0 += B)  // each tile's K^T row by row: contiguous stores
      for (int64_t d = 0; d < D; ++d) {
        uint16_t* ktrow = st.kt.data() + (t0 / B) * D * kLdPBwd + d * kLdPBwd;
        for (int64_t r = t0; r < std::min(L, t0 + B); ++r) ktrow[r - t0] = krows[r * D + d];
      }
    st.delta.resize(L);
    for (int64_t r = 0; r < L; ++r) {  // delta = rowsum(dO * O), from the stored (rounded) O
      const scalar_t* orow = op + (start + r) * so.t + h * so.h;
      const scalar_t* grow = gp + (start + r) * sg.t + h * sg.h;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += static_cast<float>(grow[d]) * static_cast<float>(orow[d]);
      st.delta[r] = acc;
    }
    st.dqt.assign(n_tiles * D * kLdSBwd, 0.f);
    st.dk.assign(Lp * D, 0.f);
    st.dv.assign(Lp * D, 0.f);
    st.s.resize(B * kLdSBwd);
    st.dp.resize(B * kLdSBwd);
    st.pt.resize(B * kLdPBwd);
    st.dst.resize(B * kLdPBwd);
    st.ds_pack.resize((B / kPackN) * B * kPackN);
    if (amx) st.amx_s.resize(4 * kAmxRows * kAmxKeys);
    const float* lse_row = lp + h * p.T + start;
    // lse * log2(e) for the fused exp of the bf16 elementwise pass, where no lse or scale is so large
    // that the fused form could overflow (else null: the reference's order)
    const float* lse_log2e = nullptr;
    if (kIsBf16<scalar_t> &&
        std::all_of(lse_row, lse_row + L, [&](float x) { return fused_exp_ok(p.scale, x); })) {
      st.lse_log2e.resize(L);
      for (int64_t r = 0; r < L; ++r) st.lse_log2e[r] = lse_row[r] * kLog2e;
      lse_log2e = st.lse_log2e.data();
    }
    float *S = st.s.data(), *dP = st.dp.data();
    uint16_t *Pt = st.pt.data(), *dSt = st.dst.data();
    for (int64_t k0 = 0; k0 < L; k0 += B) {
      const int64_t N = std::min(B, L - k0), Nm = round_up(N, kPadM), Nk = round_up(N, kPadK);
      for (int64_t q0 = 0; q0 < L; q0 += B) {
        const int64_t M = std::min(B, L - q0), Mk = round_up(M, kPadK);
        const uint16_t* qt_pack = st.qt_pack.data() + (q0 / kPackN) * D * kPackN;
        const uint16_t* gt_pack = st.gt_pack.data() + (q0 / kPackN) * D * kPackN;
        // P^T for dV and dS^T for dK, dQ, rounded; zero where dO's and Q's pad rows meet them
#ifdef DF_HAVE_AVX512_PATH
        if (amx) {  // S^T, dP^T on AMX tiles of its own, between the rows of the elementwise pass
          amx_begin();
          probs_and_grads_amx_d64(krows + k0 * D, vrows + k0 * D, N, qt_pack, gt_pack, M, p.scale, lse_row + q0,
                                  offset_or_null(lse_log2e, q0), st.delta.data() + q0,
                                  st.amx_s.data(), Pt, dSt, kLdPBwd);
          amx_end();  // and torch's brgemm loads its own configuration again
        }
#endif
        if (!amx) {
          gemm_packed<scalar_t>(Nm, M, D, krows + k0 * D, D, qt_pack, D * kPackN, S, kLdSBwd, false, true);  // S^T = K Q^T
          gemm_packed<scalar_t>(Nm, M, D, vrows + k0 * D, D, gt_pack, D * kPackN, dP, kLdSBwd, false, true);  // dP^T = V dO^T
          for (int64_t r = 0; r < N; ++r)
            probs_and_grads_to_lp<scalar_t>(S + r * kLdSBwd, dP + r * kLdSBwd, M, p.scale, lse_row + q0,
                                            offset_or_null(lse_log2e, q0), st.delta.data() + q0,
                                            Pt + r * kLdPBwd, dSt + r * kLdPBwd);
        }
        for (int64_t r = 0; r < N; ++r) {
          std::memset(Pt + r * kLdPBwd + M, 0, (Mk - M) * sizeof(uint16_t));
          std::memset(dSt + r * kLdPBwd + M, 0, (Mk - M) * sizeof(uint16_t));
        }
        // dV += P^T dO (the packed rows of dO start at query q0: pair q0 / 2)
        gemm_packed<scalar_t>(Nm, D, Mk, Pt, kLdPBwd, st.g_pack.data() + q0 * kPackN, Lp * kPackN,
                              st.dv.data() + k0 * D, D, true);
        gemm_packed<scalar_t>(Nm, D, Mk, dSt, kLdPBwd, st.q_pack.data() + q0 * kPackN, Lp * kPackN, st.dk.data() + k0 * D,
                              D, true);  // dK += dS^T Q
        pack_b_rows(dSt, kLdPBwd, N, M, st.ds_pack.data(), B * kPackN, Nk);
        gemm_packed<scalar_t>(D, M, Nk, st.kt.data() + (k0 / B) * D * kLdPBwd, kLdPBwd, st.ds_pack.data(), B * kPackN,
                              st.dqt.data() + (q0 / B) * D * kLdSBwd, kLdSBwd, true, true);  // dQ^T += K^T dS^T
      }
    }
    st.dq.resize(L * D);
    transpose_tiles(st.dqt.data(), L, D, st.dq.data());
    scale_row(st.dq.data(), L * D, p.scale);
    scale_row(st.dk.data(), L * D, p.scale);
    store_rows(dqp, sdq, h, start, L, D, st.dq.data(), rope, start, P);
    store_rows(dkp, sdk, h, start, L, D, st.dk.data(), rope, start, P);
    store_rows(dvp, sdv, h, start, L, D, st.dv.data(), nullptr, start, 0);
  });
}

// Runs fp32_path(scalar_t()) (fp32 accumulation on the fp32 kernels: every fp32 problem, and fp16/bf16
// where oneDNN has no packed-B kernels) or lp_path(scalar_t()) (low-precision gemms) for dtype t.
template <typename Fp32Path, typename LpPath>
void dispatch_path(at::ScalarType t, Fp32Path fp32_path, LpPath lp_path) {
  const bool lp = use_low_precision_gemms(t);
  switch (t) {
    case at::kFloat: fp32_path(float()); break;
    case at::kHalf: lp ? lp_path(at::Half()) : fp32_path(at::Half()); break;
    case at::kBFloat16: lp ? lp_path(at::BFloat16()) : fp32_path(at::BFloat16()); break;
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

}  // namespace

bool cpu_bf16_forward_on_amx(int64_t D) { return use_low_precision_gemms(at::kBFloat16) && use_amx_tiles(D); }
bool cpu_fp32_on_own_kernels(int64_t D) { return fp32_kernels(D); }

namespace {

void varlen_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out,
                              at::Tensor lse, const at::Tensor& cu_seqlens, int64_t max_seqlen, double softmax_scale,
                              const c10::optional<at::Tensor>& inv_freq, const c10::optional<at::Tensor>& grids,
                              const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens) {
  const Problem p = check_fwd_args(q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, inv_freq, grids,
                                   coord_transform, num_prefix_tokens);
  const RopeInput ri = rope_input(p, inv_freq, grids, coord_transform);
  const auto segs = read_segments(cu_seqlens, p, ri.grids);
  if (p.T == 0 || p.H == 0) return;
  dispatch_path(
      q.scalar_type(),
      [&](auto tag) { forward_cpu<decltype(tag)>(p, q, k, v, out, lse, segs, ri); },
      [&](auto tag) { forward_cpu_lp<decltype(tag)>(p, q, k, v, out, lse, segs, ri); });
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
  dispatch_path(
      q.scalar_type(),
      [&](auto tag) { backward_cpu<decltype(tag)>(p, dout, q, k, v, out, lse, dq, dk, dv, segs, ri); },
      [&](auto tag) { backward_cpu_lp<decltype(tag)>(p, dout, q, k, v, out, lse, dq, dk, dv, segs, ri); });
}

}  // namespace

TORCH_LIBRARY_IMPL(dinofast_C, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace varlen
}  // namespace dinofast
