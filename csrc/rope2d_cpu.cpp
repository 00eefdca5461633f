// 2D RoPE on CPU. The angle of a patch channel depends on the patch's row (first D/4 channels) or
// column (next D/4) only, so cos/sin are tabulated once per image and axis ((Hp + Wp) * D/4 values
// instead of Hp * Wp * D/2 per call), with the same float math as channel_angle; the rows of q and
// k are then pure loads, FMAs and stores. at::parallel_for (OpenMP) walks (b, h, t) rows in the
// order the tensors are laid out in memory (heads outer for a contiguous [B, H, N, D] tensor, tokens
// outer for transformers' [B, N, H, D] buffer), so each thread streams through contiguous memory.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"
#include "rope2d.h"

namespace dinofast {
namespace rope {
namespace {

// cos/sin of every row (y) and column (x) of every image: y rows of image i start at
// y_offset[i] * quarter, x columns at x_offset[i] * quarter.
template <typename acc_t>
struct AngleTables {
  std::vector<acc_t> cos_y, sin_y, cos_x, sin_x;
  std::vector<int64_t> y_offset, x_offset;
};

template <typename acc_t>
AngleTables<acc_t> build_tables(const Geometry& g, const int32_t* grids, const float* transform,
                                const float* freqs) {
  const int64_t quarter = g.D / 4;
  const bool per_image = g.packed || g.transform_stride != 0;  // batched, one transform: one table
  const int64_t n_tables = per_image ? g.n_images : 1;
  AngleTables<acc_t> tb;
  tb.y_offset.resize(n_tables + 1);
  tb.x_offset.resize(n_tables + 1);
  tb.y_offset[0] = tb.x_offset[0] = 0;
  for (int64_t i = 0; i < n_tables; ++i) {
    tb.y_offset[i + 1] = tb.y_offset[i] + (g.packed ? grids[2 * i] : g.hp);
    tb.x_offset[i + 1] = tb.x_offset[i] + (g.packed ? grids[2 * i + 1] : g.wp);
  }
  const int64_t ny = checked_mul(tb.y_offset[n_tables], quarter, "rope2d", "angle table rows");
  const int64_t nx = checked_mul(tb.x_offset[n_tables], quarter, "rope2d", "angle table columns");
  tb.cos_y.resize(ny); tb.sin_y.resize(ny); tb.cos_x.resize(nx); tb.sin_x.resize(nx);
  const acc_t sign = g.inverse ? acc_t(-1) : acc_t(1);
  const int q = static_cast<int>(quarter);
  for (int64_t i = 0; i < n_tables; ++i) {
    const int64_t hp = tb.y_offset[i + 1] - tb.y_offset[i], wp = tb.x_offset[i + 1] - tb.x_offset[i];
    const float* t = transform ? transform + i * g.transform_stride : nullptr;
    // token_yx of (r, 0) gives row r's y and of (0, c) column c's x, transform included
    for (int64_t r = 0; r < hp; ++r) {
      float y, x;
      token_yx(r * wp, hp, wp, t, y, x);
      for (int d = 0; d < q; ++d) {
        const acc_t a = channel_angle(d, q, y, x, freqs);
        tb.cos_y[(tb.y_offset[i] + r) * quarter + d] = std::cos(a);
        tb.sin_y[(tb.y_offset[i] + r) * quarter + d] = sign * std::sin(a);
      }
    }
    for (int64_t c = 0; c < wp; ++c) {
      float y, x;
      token_yx(c, hp, wp, t, y, x);
      for (int d = q; d < 2 * q; ++d) {
        const acc_t a = channel_angle(d, q, y, x, freqs);
        tb.cos_x[(tb.x_offset[i] + c) * quarter + d - q] = std::cos(a);
        tb.sin_x[(tb.x_offset[i] + c) * quarter + d - q] = sign * std::sin(a);
      }
    }
  }
  return tb;
}

// The row loops are plain C++ compiled three times, for AVX-512, AVX2+FMA and the baseline
// (setup.py builds for the baseline x86-64 ISA, SSE2): the wrappers below carry the target and the
// always-inline body takes it on, and each call runs the widest the CPU has. fp32 rows are
// memory-bound at any width; bf16 rows are not: converted one element at a time (SSE2) they cost
// ~3.4x a memcpy of them, vectorised ~1.3x; the AVX-512 build's bf16 rows (rotate_bf16_row: 32
// channels per vector, vcvtne2ps2bf16, no fma contraction) run at a copy's speed at 768^2.
#define DF_ALWAYS_INLINE inline __attribute__((always_inline))

// Element <-> compute type. bf16 is converted with bit operations (the same rounding as
// c10::BFloat16: to nearest even, NaN to the quiet NaN 0x7FC0) that vectorise; others by cast.
template <typename acc_t, typename scalar_t>
DF_ALWAYS_INLINE acc_t load_elem(scalar_t v) {
  return static_cast<acc_t>(v);
}
template <>
DF_ALWAYS_INLINE float load_elem<float, c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename scalar_t, typename acc_t>
DF_ALWAYS_INLINE scalar_t store_elem(acc_t v) {
  return static_cast<scalar_t>(v);
}
template <>
DF_ALWAYS_INLINE c10::BFloat16 store_elem<c10::BFloat16, float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return c10::BFloat16(v != v ? uint16_t(0x7FC0) : rounded, c10::BFloat16::from_bits());
}

// Rotate one head row: channel pairs (d, d + D/2), y angles for d < D/4, x angles after. Within an
// iteration the pair is loaded before either element is stored and no iteration touches another's
// elements, so out may alias in (omp simd: the lanes of a vector are such iterations).
template <typename scalar_t, typename acc_t>
DF_ALWAYS_INLINE void rotate_row(const scalar_t* in, scalar_t* out, const acc_t* __restrict__ cy,
                                 const acc_t* __restrict__ sy, const acc_t* __restrict__ cx,
                                 const acc_t* __restrict__ sx, int64_t quarter) {
  const int64_t half = 2 * quarter;
#pragma omp simd
  for (int64_t d = 0; d < quarter; ++d) {
    const acc_t a = load_elem<acc_t>(in[d]), b = load_elem<acc_t>(in[d + half]);
    out[d] = store_elem<scalar_t>(a * cy[d] - b * sy[d]);
    out[d + half] = store_elem<scalar_t>(b * cy[d] + a * sy[d]);
  }
  const scalar_t* in_x = in + quarter;
  scalar_t* out_x = out + quarter;
#pragma omp simd
  for (int64_t d = 0; d < quarter; ++d) {
    const acc_t a = load_elem<acc_t>(in_x[d]), b = load_elem<acc_t>(in_x[d + half]);
    out_x[d] = store_elem<scalar_t>(a * cx[d] - b * sx[d]);
    out_x[d + half] = store_elem<scalar_t>(b * cx[d] + a * sx[d]);
  }
}

// cos/sin of patch (r, c) of image table `table`: y angles of row r, x angles of column c.
template <typename acc_t>
struct AngleRow {
  const acc_t *cy, *sy, *cx, *sx;
};

template <typename acc_t>
DF_ALWAYS_INLINE AngleRow<acc_t> angle_row(const AngleTables<acc_t>& tb, int64_t table, int64_t r, int64_t c,
                                           int64_t quarter) {
  const int64_t yo = (tb.y_offset[table] + r) * quarter, xo = (tb.x_offset[table] + c) * quarter;
  return {tb.cos_y.data() + yo, tb.sin_y.data() + yo, tb.cos_x.data() + xo, tb.sin_x.data() + xo};
}

// A row of D/4 == 16 (head dim 64, DINOv3's): the trip count known at compile time, so each loop is
// one 16-lane vector with no remainder. kAvx512 (the AVX-512 build): bf16 rows with D/4 a multiple
// of 16 take the intrinsics of rotate_bf16_row, whose rounding to bf16 is one instruction for two
// vectors where the compiled bit operations take eight per vector.
template <bool kAvx512, typename scalar_t, typename acc_t>
DF_ALWAYS_INLINE void rotate_row_any(const scalar_t* in, scalar_t* out, const AngleRow<acc_t>& a, int64_t quarter) {
#ifdef DF_HAVE_AVX512_PATH
  if constexpr (kAvx512 && std::is_same<scalar_t, c10::BFloat16>::value) {
    if (quarter % 16 == 0) {
      rotate_bf16_row(reinterpret_cast<const uint16_t*>(in), reinterpret_cast<uint16_t*>(out), a.cy, a.sy, a.cx,
                      a.sx, quarter);
      return;
    }
  }
#endif
  if (quarter == 16)
    rotate_row(in, out, a.cy, a.sy, a.cx, a.sx, 16);
  else
    rotate_row(in, out, a.cy, a.sy, a.cx, a.sx, quarter);
}

// The q and k rows of one patch, which turn by the same angles. AVX-512 bf16 rows of D = 64
// (DINOv3's) put the angles in vector lane order once for both.
template <bool kAvx512, typename scalar_t, typename acc_t>
DF_ALWAYS_INLINE void rotate_qk(const scalar_t* qr, scalar_t* qw, const scalar_t* kr, scalar_t* kw,
                                const AngleRow<acc_t>& a, int64_t quarter) {
#ifdef DF_HAVE_AVX512_PATH
  if constexpr (kAvx512 && std::is_same<scalar_t, c10::BFloat16>::value) {
    if (quarter == 16) {
      rotate_bf16_qk64(reinterpret_cast<const uint16_t*>(qr), reinterpret_cast<uint16_t*>(qw),
                       reinterpret_cast<const uint16_t*>(kr), reinterpret_cast<uint16_t*>(kw), a.cy, a.sy, a.cx, a.sx);
      return;
    }
  }
#endif
  rotate_row_any<kAvx512>(qr, qw, a, quarter);
  rotate_row_any<kAvx512>(kr, kw, a, quarter);
}

template <typename scalar_t>
DF_ALWAYS_INLINE void copy_row(const scalar_t* in, scalar_t* out, int64_t D) {
  if (in != out) std::memcpy(out, in, D * sizeof(scalar_t));
}

// Everything a work unit reads: tensors as (b, t, h) strides, the angle tables, the geometry.
template <typename scalar_t, typename acc_t>
struct Job {
  const scalar_t *qi, *ki;
  scalar_t *qo, *ko;
  int64_t sq[3], sk[3], sqo[3], sko[3];  // strides of q, k, q_out, k_out over (b, t, h)
  const AngleTables<acc_t>* tb;
  const Geometry* g;
  const int32_t *cu, *grids;
  bool per_image, heads_outer;
  int64_t outer;  // work units per batch row: heads (heads outer) or tokens
};

// Rotates (or, for a prefix token, copies) row (b, t, h) given its image table and patch (r, c).
template <bool kAvx512, typename scalar_t, typename acc_t>
DF_ALWAYS_INLINE void do_row(const Job<scalar_t, acc_t>& j, int64_t b, int64_t t, int64_t h, int64_t table,
                             int64_t r, int64_t c, bool prefix) {
  const scalar_t* qr = j.qi + b * j.sq[0] + t * j.sq[1] + h * j.sq[2];
  const scalar_t* kr = j.ki + b * j.sk[0] + t * j.sk[1] + h * j.sk[2];
  scalar_t* qw = j.qo + b * j.sqo[0] + t * j.sqo[1] + h * j.sqo[2];
  scalar_t* kw = j.ko + b * j.sko[0] + t * j.sko[1] + h * j.sko[2];
  const int64_t D = j.g->D, quarter = D / 4;
  if (prefix) {  // copied bit for bit (x*1 - y*0 would turn an Inf into NaN)
    copy_row(qr, qw, D);
    copy_row(kr, kw, D);
    return;
  }
  rotate_qk<kAvx512>(qr, qw, kr, kw, angle_row(*j.tb, table, r, c, quarter), quarter);
}

// Image table and patch (r, c) of token t of batch row b; false for a prefix token.
template <typename scalar_t, typename acc_t>
DF_ALWAYS_INLINE bool place(const Job<scalar_t, acc_t>& j, int64_t b, int64_t t, int64_t& table, int64_t& r,
                            int64_t& c) {
  const Geometry& g = *j.g;
  int64_t img = b, pos = t - g.num_prefix_tokens, wp = g.wp;
  if (g.packed) {
    img = segment_of(j.cu, g.n_images, t);
    pos = t - j.cu[img] - g.num_prefix_tokens;
    wp = j.grids[2 * img + 1];
  }
  table = j.per_image ? img : 0;
  if (pos < 0) return false;
  r = pos / wp;
  c = pos % wp;
  return true;
}

// The heads of patch token t of batch row b: one angle row (patch (r, c) of image table `table`)
// for all of them.
template <bool kAvx512, typename scalar_t, typename acc_t>
DF_ALWAYS_INLINE void rotate_heads(const Job<scalar_t, acc_t>& j, int64_t b, int64_t t, int64_t table,
                                   int64_t r, int64_t c) {
  const int64_t quarter = j.g->D / 4;
  const AngleRow<acc_t> a = angle_row(*j.tb, table, r, c, quarter);
  const scalar_t* qr = j.qi + b * j.sq[0] + t * j.sq[1];
  const scalar_t* kr = j.ki + b * j.sk[0] + t * j.sk[1];
  scalar_t* qw = j.qo + b * j.sqo[0] + t * j.sqo[1];
  scalar_t* kw = j.ko + b * j.sko[0] + t * j.sko[1];
  for (int64_t h = 0; h < j.g->H; ++h) {
    rotate_qk<kAvx512>(qr + h * j.sq[2], qw + h * j.sqo[2], kr + h * j.sk[2], kw + h * j.sko[2], a, quarter);
  }
}

// The patch tokens of head h of batched image b, in token order: row pointers advance by the token
// strides and the angle rows follow the grid's row and column.
template <bool kAvx512, typename scalar_t, typename acc_t>
DF_ALWAYS_INLINE void rotate_head_tokens(const Job<scalar_t, acc_t>& j, int64_t b, int64_t h, int64_t table) {
  const Geometry& g = *j.g;
  const int64_t quarter = g.D / 4, t0 = g.num_prefix_tokens;
  const scalar_t* qr = j.qi + b * j.sq[0] + t0 * j.sq[1] + h * j.sq[2];
  const scalar_t* kr = j.ki + b * j.sk[0] + t0 * j.sk[1] + h * j.sk[2];
  scalar_t* qw = j.qo + b * j.sqo[0] + t0 * j.sqo[1] + h * j.sqo[2];
  scalar_t* kw = j.ko + b * j.sko[0] + t0 * j.sko[1] + h * j.sko[2];
  AngleRow<acc_t> a = angle_row(*j.tb, table, 0, 0, quarter);
  const acc_t *cx0 = a.cx, *sx0 = a.sx;
  for (int64_t r = 0; r < g.hp; ++r, a.cy += quarter, a.sy += quarter) {
    a.cx = cx0;
    a.sx = sx0;
    for (int64_t c = 0; c < g.wp; ++c, a.cx += quarter, a.sx += quarter) {
      rotate_qk<kAvx512>(qr, qw, kr, kw, a, quarter);
      qr += j.sq[1]; kr += j.sk[1]; qw += j.sqo[1]; kw += j.sko[1];
    }
  }
}

// Work units [begin, end): unit = (b, outer index), rows in the tensors' memory order.
template <bool kAvx512, typename scalar_t, typename acc_t>
DF_ALWAYS_INLINE void run_units(const Job<scalar_t, acc_t>& j, int64_t begin, int64_t end) {
  const Geometry& g = *j.g;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / j.outer, o = unit % j.outer;
    if (!j.heads_outer) {  // one token, every head
      int64_t table = 0, r = 0, c = 0;
      if (place(j, b, o, table, r, c))
        rotate_heads<kAvx512>(j, b, o, table, r, c);
      else
        for (int64_t h = 0; h < g.H; ++h) do_row<kAvx512>(j, b, o, h, table, 0, 0, true);
    } else if (!g.packed) {  // one head, every token of image b (N = num_prefix_tokens + hp * wp)
      const int64_t table = j.per_image ? b : 0;
      for (int64_t t = 0; t < g.num_prefix_tokens; ++t) do_row<kAvx512>(j, b, t, o, table, 0, 0, true);
      rotate_head_tokens<kAvx512>(j, b, o, table);
    } else {  // packed tokens with heads outer (an unusual stride order): place each token
      for (int64_t t = 0; t < g.N; ++t) {
        int64_t table = 0, r = 0, c = 0;
        const bool patch = place(j, b, t, table, r, c);
        do_row<kAvx512>(j, b, t, o, table, r, c, !patch);
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define DF_ROPE_X86 1
template <typename scalar_t, typename acc_t>
// flatten: everything inlined under this target, rotate_bf16_row's intrinsics included (an
// always-inline callee with a wider target than its caller does not compile).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,prefer-vector-width=512"), flatten))
void run_units_avx512(const Job<scalar_t, acc_t>& j, int64_t begin, int64_t end) {
  run_units<true>(j, begin, end);
}
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void run_units_avx2(const Job<scalar_t, acc_t>& j, int64_t begin, int64_t end) {
  run_units<false>(j, begin, end);
}
#endif
template <typename scalar_t, typename acc_t>
void run_units_baseline(const Job<scalar_t, acc_t>& j, int64_t begin, int64_t end) {
  run_units<false>(j, begin, end);
}

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest row loop this CPU runs, lowered to DINOFAST_CPU_ISA ("baseline", "avx2") when that
// is set, so that tests can run every build of the loops on one machine (read per call: a getenv
// is nothing next to a rotation, and a test can change it between calls).
Isa cpu_isa() {
#ifdef DF_ROPE_X86
  static const Isa detected = [] {
    __builtin_cpu_init();
    if (cpu_has_avx512()) return Isa::kAvx512;  // AVX-512 with BF16 (Cooper Lake, Zen 4 and later)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  const char* cap = std::getenv("DINOFAST_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "baseline") == 0) return Isa::kBaseline;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && detected == Isa::kAvx512) return Isa::kAvx2;
  return detected;
#else
  return Isa::kBaseline;
#endif
}

template <typename scalar_t>
void rope2d_cpu_impl(const at::Tensor& q, const at::Tensor& k, at::Tensor& q_out, at::Tensor& k_out,
                     const at::Tensor& inv_freq, const int32_t* cu, const int32_t* grids,
                     const float* transform, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const AngleTables<acc_t> tb = build_tables<acc_t>(g, grids, transform, inv_freq.data_ptr<float>());
  Job<scalar_t, acc_t> j;
  j.qi = q.data_ptr<scalar_t>();
  j.ki = k.data_ptr<scalar_t>();
  j.qo = q_out.data_ptr<scalar_t>();
  j.ko = k_out.data_ptr<scalar_t>();
  for (int i = 0; i < 3; ++i) {
    j.sq[i] = q.stride(i);
    j.sk[i] = k.stride(i);
    j.sqo[i] = q_out.stride(i);
    j.sko[i] = k_out.stride(i);
  }
  j.tb = &tb;
  j.g = &g;
  j.cu = cu;
  j.grids = grids;
  j.per_image = g.packed || g.transform_stride != 0;  // batched, one transform: one table
  // Rows in memory order of q: tokens inner when they are closer together than heads. One work
  // unit is (b, outer index); its inner loop advances row/column counters instead of dividing.
  j.heads_outer = q.stride(2) > q.stride(1);
  j.outer = j.heads_outer ? g.H : g.N;
  const int64_t inner = j.heads_outer ? g.N : g.H;
  const int64_t grain = std::max<int64_t>(1, 16384 / (inner * g.D));
  void (*run)(const Job<scalar_t, acc_t>&, int64_t, int64_t) = run_units_baseline<scalar_t, acc_t>;
#ifdef DF_ROPE_X86
  const Isa isa = cpu_isa();
  if (isa == Isa::kAvx512) run = run_units_avx512<scalar_t, acc_t>;
  if (isa == Isa::kAvx2) run = run_units_avx2<scalar_t, acc_t>;
#endif
  at::parallel_for(0, g.B * j.outer, grain, [&](int64_t begin, int64_t end) { run(j, begin, end); });
}

void rope2d_cpu(const at::Tensor& q, const at::Tensor& k, at::Tensor q_out, at::Tensor k_out,
                const at::Tensor& inv_freq, const c10::optional<at::Tensor>& cu_seqlens,
                const c10::optional<at::Tensor>& grids, int64_t hp, int64_t wp,
                const c10::optional<at::Tensor>& coord_transform, int64_t num_prefix_tokens, bool inverse) {
  const Geometry g = check_args(q, k, q_out, k_out, inv_freq, cu_seqlens, grids, hp, wp, coord_transform,
                                num_prefix_tokens, inverse);
  const int32_t* cu = nullptr;
  const int32_t* gr = nullptr;
  if (g.packed) {  // the CPU kernel reads these on the host: check the values it relies on
    cu = cu_seqlens->data_ptr<int32_t>();
    gr = grids->data_ptr<int32_t>();
    TORCH_CHECK(cu[0] == 0, "rope2d: cu_seqlens: expected cu_seqlens[0] == 0, got ", cu[0]);
    for (int64_t i = 0; i < g.n_images; ++i) {
      TORCH_CHECK(cu[i + 1] >= cu[i], "rope2d: cu_seqlens: expected non-decreasing values at ", i);
      TORCH_CHECK(gr[2 * i] > 0 && gr[2 * i + 1] > 0, "rope2d: grids: expected positive sides for image ", i);
      TORCH_CHECK(int64_t(cu[i + 1]) - cu[i] == image_tokens(g.num_prefix_tokens, gr[2 * i], gr[2 * i + 1], "rope2d"),
                  "rope2d: cu_seqlens: segment ", i, " expected num_prefix_tokens + Hp*Wp tokens");
    }
    TORCH_CHECK(cu[g.n_images] == g.N, "rope2d: cu_seqlens: expected last value ", g.N, ", got ", cu[g.n_images]);
  }
  const float* tr = g.has_transform ? coord_transform->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope2d_cpu", [&] {
    rope2d_cpu_impl<scalar_t>(q, k, q_out, k_out, inv_freq, cu, gr, tr, g);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dinofast_C, CPU, m) { m.impl("rope2d", &rope2d_cpu); }

}  // namespace rope
}  // namespace dinofast
