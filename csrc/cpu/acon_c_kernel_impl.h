// CPU kernels of the fused ACON-C ops. Included once per instruction set by
// acon_c_kernel_{default,avx2,avx512}.cpp, each of which defines CPU_CAPABILITY
// first, so at::vec::Vectorized is as wide as that instruction set allows.
#pragma once

#include "acon_c_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/bit_cast.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace acon_cuda::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// The x86-64 baseline build, whose Vectorized is at::vec's portable one: an
// array of lanes in memory that every operation loads and stores, exp_u20 an
// expf call per lane, and compares, blends, bitwise operations and
// reductions lane by lane through integer registers, branches and the stack
// (forward and backward took about 3x F.silu's time, one thread). There the
// float kernels compute in Quads (four lanes in an SSE2 register, below),
// and float64's selects, blends and row totals are loops over arrays of
// lanes that the compiler vectorizes (docs/design.md). Elsewhere the
// baseline build has vector types of its own (NEON on aarch64) and keeps
// them.
#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2) && (defined(__x86_64__) || defined(_M_X64))
#define ACON_PORTABLE_VECTORIZED 1
#include <emmintrin.h>
#endif

// Elementwise work is split into tasks of at least this many elements.
constexpr int64_t kGrainElements = 32768;
// The backward's reduction blocks depend on the problem size only, never on
// the thread count, so parameter gradients are bit-identical for any number of
// threads: each block sums in a fixed order, then blocks are combined in order.
constexpr int64_t kBlockElements = 65536;
constexpr int64_t kMaxBlocks = 64;
constexpr int64_t kBlockMultiple = 8;
// Fewer blocks for very wide C, so the blocks' partial sums (3 * C doubles
// each) stay within this many doubles.
constexpr int64_t kPartialBudget = int64_t(1) << 18;
// Opmath partial sums are moved into double at least this often, which bounds
// the rounding error of float accumulation.
constexpr int64_t kFlushRows = 64;
constexpr int64_t kFlushElements = 4096;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Scratch slots: the block partials and the ParamLines on the calling
// thread, the opmath sums on each worker. acon_c_cpu.cpp uses the last one.
constexpr int kPartialsSlot = 0;
constexpr int kAccumulatorSlot = 1;
constexpr int kLinesSlot = 2;

template <typename T>
T* thread_scratch(int slot, int64_t n) {
  return static_cast<T*>(thread_scratch_bytes(slot, n * static_cast<int64_t>(sizeof(T))));
}

#if defined(ACON_PORTABLE_VECTORIZED)
// Four float lanes in an SSE2 register (every x86-64 CPU has SSE2), with the
// part of at::vec::Vectorized's interface that this file's kernels use: the
// baseline build's float vector (VectorTypes). With the portable
// Vectorized<float>, about a third of the forward's instructions were moves
// of lanes to and from memory; a Quad stays in a register.
struct Quad {
  using value_type = float;
  __m128 v;
  Quad() : v(_mm_setzero_ps()) {}
  Quad(__m128 v_) : v(v_) {}
  Quad(float s) : v(_mm_set1_ps(s)) {}
  static constexpr int size() {
    return 4;
  }
  static Quad loadu(const void* p) {
    return _mm_loadu_ps(static_cast<const float*>(p));
  }
  // The first n lanes from p, the others 0, as Vectorized::loadu(p, n).
  static Quad loadu(const void* p, int64_t n) {
    alignas(16) float lanes[4] = {};
    std::memcpy(lanes, p, n * sizeof(float));
    return _mm_load_ps(lanes);
  }
  void store(void* p) const {
    _mm_storeu_ps(static_cast<float*>(p), v);
  }
  void store(void* p, int64_t n) const {
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, v);
    std::memcpy(p, lanes, n * sizeof(float));
  }
  static Quad arange(float base, float step) {
    return _mm_setr_ps(base, base + step, base + 2 * step, base + 3 * step);
  }
};

C10_ALWAYS_INLINE Quad operator+(const Quad& a, const Quad& b) {
  return _mm_add_ps(a.v, b.v);
}
C10_ALWAYS_INLINE Quad operator-(const Quad& a, const Quad& b) {
  return _mm_sub_ps(a.v, b.v);
}
C10_ALWAYS_INLINE Quad operator*(const Quad& a, const Quad& b) {
  return _mm_mul_ps(a.v, b.v);
}
C10_ALWAYS_INLINE Quad operator/(const Quad& a, const Quad& b) {
  return _mm_div_ps(a.v, b.v);
}
C10_ALWAYS_INLINE Quad operator|(const Quad& a, const Quad& b) {
  return _mm_or_ps(a.v, b.v);
}
C10_ALWAYS_INLINE Quad operator&(const Quad& a, const Quad& b) {
  return _mm_and_ps(a.v, b.v);
}
// Compares give a mask (all bits or none per lane), as Vectorized's do.
C10_ALWAYS_INLINE Quad operator<(const Quad& a, const Quad& b) {
  return _mm_cmplt_ps(a.v, b.v);
}
C10_ALWAYS_INLINE Quad operator>=(const Quad& a, const Quad& b) {
  return _mm_cmpge_ps(a.v, b.v);
}

// b where mask's lanes are clear, a where they are set.
C10_ALWAYS_INLINE __m128 select_quad(__m128 mask, __m128 a, __m128 b) {
  return _mm_or_ps(_mm_and_ps(mask, a), _mm_andnot_ps(mask, b));
}

// The lanes' total, lane 0 first and then lanes 1, 2, 3 added, as
// vec_reduce_all adds the portable Vectorized's lanes.
C10_ALWAYS_INLINE float total_of_lanes(const Quad& q) {
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, q.v);
  return ((lanes[0] + lanes[1]) + lanes[2]) + lanes[3];
}
#endif

// The vectors a loop over scalar_t loads and stores (SVec) and computes in
// (FVec, opmath_t's): on the x86-64 baseline build, every float computation
// runs on Quads.
template <typename scalar_t>
struct VectorTypes {
  using opmath_t = at::opmath_type<scalar_t>;
#if defined(ACON_PORTABLE_VECTORIZED)
  using FVec = std::conditional_t<std::is_same_v<opmath_t, float>, Quad, Vectorized<opmath_t>>;
  using SVec = std::conditional_t<std::is_same_v<scalar_t, float>, Quad, Vectorized<scalar_t>>;
#else
  using FVec = Vectorized<opmath_t>;
  using SVec = Vectorized<scalar_t>;
#endif
};

// A float16/bfloat16 vector as its two float vectors, and back.
template <typename scalar_t, typename FVec>
C10_ALWAYS_INLINE void to_fvecs(const Vectorized<scalar_t>& v, FVec* out) {
  std::tie(out[0], out[1]) = at::vec::convert_to_float<scalar_t>(v);
}

template <typename scalar_t, typename FVec>
C10_ALWAYS_INLINE void from_fvecs(const FVec* in, Vectorized<scalar_t>& out) {
  out = at::vec::convert_from_float<scalar_t>(in[0], in[1]);
}

#if defined(ACON_PORTABLE_VECTORIZED)
// The baseline build converts float16 and bfloat16 to and from Quads in
// SSE2, with the same operations and results as c10's scalar conversions
// (at::vec's portable ones call those lane by lane). SSE2's integer compares
// are signed: unsigned ones flip the sign bits first.

// Four 16-bit values (h's low 64 bits) as floats: bfloat16 is float's upper
// half.
C10_ALWAYS_INLINE Quad floats_from(__m128i h, c10::BFloat16 /*type*/) {
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
}

// c10::detail::fp16_ieee_to_fp32_value: exact.
C10_ALWAYS_INLINE Quad floats_from(__m128i h, c10::Half /*type*/) {
  const __m128i w = _mm_unpacklo_epi16(_mm_setzero_si128(), h); // h << 16 per lane
  const __m128i sign = _mm_and_si128(w, _mm_set1_epi32(INT32_MIN));
  const __m128i two_w = _mm_add_epi32(w, w);
  const __m128 normalized = _mm_mul_ps(
      _mm_castsi128_ps(_mm_add_epi32(_mm_srli_epi32(two_w, 4), _mm_set1_epi32(0xE0 << 23))),
      _mm_castsi128_ps(_mm_set1_epi32(15 << 23))); // 2^-112
  const __m128 denormalized = _mm_sub_ps(
      _mm_castsi128_ps(_mm_or_si128(_mm_srli_epi32(two_w, 17), _mm_set1_epi32(126 << 23))), _mm_set1_ps(0.5f));
  const __m128 is_denormal = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_srli_epi32(two_w, 27), _mm_setzero_si128()));
  return _mm_or_ps(_mm_castsi128_ps(sign), select_quad(is_denormal, denormalized, normalized));
}

// Bits b where mask's lanes are clear, a where they are set.
C10_ALWAYS_INLINE __m128i select_bits(__m128i mask, __m128i a, __m128i b) {
  return _mm_or_si128(_mm_and_si128(mask, a), _mm_andnot_si128(mask, b));
}

// q's floats as 16-bit values, each in the low bits of its 32-bit lane.
// bfloat16 (c10::detail::round_to_nearest_even): rounded to nearest even,
// NaN as 0x7FC0.
C10_ALWAYS_INLINE __m128i bits_of(const Quad& q, c10::BFloat16 /*type*/) {
  const __m128i u = _mm_castps_si128(q.v);
  const __m128i bias = _mm_add_epi32(_mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1)), _mm_set1_epi32(0x7FFF));
  const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(q.v, q.v));
  return select_bits(nan, _mm_set1_epi32(0x7FC0), _mm_srli_epi32(_mm_add_epi32(u, bias), 16));
}

// float16 (c10::detail::fp16_ieee_from_fp32_value): rounded to nearest
// even, NaN as 0x7E00 with its sign.
C10_ALWAYS_INLINE __m128i bits_of(const Quad& q, c10::Half /*type*/) {
  const __m128i flip = _mm_set1_epi32(INT32_MIN);
  const __m128i w = _mm_castps_si128(q.v);
  const __m128 magnitude = _mm_andnot_ps(_mm_set1_ps(-0.f), q.v);
  __m128 base = _mm_mul_ps(
      _mm_mul_ps(magnitude, _mm_castsi128_ps(_mm_set1_epi32(239 << 23))), // 2^112
      _mm_castsi128_ps(_mm_set1_epi32(17 << 23)));                        // 2^-110
  const __m128i shl1_w = _mm_add_epi32(w, w);
  const __m128i sign = _mm_and_si128(w, flip);
  const __m128i min_bias = _mm_set1_epi32(0x71000000);
  __m128i bias = _mm_and_si128(shl1_w, _mm_set1_epi32(static_cast<int32_t>(0xFF000000u)));
  bias = select_bits(_mm_cmplt_epi32(_mm_xor_si128(bias, flip), _mm_xor_si128(min_bias, flip)), min_bias, bias);
  base = _mm_add_ps(_mm_castsi128_ps(_mm_add_epi32(_mm_srli_epi32(bias, 1), _mm_set1_epi32(0x07800000))), base);
  const __m128i bits = _mm_castps_si128(base);
  const __m128i nonsign = _mm_add_epi32(
      _mm_and_si128(_mm_srli_epi32(bits, 13), _mm_set1_epi32(0x7C00)), _mm_and_si128(bits, _mm_set1_epi32(0xFFF)));
  const __m128i nan = _mm_cmpgt_epi32(_mm_xor_si128(shl1_w, flip), _mm_set1_epi32(0x7F000000)); // > 0xFF000000
  return _mm_or_si128(_mm_srli_epi32(sign, 16), select_bits(nan, _mm_set1_epi32(0x7E00), nonsign));
}

template <typename scalar_t>
C10_ALWAYS_INLINE void to_fvecs(const Vectorized<scalar_t>& v, Quad* out) {
  const auto* p = reinterpret_cast<const __m128i*>(static_cast<const scalar_t*>(v));
  for (int k = 0; k < Vectorized<scalar_t>::size() / 8; ++k) {
    const __m128i eight = _mm_loadu_si128(p + k);
    out[2 * k] = floats_from(eight, scalar_t());
    out[2 * k + 1] = floats_from(_mm_unpackhi_epi64(eight, eight), scalar_t());
  }
}

template <typename scalar_t>
C10_ALWAYS_INLINE void from_fvecs(const Quad* in, Vectorized<scalar_t>& out) {
  // Sign-extended, so that the signed saturating pack keeps the 16 bits.
  const auto bits16 = [](const Quad& q) { return _mm_srai_epi32(_mm_slli_epi32(bits_of(q, scalar_t()), 16), 16); };
  auto* p = reinterpret_cast<__m128i*>(static_cast<scalar_t*>(out));
  for (int k = 0; k < Vectorized<scalar_t>::size() / 8; ++k) {
    _mm_storeu_si128(p + k, _mm_packs_epi32(bits16(in[2 * k]), bits16(in[2 * k + 1])));
  }
}
#endif

template <typename V>
C10_ALWAYS_INLINE typename V::value_type total_of_lanes(const V& v) {
  using T = typename V::value_type;
  return at::vec::vec_reduce_all<T>([](const V& x, const V& y) { return x + y; }, v);
}

// Loads and stores kStep elements of scalar_t as kNumF vectors of opmath_t:
// one vector for float and double, two float vectors for float16/bfloat16
// (four Quads on the x86-64 baseline build).
template <typename scalar_t>
struct Lanes {
  using opmath_t = at::opmath_type<scalar_t>;
  using FVec = typename VectorTypes<scalar_t>::FVec;
  using SVec = typename VectorTypes<scalar_t>::SVec;
  static constexpr int64_t kStep = SVec::size();
  static constexpr int64_t kWidth = FVec::size();
  static constexpr int kNumF = kStep / kWidth;

  C10_ALWAYS_INLINE static void load(const scalar_t* p, int64_t n, FVec* out) {
    const SVec v = n == kStep ? SVec::loadu(p) : SVec::loadu(p, n);
    if constexpr (kNumF == 1) {
      out[0] = v;
    } else {
      to_fvecs(v, out);
    }
  }

  C10_ALWAYS_INLINE static void store(scalar_t* p, int64_t n, const FVec* in) {
    SVec v;
    if constexpr (kNumF == 1) {
      v = in[0];
    } else {
      from_fvecs(in, v);
    }
    if (n == kStep) {
      v.store(p);
    } else {
      v.store(p, n);
    }
  }

  // The lanes' total, reduced in opmath precision by a fixed tree, so the
  // result is deterministic. Each lane holds at most kFlushElements / kStep
  // terms, so this adds little to float accumulation's error.
  static double sum(const FVec* v) {
    return total_of_lanes(lane_total(v));
  }

  C10_ALWAYS_INLINE static FVec lane_total(const FVec* v) {
    FVec total = v[0];
    for (const auto j : c10::irange(1, kNumF)) {
      total = total + v[j];
    }
    return total;
  }
};

// 1 / (1 + t) for t in [0, 1]. The division is the slowest instruction of the
// kernels; on AVX2 / AVX-512 the hardware reciprocal estimate plus one Newton
// step is within a unit or two in the last place of float.
template <typename V>
C10_ALWAYS_INLINE V reciprocal_of_one_plus(const V& t) {
  return V(1) / (V(1) + t);
}

// a * b + c, fused where the instruction set has it.
template <typename V>
C10_ALWAYS_INLINE V mul_add(const V& a, const V& b, const V& c) {
  return at::vec::fmadd(a, b, c);
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
C10_ALWAYS_INLINE Vectorized<float> reciprocal_of_one_plus(const Vectorized<float>& t) {
  const __m512 a = _mm512_add_ps(_mm512_set1_ps(1.f), t);
  const __m512 r = _mm512_rcp14_ps(a);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(a, r, _mm512_set1_ps(2.f)));
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
C10_ALWAYS_INLINE Vectorized<float> reciprocal_of_one_plus(const Vectorized<float>& t) {
  const __m256 a = _mm256_add_ps(_mm256_set1_ps(1.f), t);
  const __m256 r = _mm256_rcp_ps(a);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(a, r, _mm256_set1_ps(2.f)));
}
#endif

// exp(v) for v <= 0 (the sigmoid's exp(-|u|)), as ATen's exp_u20 computes
// it (the same reduction to [-ln2/2, ln2/2] and polynomial) in 11
// instructions instead of 19: no overflow side to clamp, and one
// fused multiply-add rounds v * log2(e) to an integer n and leaves n + 127
// in the low mantissa bits, which a shift makes 2^n. Below ln(FLT_MIN) the
// result is 0 (2^n would not be normal), as exp_u20 gives: the final
// multiply zeroes those lanes, whatever the steps before gave there (v is
// not clamped first: for v = -inf they give NaN). NaN stays NaN (the
// compare keeps unordered lanes).
template <typename V>
C10_ALWAYS_INLINE V exp_of_nonpositive(const V& v) {
  return v.exp_u20();
}

namespace exp_constants {
constexpr float kLnFltMin = -87.33654f; // ln(FLT_MIN)
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kRound = 12582912.0f + 127.0f; // 1.5 * 2^23: rounds to an integer; + the exponent bias
// exp_u20's coefficients: exp(r) = 1 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * c5)))).
constexpr float kC1 = 0.999999701f, kC2 = 0.499991506f, kC3 = 0.166676521f, kC4 = 0.0418978221f, kC5 = 0.00828929059f;
// ln 2 in two parts for a build without fused multiply-add: n * kLn2High
// is exact wherever the result is kept (|n| <= 126, 7 bits; kLn2High has
// 9), so r = (v - n * kLn2High) - n * kLn2Low loses no more than the fused
// form.
constexpr float kLn2High = 0.693359375f;
constexpr float kLn2Low = -2.12194440e-4f;
} // namespace exp_constants

#if defined(CPU_CAPABILITY_AVX512)
template <>
C10_ALWAYS_INLINE Vectorized<float> exp_of_nonpositive(const Vectorized<float>& v) {
  using namespace exp_constants;
  const __m512 k = _mm512_fmadd_ps(v, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kRound));
  const __m512 n = _mm512_sub_ps(k, _mm512_set1_ps(kRound));
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), v);
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(kC5), _mm512_set1_ps(kC4));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(kC3));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(kC2));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(kC1));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f));
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(k), 23));
  const __mmask16 under = _mm512_cmp_ps_mask(v, _mm512_set1_ps(kLnFltMin), _CMP_LT_OQ);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~under), p, scale);
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
C10_ALWAYS_INLINE Vectorized<float> exp_of_nonpositive(const Vectorized<float>& v) {
  using namespace exp_constants;
  const __m256 k = _mm256_fmadd_ps(v, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kRound));
  const __m256 n = _mm256_sub_ps(k, _mm256_set1_ps(kRound));
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), v);
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(kC5), _mm256_set1_ps(kC4));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(kC3));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(kC2));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(kC1));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(1.f));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(k), 23));
  const __m256 kept = _mm256_cmp_ps(v, _mm256_set1_ps(kLnFltMin), _CMP_NLT_UQ); // not below (NaN kept)
  return _mm256_and_ps(_mm256_mul_ps(p, scale), kept);
}
#elif defined(ACON_PORTABLE_VECTORIZED)
template <>
C10_ALWAYS_INLINE Quad mul_add(const Quad& a, const Quad& b, const Quad& c) {
  return a * b + c; // as the portable Vectorized's fmadd: no FMA in SSE2
}

// The AVX2 version's steps, the multiply-adds unfused.
template <>
C10_ALWAYS_INLINE Quad exp_of_nonpositive(const Quad& q) {
  using namespace exp_constants;
  const __m128 v = q.v;
  const __m128 k = _mm_add_ps(_mm_mul_ps(v, _mm_set1_ps(kLog2e)), _mm_set1_ps(kRound));
  const __m128 n = _mm_sub_ps(k, _mm_set1_ps(kRound));
  const __m128 r = _mm_sub_ps(_mm_sub_ps(v, _mm_mul_ps(n, _mm_set1_ps(kLn2High))), _mm_mul_ps(n, _mm_set1_ps(kLn2Low)));
  __m128 p = _mm_add_ps(_mm_mul_ps(r, _mm_set1_ps(kC5)), _mm_set1_ps(kC4));
  p = _mm_add_ps(_mm_mul_ps(r, p), _mm_set1_ps(kC3));
  p = _mm_add_ps(_mm_mul_ps(r, p), _mm_set1_ps(kC2));
  p = _mm_add_ps(_mm_mul_ps(r, p), _mm_set1_ps(kC1));
  p = _mm_add_ps(_mm_mul_ps(r, p), _mm_set1_ps(1.f));
  const __m128 scale = _mm_castsi128_ps(_mm_slli_epi32(_mm_castps_si128(k), 23));
  const __m128 kept = _mm_cmpnlt_ps(v, _mm_set1_ps(kLnFltMin)); // not below (NaN kept)
  return _mm_and_ps(_mm_mul_ps(p, scale), kept);
}

template <typename V, typename F>
C10_ALWAYS_INLINE V map_lanes(const F& f, const V& a, const V& b, const V& c) {
  using T = typename V::value_type;
  alignas(64) T la[V::size()], lb[V::size()], lc[V::size()];
  a.store(la);
  b.store(lb);
  c.store(lc);
  for (const auto i : c10::irange(V::size())) {
    la[i] = f(la[i], lb[i], lc[i]);
  }
  return V::loadu(la);
}
#endif

// b where mask's lanes are clear, a where they are set (mask from a compare:
// all bits or none per lane), as V::blendv(b, a, mask).
template <typename V>
C10_ALWAYS_INLINE V blend_lanes(const V& b, const V& a, const V& mask) {
#if !defined(ACON_PORTABLE_VECTORIZED)
  return V::blendv(b, a, mask);
#else
  using T = typename V::value_type;
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  return map_lanes(
      [](T lb, T la, T lm) {
        const auto m = c10::bit_cast<Bits>(lm);
        return c10::bit_cast<T>((c10::bit_cast<Bits>(lb) & ~m) | (c10::bit_cast<Bits>(la) & m));
      },
      b,
      a,
      mask);
#endif
}

// r where u >= 0, q elsewhere (and where u is NaN). at::vec's blendv takes
// its mask as a vector, which on AVX-512 costs a conversion from the
// compare's mask register and one back: the blend here takes the mask
// register itself.
template <typename V>
C10_ALWAYS_INLINE V where_nonnegative(const V& u, const V& r, const V& q) {
#if !defined(ACON_PORTABLE_VECTORIZED)
  return V::blendv(q, r, u >= V(0));
#else
  using T = typename V::value_type;
  return map_lanes([](T lu, T lr, T lq) { return lu >= T(0) ? lr : lq; }, u, r, q);
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
C10_ALWAYS_INLINE Vectorized<float> where_nonnegative(
    const Vectorized<float>& u,
    const Vectorized<float>& r,
    const Vectorized<float>& q) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_GE_OQ), q, r);
}
#elif defined(ACON_PORTABLE_VECTORIZED)
template <>
C10_ALWAYS_INLINE Quad blend_lanes(const Quad& b, const Quad& a, const Quad& mask) {
  return select_quad(mask.v, a.v, b.v);
}

template <>
C10_ALWAYS_INLINE Quad where_nonnegative(const Quad& u, const Quad& r, const Quad& q) {
  return select_quad(_mm_cmpge_ps(u.v, _mm_setzero_ps()), r.v, q.v);
}
#endif

// S = sigmoid(u) and W = S * (1 - S), from t = exp(-|u|), which never
// overflows: no inf/inf, and 1 - S = sigmoid(-u) without cancellation. At
// u = -inf this gives S = 0 exactly (and S = 1 at +inf), as torch.sigmoid
// does. In two halves, t first, so that a loop can compute t a step ahead
// (backward_wide_rows).
template <typename V>
C10_ALWAYS_INLINE V exp_of_minus_abs(const V& u) {
  return exp_of_nonpositive(u | V(-0.0)); // the sign bit set
}

template <typename V>
C10_ALWAYS_INLINE void sigmoid_and_slope_from(const V& u, const V& t, V& s, V& w) {
  const V r = reciprocal_of_one_plus(t); // sigmoid(|u|)
  const V q = t * r;                     // sigmoid(-|u|)
  s = where_nonnegative(u, r, q);
  w = r * q; // sigmoid(u) * sigmoid(-u) for either sign
}

template <typename V>
C10_ALWAYS_INLINE void sigmoid_and_slope(const V& u, V& s, V& w) {
  sigmoid_and_slope_from(u, exp_of_minus_abs(u), s, w);
}

// y = d*x*S + p2*x with u = bd*x, written x*(d*S + p2) like the reference.
template <typename V>
C10_ALWAYS_INLINE V acon_c_value(const V& x, const V& d, const V& p2, const V& bd) {
  V s, w;
  sigmoid_and_slope(bd * x, s, w);
  return x * mul_add(d, s, p2);
}

// dx and the three per-element terms of the parameter sums (docs/math.md):
// a = b * h, b, and g = b * xw, xw = x * S * (1 - S). g leaves out the
// factor d^2 of the beta term: multiplied in once per channel at the end
// (scale_by_d_squared), it saves two multiplies per vector (the backward's
// time is its arithmetic). Kept as factors, so add_to takes a and g into
// their sums in one fused multiply-add each, and the struct holds no more
// vectors than the compiler keeps in registers (with a and g as fields too,
// GCC kept it on the stack: four stores per vector). b and h are read
// through copies: read as fields, GCC 12 still stored both to the stack on
// every vector, stores that nothing ever loaded.
template <typename V>
struct AconCGrad {
  V dx, b, h, xw;

  // The whole beta term, d^2 = dd: (dy*x) * ((x*S*(1-S)) * d^2), so that
  // no product is out of range where the term is not.
  C10_ALWAYS_INLINE V g(const V& dd) const {
    return b * (xw * dd);
  }
  // Adds a, b and g (without d^2) to the sums.
  C10_ALWAYS_INLINE void add_to(V& sum_a, V& sum_b, V& sum_g) const {
    const V bb = b, hh = h;
    sum_a = mul_add(bb, hh, sum_a);
    sum_b = sum_b + bb;
    sum_g = mul_add(bb, xw, sum_g);
  }
  // The same, in the lanes of `lanes` (a LaneRange) only.
  template <typename Lanes>
  C10_ALWAYS_INLINE void add_to(const Lanes& lanes, V& sum_a, V& sum_b, V& sum_g) const {
    const V bb = b, hh = h;
    lanes.fmadd(sum_a, bb, hh);
    lanes.add(sum_b, bb);
    lanes.fmadd(sum_g, bb, xw);
  }
};

// With u = bd * x and t = exp(-|u|) given (computed a step ahead).
template <typename V>
C10_ALWAYS_INLINE AconCGrad<V> acon_c_grad_from(
    const V& x,
    const V& dy,
    const V& u,
    const V& t,
    const V& d,
    const V& p2) {
  V s, w;
  sigmoid_and_slope_from(u, t, s, w);
  // h = S * (1 + u * (1 - S)) = S + u * (S * (1 - S)): one fused multiply-add.
  const V h = mul_add(u, w, s);
  const V b = dy * x;
  return {dy * mul_add(d, h, p2), b, h, x * w};
}

template <typename V>
C10_ALWAYS_INLINE AconCGrad<V> acon_c_grad(const V& x, const V& dy, const V& d, const V& p2, const V& bd) {
  const V u = bd * x;
  return acon_c_grad_from(x, dy, u, exp_of_minus_abs(u), d, p2);
}

// Multiplies `groups` rows of C G sums (`stride` doubles apart) by d^2, the
// factor their terms left out (AconCGrad); d(g, c) is the d that group g's
// terms of channel c were computed with.
template <typename DOf>
void scale_by_d_squared(double* sums, int64_t groups, int64_t stride, int64_t C, const DOf& d) {
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      const double dc = d(g, c);
      sums[g * stride + c] *= dc * dc;
    }
  }
}

// Asks the CPU to fetch the cache line `bytes` past p. The address is formed
// in integer arithmetic: it may lie past the end of p's tensor (a prefetch
// never faults), where pointer arithmetic would be undefined.
C10_ALWAYS_INLINE void prefetch_bytes_past(const void* p, int64_t bytes) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)));
}

// For kRows rows of C channels from `row` taken together (in pairs), the
// cache line at channel c of the next kRows rows (a vector step is one cache
// line). Rows read in pairs are two interleaved streams, which the CPU's own
// prefetching follows less well than one: on a Zen 4, AVX-512 build, one
// thread, from memory, this made the backward 10-20% faster at C = 768, 1024
// and 2048 (no slower at 4096), and the forward at 2048 and 4096 went from
// 1.3x F.silu's time to 1.0x. Single rows gained nothing from it.
template <int kRows, typename scalar_t>
C10_ALWAYS_INLINE void prefetch_next_rows(const scalar_t* row, int64_t C, int64_t c) {
  const int64_t ahead = kRows * C * static_cast<int64_t>(sizeof(scalar_t));
  for (const auto q : c10::irange(kRows)) {
    prefetch_bytes_past(row + q * C + c, ahead);
  }
}

// y (forward), or dx alone (kGrad: a backward that wants no parameter sums).
template <bool kGrad, typename V>
C10_ALWAYS_INLINE V acon_c_elementwise(const V& x, const V& dy, const V& d, const V& p2, const V& bd);

// d, p2 and bd = beta * d (rounded as the reference rounds it) of the kWidth
// channels from c on; `count` of them are real channels (beta is not padded).
template <typename FVec, typename opmath_t>
struct ChannelParams {
  FVec d, p2, bd;
  C10_ALWAYS_INLINE ChannelParams(const opmath_t* lines, const opmath_t* beta, int64_t c, int64_t count) {
    using PL = ParamLines<opmath_t>;
    const opmath_t* p = lines + PL::index(c);
    d = FVec::loadu(p);
    p2 = FVec::loadu(p + PL::kLine);
    const FVec b = count >= FVec::size() ? FVec::loadu(beta + c) : FVec::loadu(beta + c, std::max<int64_t>(count, 0));
    bd = b * d;
  }
  // The same values in every lane: channel c alone (rows of one channel).
  C10_ALWAYS_INLINE static ChannelParams broadcast(const opmath_t* lines, const opmath_t* beta, int64_t c) {
    using PL = ParamLines<opmath_t>;
    const opmath_t* p = lines + PL::index(c);
    return ChannelParams(FVec(p[0]), FVec(p[PL::kLine]), FVec(beta[c] * p[0]));
  }

 private:
  ChannelParams(FVec d_, FVec p2_, FVec bd_) : d(d_), p2(p2_), bd(bd_) {}
};

// AconCKernelArgs with its pointers typed, copied into a local object by
// every kernel loop: vector stores may alias anything, so fields read
// through a reference to args would be reloaded after every store.
template <typename scalar_t>
struct TypedArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t C, inner, outer;
  const opmath_t* lines;
  const opmath_t* beta;
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* out;
  explicit TypedArgs(const AconCKernelArgs& args)
      : C(args.layout.channels),
        inner(args.layout.inner),
        outer(args.layout.outer),
        lines(static_cast<const opmath_t*>(args.params)),
        beta(static_cast<const opmath_t*>(args.beta)),
        x(static_cast<const scalar_t*>(args.x)),
        dy(static_cast<const scalar_t*>(args.grad_y)),
        out(static_cast<scalar_t*>(args.out)) {}
};

template <bool kGrad, typename V>
C10_ALWAYS_INLINE V acon_c_elementwise(const V& x, const V& dy, const V& d, const V& p2, const V& bd) {
  if constexpr (kGrad) {
    return acon_c_grad(x, dy, d, p2, bd).dx;
  } else {
    return acon_c_value(x, d, p2, bd);
  }
}

// Loads the x (and, for kGrad, dy) of n elements at `offset`.
template <typename scalar_t, bool kGrad>
C10_ALWAYS_INLINE void load_inputs(
    const TypedArgs<scalar_t>& a,
    int64_t offset,
    int64_t n,
    typename Lanes<scalar_t>::FVec* xv,
    typename Lanes<scalar_t>::FVec* dyv) {
  Lanes<scalar_t>::load(a.x + offset, n, xv);
  if constexpr (kGrad) {
    Lanes<scalar_t>::load(a.dy + offset, n, dyv);
  }
}

// Channels-innermost passes read (and the backward updates) a few opmath
// values per channel and row: parameter lines, beta, and the backward's sums.
// Where those of one row take more than kRowValuesBytes, they would not stay
// in the L1 cache beside the data streams from row to row, so the passes take
// rows in pairs and read (and update) each vector of them once per pair.
// Narrower rows go one at a time: two rows' streams interleaved cost the
// CPU's prefetching more than the values' reloads (on a Zen 4, AVX-512
// build, one thread, from memory: the backward in pairs 1.5x single rows at
// C = 256 and 512, the same at 768 and 1024, 0.85x at 2048 and 4096; the
// forward in pairs 0.7x single rows at C = 2048 and 4096). Four rows at a
// time measured 1.5-2x slower than pairs: more streams than the L1 cache
// keeps apart when rows are 4 KB multiples apart.
constexpr int64_t kRowValuesBytes = 16 << 10;

template <typename opmath_t>
bool rows_in_pairs(int64_t C, int64_t values_per_channel) {
  return C * values_per_channel * static_cast<int64_t>(sizeof(opmath_t)) > kRowValuesBytes;
}

// Elementwise pass (forward, or dx alone) over kRows rows from row r,
// channels innermost (inner == 1), beta the rows' group's.
template <typename scalar_t, bool kGrad, int kRows>
C10_ALWAYS_INLINE void elementwise_channels_inner_rows(
    const TypedArgs<scalar_t>& a,
    const at::opmath_type<scalar_t>* beta,
    int64_t r) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using FVec = typename L::FVec;
  const int64_t C = a.C;
  for (int64_t c = 0; c < C; c += L::kStep) {
    const int64_t n = std::min(L::kStep, C - c);
    FVec v[kRows][L::kNumF], dyv[kRows][L::kNumF];
    if constexpr (kRows > 1) {
      prefetch_next_rows<kRows>(a.x + r * C, C, c);
      if constexpr (kGrad) {
        prefetch_next_rows<kRows>(a.dy + r * C, C, c);
      }
    }
    for (const auto q : c10::irange(kRows)) {
      load_inputs<scalar_t, kGrad>(a, (r + q) * C + c, n, v[q], dyv[q]);
    }
    for (const auto j : c10::irange(L::kNumF)) {
      const ChannelParams<FVec, opmath_t> p(a.lines, beta, c + j * L::kWidth, n - j * L::kWidth);
      for (const auto q : c10::irange(kRows)) {
        v[q][j] = acon_c_elementwise<kGrad>(v[q][j], dyv[q][j], p.d, p.p2, p.bd);
      }
    }
    for (const auto q : c10::irange(kRows)) {
      L::store(a.out + (r + q) * C + c, n, v[q]);
    }
  }
}

// The same over rows [r0, r1) of group g: d, p2 and beta are read per row.
template <typename scalar_t, bool kGrad>
void elementwise_rows_channels_inner(const AconCKernelArgs& args, int64_t g, int64_t r0, int64_t r1) {
  using opmath_t = at::opmath_type<scalar_t>;
  const TypedArgs<scalar_t> a(args);
  const opmath_t* beta = a.beta + g * a.C;
  int64_t r = r0;
  if (rows_in_pairs<opmath_t>(a.C, 3)) {
    for (; r + 2 <= r1; r += 2) {
      elementwise_channels_inner_rows<scalar_t, kGrad, 2>(a, beta, r);
    }
  }
  for (; r < r1; ++r) {
    elementwise_channels_inner_rows<scalar_t, kGrad, 1>(a, beta, r);
  }
}

// The channel of a row of runs (inner > 1) and its beta, stepped from row
// to row (no division per row).
template <typename opmath_t>
struct RunRow {
  int64_t c, o;
  const opmath_t* beta;
  RunRow(const ChannelLayout& lay, const opmath_t* beta_all, int64_t r) {
    c = r % lay.channels;
    o = (r / lay.channels) % lay.outer;
    beta = beta_all + (r / (lay.outer * lay.channels)) * lay.channels;
  }
  void next(const ChannelLayout& lay) {
    if (++c == lay.channels) {
      c = 0;
      if (++o == lay.outer) {
        o = 0;
        beta += lay.channels;
      }
    }
  }
};

// Elementwise pass over rows [r0, r1), one channel per row (inner > 1):
// runs of whole vectors, or shorter than one (a partial vector).
template <typename scalar_t, bool kGrad>
void elementwise_rows_channel_runs(const AconCKernelArgs& args, int64_t r0, int64_t r1) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using FVec = typename L::FVec;
  using Params = ChannelParams<FVec, opmath_t>;
  const TypedArgs<scalar_t> a(args);
  const int64_t I = a.inner;
  RunRow<opmath_t> row(args.layout, a.beta, r0);
  for (int64_t r = r0; r < r1; ++r) {
    const Params p = Params::broadcast(a.lines, row.beta, row.c);
    for (int64_t i = 0; i < I; i += L::kStep) {
      const int64_t n = std::min(L::kStep, I - i);
      FVec v[L::kNumF], dyv[L::kNumF];
      load_inputs<scalar_t, kGrad>(a, r * I + i, n, v, dyv);
      for (const auto j : c10::irange(L::kNumF)) {
        v[j] = acon_c_elementwise<kGrad>(v[j], dyv[j], p.d, p.p2, p.bd);
      }
      L::store(a.out + r * I + i, n, v);
    }
    row.next(args.layout);
  }
}

// The same over runs at least a vector long whose length is not a multiple
// of the vector (7x7 and 14x14 maps): the rows' elements as one stream of
// whole vectors, a vector that crosses into the next row taking that row's
// parameters in its upper lanes. A 49-element run then costs 3.06 vectors
// instead of 4 (3 and one overlapping the third).
template <typename scalar_t, bool kGrad>
void elementwise_stream_channel_runs(const AconCKernelArgs& args, int64_t r0, int64_t r1) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using FVec = typename L::FVec;
  using Params = ChannelParams<FVec, opmath_t>;
  const TypedArgs<scalar_t> a(args);
  const ChannelLayout& lay = args.layout;
  const int64_t I = a.inner;
  const RunRow<opmath_t> first(lay, a.beta, r0);
  RunRow<opmath_t> following = first; // row r + 1
  following.next(lay);
  // The next row's parameters, where there is one in the range (else this
  // row's: the lanes past the range are computed but not stored).
  const auto params_after = [&](int64_t r, const Params& here) {
    return r + 1 < r1 ? Params::broadcast(a.lines, following.beta, following.c) : here;
  };
  Params here = Params::broadcast(a.lines, first.beta, first.c);
  Params after = params_after(r0, here);
  int64_t r = r0, pos = 0; // the vector's first element: row r, position pos
  const int64_t end = r1 * I;
  for (int64_t f = r0 * I; f < end; f += L::kStep) {
    const int64_t n = std::min(L::kStep, end - f);
    FVec v[L::kNumF], dyv[L::kNumF];
    load_inputs<scalar_t, kGrad>(a, f, n, v, dyv);
    const int64_t in_row = I - pos; // lanes of row r (I >= kStep: the rest are row r + 1's)
    for (const auto j : c10::irange(L::kNumF)) {
      if (in_row >= (j + 1) * L::kWidth) {
        v[j] = acon_c_elementwise<kGrad>(v[j], dyv[j], here.d, here.p2, here.bd);
      } else {
        const FVec mine = FVec::arange(static_cast<opmath_t>(j * L::kWidth), 1) < FVec(static_cast<opmath_t>(in_row));
        v[j] = acon_c_elementwise<kGrad>(
            v[j],
            dyv[j],
            blend_lanes(after.d, here.d, mine),
            blend_lanes(after.p2, here.p2, mine),
            blend_lanes(after.bd, here.bd, mine));
      }
    }
    L::store(a.out + f, n, v);
    pos += L::kStep;
    if (pos >= I) {
      pos -= I;
      ++r;
      following.next(lay);
      here = after;
      after = params_after(r, here);
    }
  }
}

template <typename scalar_t, bool kGrad>
void elementwise_typed(const AconCKernelArgs& args) {
  const ChannelLayout& lay = args.layout;
  if (lay.inner == 1) {
    // Channels innermost: a row is C elements, parameters vary along it.
    const int64_t rows = lay.groups * lay.outer;
    at::parallel_for(0, rows, ceil_div(kGrainElements, lay.channels), [&](int64_t begin, int64_t end) {
      for (int64_t r0 = begin; r0 < end;) { // group by group
        const int64_t g = r0 / lay.outer;
        const int64_t r1 = std::min(end, (g + 1) * lay.outer);
        elementwise_rows_channels_inner<scalar_t, kGrad>(args, g, r0, r1);
        r0 = r1;
      }
    });
  } else {
    // A row is the `inner` elements of one channel: parameters are scalars.
    const int64_t rows = lay.groups * lay.outer * lay.channels;
    const bool stream = lay.inner >= Lanes<scalar_t>::kStep && lay.inner % Lanes<scalar_t>::kStep != 0;
    at::parallel_for(0, rows, ceil_div(kGrainElements, lay.inner), [&](int64_t begin, int64_t end) {
      if (stream) {
        elementwise_stream_channel_runs<scalar_t, kGrad>(args, begin, end);
      } else {
        elementwise_rows_channel_runs<scalar_t, kGrad>(args, begin, end);
      }
    });
  }
}

// Partial sums of the a, b and g terms per channel, in opmath precision.
template <typename opmath_t>
using SumLines = Lines<opmath_t, 3>;

// Adds the kSums sums per channel in `acc` (Lines<opmath_t, kSums>) to the
// double sums sinks[k] (C each; a null sink: that sum stays in acc), or
// assigns them, and zeroes what it moved. Line by line, so that the inner
// loop runs over contiguous values in both.
template <typename opmath_t, int kSums>
void move_line_sums(opmath_t* acc, int64_t C, double* const* sinks, bool assign = false) {
  using SL = Lines<opmath_t, kSums>;
  for (int64_t c0 = 0; c0 < C; c0 += SL::kLine) {
    const int64_t n = std::min(SL::kLine, C - c0);
    for (const auto k : c10::irange(kSums)) {
      if (sinks[k] == nullptr) {
        continue;
      }
      opmath_t* s = acc + SL::index(c0) + k * SL::kLine;
      double* sink = sinks[k] + c0;
      for (int64_t i = 0; i < n; ++i) {
        sink[i] = (assign ? 0.0 : sink[i]) + s[i];
        s[i] = opmath_t(0);
      }
    }
  }
}

// The SumLines sums into a, b and g (any of them may be null).
template <typename opmath_t>
void move_sums(opmath_t* acc, int64_t C, double* a, double* b, double* g, bool assign = false) {
  double* sinks[3] = {a, b, g};
  move_line_sums<opmath_t, 3>(acc, C, sinks, assign);
}

// Adds the a, b and g terms of the kWidth channels from c on to `acc`.
template <typename FVec, typename opmath_t>
C10_ALWAYS_INLINE void add_to_sums(opmath_t* acc, int64_t c, const FVec& a, const FVec& b, const FVec& g) {
  using SL = SumLines<opmath_t>;
  opmath_t* s = acc + SL::index(c);
  (FVec::loadu(s) + a).store(s);
  (FVec::loadu(s + SL::kLine) + b).store(s + SL::kLine);
  (FVec::loadu(s + 2 * SL::kLine) + g).store(s + 2 * SL::kLine);
}

// Backward over `rows` rows of C channels (channels innermost) that span at
// most kChunks vectors of scalar_t, kChunks * kNumF <= kMaxRegisterVectors:
// each chunk's parameters and partial sums stay in registers over all rows.
// dx may be null (no dx wanted). The sums are added into `acc` (SumLines) at
// the end.
constexpr int kMaxRegisterVectors = 4;

template <typename scalar_t, int kChunks>
void backward_narrow_rows(
    const scalar_t* x,
    const scalar_t* dy,
    scalar_t* dx,
    int64_t C,
    int64_t rows,
    const at::opmath_type<scalar_t>* lines,
    const at::opmath_type<scalar_t>* beta,
    at::opmath_type<scalar_t>* acc) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using FVec = typename L::FVec;
  constexpr int kF = L::kNumF;
  FVec d[kChunks][kF], p2[kChunks][kF], bd[kChunks][kF];
  FVec sa[kChunks][kF], sb[kChunks][kF], sg[kChunks][kF];
  int64_t n[kChunks];
  for (const auto k : c10::irange(kChunks)) {
    n[k] = std::min(L::kStep, C - k * L::kStep);
    for (const auto j : c10::irange(kF)) {
      const ChannelParams<FVec, opmath_t> p(lines, beta, k * L::kStep + j * L::kWidth, n[k] - j * L::kWidth);
      d[k][j] = p.d;
      p2[k][j] = p.p2;
      bd[k][j] = p.bd;
      sa[k][j] = sb[k][j] = sg[k][j] = FVec(0);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (const auto k : c10::irange(kChunks)) {
      const int64_t offset = r * C + k * L::kStep;
      FVec xv[kF], dyv[kF];
      L::load(x + offset, n[k], xv);
      L::load(dy + offset, n[k], dyv);
      for (const auto j : c10::irange(kF)) {
        const auto grad = acon_c_grad(xv[j], dyv[j], d[k][j], p2[k][j], bd[k][j]);
        xv[j] = grad.dx;
        grad.add_to(sa[k][j], sb[k][j], sg[k][j]);
      }
      if (dx != nullptr) {
        L::store(dx + offset, n[k], xv);
      }
    }
  }
  for (const auto k : c10::irange(kChunks)) {
    for (const auto j : c10::irange(kF)) {
      add_to_sums(acc, k * L::kStep + j * L::kWidth, sa[k][j], sb[k][j], sg[k][j]);
    }
  }
}

// The n elements at channel c of kRows rows of C channels: x and dy loaded
// (load_rows), dx stored where it is wanted (store_rows). With kPrefetch,
// load_rows also prefetches the next kRows rows (prefetch_next_rows).
template <typename scalar_t, int kRows, bool kPrefetch = false>
C10_ALWAYS_INLINE void load_rows(
    const scalar_t* x,
    const scalar_t* dy,
    int64_t C,
    int64_t c,
    int64_t n,
    typename Lanes<scalar_t>::FVec (*xv)[Lanes<scalar_t>::kNumF],
    typename Lanes<scalar_t>::FVec (*dyv)[Lanes<scalar_t>::kNumF]) {
  if constexpr (kPrefetch) {
    prefetch_next_rows<kRows>(x, C, c);
    prefetch_next_rows<kRows>(dy, C, c);
  }
  for (const auto q : c10::irange(kRows)) {
    Lanes<scalar_t>::load(x + q * C + c, n, xv[q]);
    Lanes<scalar_t>::load(dy + q * C + c, n, dyv[q]);
  }
}

template <typename scalar_t, int kRows>
C10_ALWAYS_INLINE void store_rows(
    scalar_t* dx,
    int64_t C,
    int64_t c,
    int64_t n,
    const typename Lanes<scalar_t>::FVec (*xv)[Lanes<scalar_t>::kNumF]) {
  if (dx != nullptr) {
    for (const auto q : c10::irange(kRows)) {
      Lanes<scalar_t>::store(dx + q * C + c, n, xv[q]);
    }
  }
}

// Backward over kRows rows of C channels (channels innermost), any C: each
// vector of parameters is loaded, and each vector of sums in `acc`
// (SumLines) updated, once for the kRows rows; the terms are added onto the
// sums as loaded (no add of a register total to them). (Channel tiles run
// over many rows would keep both in registers, but rows a multiple of 4 KB
// apart alias in the L1 cache: that measured 3-4x slower than this.)
// Software-pipelined: the loads and exp of the next step are issued before
// the rest of this one, two chains of about half the length that the CPU
// overlaps (a step's work is one dependent chain, some 70 cycles by its
// instructions' latencies, longer than the out-of-order window hides: on a
// Zen 4, AVX-512 build, one thread, cache-hot, 4-6% faster at C = 1024 and
// 4096).
template <typename scalar_t, int kRows>
void backward_wide_rows(
    const scalar_t* x,
    const scalar_t* dy,
    scalar_t* dx,
    int64_t C,
    const at::opmath_type<scalar_t>* lines,
    const at::opmath_type<scalar_t>* beta,
    at::opmath_type<scalar_t>* acc) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using FVec = typename L::FVec;
  using SL = SumLines<opmath_t>;
  constexpr int kF = L::kNumF;
  // The inputs of the step ahead, u = bd * x and t = exp(-|u|), which
  // `front` fills: arrays of registers, copied to the current step's element
  // by element (as a struct copy, GCC kept them in memory).
  using Rows = FVec[kRows][kF];
  Rows xs, dys, us, ts;
  FVec ds[kF], p2s[kF];
  const auto front = [&](int64_t c, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
    load_rows<scalar_t, kRows, (kRows > 1)>(x, dy, C, c, n, xs, dys);
    for (const auto j : c10::irange(kF)) {
      const ChannelParams<FVec, opmath_t> p(lines, beta, c + j * L::kWidth, n - j * L::kWidth);
      ds[j] = p.d;
      p2s[j] = p.p2;
      for (const auto q : c10::irange(kRows)) {
        us[q][j] = p.bd * xs[q][j];
        ts[q][j] = exp_of_minus_abs(us[q][j]);
      }
    }
  };
  const auto back = [&](int64_t c,
                        int64_t n,
                        Rows& cx,
                        const Rows& cdy,
                        const Rows& cu,
                        const Rows& ct,
                        const FVec* cd,
                        const FVec* cp2) C10_ALWAYS_INLINE_ATTRIBUTE {
    for (const auto j : c10::irange(kF)) {
      opmath_t* s = acc + SL::index(c + j * L::kWidth);
      FVec sa = FVec::loadu(s), sb = FVec::loadu(s + SL::kLine), sg = FVec::loadu(s + 2 * SL::kLine);
      for (const auto q : c10::irange(kRows)) {
        const auto grad = acon_c_grad_from(cx[q][j], cdy[q][j], cu[q][j], ct[q][j], cd[j], cp2[j]);
        cx[q][j] = grad.dx;
        grad.add_to(sa, sb, sg);
      }
      sa.store(s);
      sb.store(s + SL::kLine);
      sg.store(s + 2 * SL::kLine);
    }
    store_rows<scalar_t, kRows>(dx, C, c, n, cx);
  };
  // Whole vectors pipelined (n a constant there), then the partial one.
  const int64_t whole = C - C % L::kStep;
  if (whole > 0) {
    front(0, L::kStep);
    for (int64_t c = 0; c < whole; c += L::kStep) {
      Rows cx, cdy, cu, ct;
      FVec cd[kF], cp2[kF];
      for (const auto j : c10::irange(kF)) {
        cd[j] = ds[j];
        cp2[j] = p2s[j];
        for (const auto q : c10::irange(kRows)) {
          cx[q][j] = xs[q][j];
          cdy[q][j] = dys[q][j];
          cu[q][j] = us[q][j];
          ct[q][j] = ts[q][j];
        }
      }
      if (c + L::kStep < whole) {
        front(c + L::kStep, L::kStep);
      }
      back(c, L::kStep, cx, cdy, cu, ct, cd, cp2);
    }
  }
  if (whole < C) {
    front(whole, C - whole);
    back(whole, C - whole, xs, dys, us, ts, ds, p2s);
  }
}

// Backward over kRows rows of C channels (channels innermost) that each are
// a sample of their own, with a per-sample beta (outer == inner == 1, such
// as (N, C) features): each row has its own beta, and its g terms are that
// sample's gradient of beta already, so they are stored straight to
// `g_out[q]` (AconCKernelArgs::grad_beta); the a and b terms are added to
// `acc` (SumLines) as in backward_wide_rows, whose structure this follows.
template <typename scalar_t, int kRows>
void backward_sample_rows(
    const scalar_t* x,
    const scalar_t* dy,
    scalar_t* dx,
    int64_t C,
    const at::opmath_type<scalar_t>* lines,
    const at::opmath_type<scalar_t>* const* betas,
    at::opmath_type<scalar_t>* const* g_out,
    at::opmath_type<scalar_t>* acc) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using FVec = typename L::FVec;
  using SL = SumLines<opmath_t>;
  for (int64_t c = 0; c < C; c += L::kStep) {
    const int64_t n = std::min(L::kStep, C - c);
    FVec xv[kRows][L::kNumF], dyv[kRows][L::kNumF];
    load_rows<scalar_t, kRows>(x, dy, C, c, n, xv, dyv);
    for (const auto j : c10::irange(L::kNumF)) {
      const int64_t cj = c + j * L::kWidth;
      const int64_t count = std::min<int64_t>(L::kWidth, n - j * L::kWidth);
      const FVec d = FVec::loadu(lines + ParamLines<opmath_t>::index(cj));
      const FVec dd = d * d;
      FVec sa(0), sb(0);
      for (const auto q : c10::irange(kRows)) {
        const ChannelParams<FVec, opmath_t> p(lines, betas[q], cj, count);
        const auto grad = acon_c_grad(xv[q][j], dyv[q][j], p.d, p.p2, p.bd);
        xv[q][j] = grad.dx;
        sa = mul_add(grad.b, grad.h, sa);
        sb = sb + grad.b;
        // count <= 0: lanes past C (16-bit rows of under kWidth channels).
        if (count == FVec::size()) {
          grad.g(dd).store(g_out[q] + cj);
        } else if (count > 0) {
          grad.g(dd).store(g_out[q] + cj, count);
        }
      }
      opmath_t* s = acc + SL::index(cj);
      (FVec::loadu(s) + sa).store(s);
      (FVec::loadu(s + SL::kLine) + sb).store(s + SL::kLine);
    }
    store_rows<scalar_t, kRows>(dx, C, c, n, xv);
  }
}

// Where one block's sums go: a and b always into the block's own partials; g
// into the partials too, or straight into args.sum_g (g_direct) when the
// block owns whole groups of a per-sample beta.
struct BlockSinks {
  double* own; // a[C], b[C], g[C]
  bool g_direct;
};

// Backward over rows [u0, u1) of each group in [g0, g1), channels innermost
// (inner == 1). `acc` (3 * padded_channels, 64-byte aligned) collects the
// terms in opmath precision; they move to double every kFlushRows rows, and
// a per-sample beta's g sums at the end of each group.
template <typename scalar_t>
void backward_block_channels_inner(
    const AconCKernelArgs& args,
    int64_t g0,
    int64_t g1,
    int64_t u0,
    int64_t u1,
    const BlockSinks& sinks,
    at::opmath_type<scalar_t>* acc) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  const TypedArgs<scalar_t> a(args);
  const int64_t C = a.C;
  double* own_a = sinks.own;
  double* own_b = own_a + C;
  double* own_g = sinks.g_direct ? nullptr : own_b + C;
  // The block's sums, which its first move writes rather than adds to (the
  // caller does not zero them); `acc` comes zeroed, and every move zeroes
  // what it takes, so it leaves zeroed (lines past C hold zeros' terms).
  bool first_move = true;
  const auto move_own = [&](double* g_sums) {
    move_sums(acc, C, own_a, own_b, g_sums, first_move);
    first_move = false;
  };
  if (args.grad_beta != nullptr) {
    // One row per sample ((N, C) features with an (N, C) beta): rows in
    // pairs, whatever C, and no per-sample sums to move.
    auto* grad_beta = static_cast<opmath_t*>(args.grad_beta);
    for (int64_t g = g0; g < g1;) {
      const int64_t rows = std::min<int64_t>(g1 - g, kFlushRows);
      for (int64_t r = 0; r < rows;) {
        const int64_t q = g + r;
        const opmath_t* betas[2] = {a.beta + q * C, a.beta + (q + 1) * C};
        opmath_t* g_out[2] = {grad_beta + q * C, grad_beta + (q + 1) * C};
        scalar_t* dx = a.out == nullptr ? nullptr : a.out + q * C;
        if (r + 2 <= rows) {
          backward_sample_rows<scalar_t, 2>(a.x + q * C, a.dy + q * C, dx, C, a.lines, betas, g_out, acc);
          r += 2;
        } else {
          backward_sample_rows<scalar_t, 1>(a.x + q * C, a.dy + q * C, dx, C, a.lines, betas, g_out, acc);
          r += 1;
        }
      }
      move_own(nullptr);
      g += rows;
    }
    return;
  }
  // Rows of at most kNarrow channels keep parameters and sums in registers.
  constexpr int kNarrowChunks = kMaxRegisterVectors / L::kNumF;
  constexpr int64_t kNarrow = kNarrowChunks * L::kStep;
  // Wider rows: d, p2, beta and the three sums per channel (rows_in_pairs).
  const bool pairs = rows_in_pairs<opmath_t>(C, 6);
  int64_t pending = 0;
  for (int64_t g = g0; g < g1; ++g) {
    const opmath_t* beta = a.beta + g * C;
    for (int64_t r0 = u0; r0 < u1;) {
      const int64_t r1 = std::min(u1, r0 + kFlushRows - pending);
      const int64_t offset = (g * a.outer + r0) * C;
      const int64_t rows = r1 - r0;
      scalar_t* dx = a.out == nullptr ? nullptr : a.out + offset;
      if (C <= kNarrow) {
        const auto narrow = [&](auto chunk_count) {
          backward_narrow_rows<scalar_t, decltype(chunk_count)::value>(
              a.x + offset, a.dy + offset, dx, C, rows, a.lines, beta, acc);
        };
        switch (ceil_div(C, L::kStep)) {
          case 1:
            narrow(std::integral_constant<int, 1>());
            break;
          case 2:
            narrow(std::integral_constant<int, std::min(2, kNarrowChunks)>());
            break;
          case 3:
            narrow(std::integral_constant<int, std::min(3, kNarrowChunks)>());
            break;
          default:
            narrow(std::integral_constant<int, kNarrowChunks>());
        }
      } else {
        int64_t r = 0;
        for (; pairs && r + 2 <= rows; r += 2) {
          backward_wide_rows<scalar_t, 2>(
              a.x + offset + r * C, a.dy + offset + r * C, dx == nullptr ? nullptr : dx + r * C, C, a.lines, beta, acc);
        }
        for (; r < rows; ++r) {
          backward_wide_rows<scalar_t, 1>(
              a.x + offset + r * C, a.dy + offset + r * C, dx == nullptr ? nullptr : dx + r * C, C, a.lines, beta, acc);
        }
      }
      pending += rows;
      r0 = r1;
      if (pending == kFlushRows) {
        move_own(own_g);
        pending = 0;
      }
    }
    if (sinks.g_direct) {
      move_sums<opmath_t>(acc, C, nullptr, nullptr, args.sum_g + g * C);
    }
  }
  move_own(own_g);
}

// The lanes of a vector whose element index, lane 0's being `first`, lies
// in [lo, hi): to pick between two vectors lane by lane and to add only
// those lanes of a term to a sum (the others may hold NaN or inf).
template <typename V>
struct LaneRange {
  V mask;
  C10_ALWAYS_INLINE LaneRange(int64_t first, int64_t lo, int64_t hi) {
    using T = typename V::value_type;
    const V lane = V::arange(static_cast<T>(first), 1);
    mask = (lane >= V(static_cast<T>(lo))) & (lane < V(static_cast<T>(hi)));
  }
  C10_ALWAYS_INLINE V select(const V& inside, const V& outside) const {
    return blend_lanes(outside, inside, mask);
  }
  C10_ALWAYS_INLINE void add(V& sum, const V& term) const {
    sum = sum + blend_lanes(V(0), term, mask);
  }
  // sum += x * y in these lanes.
  C10_ALWAYS_INLINE void fmadd(V& sum, const V& x, const V& y) const {
    add(sum, x * y);
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// A mask register: no vector compares, and the masked add is one instruction.
template <>
struct LaneRange<Vectorized<float>> {
  __mmask16 mask;
  C10_ALWAYS_INLINE LaneRange(int64_t first, int64_t lo, int64_t hi) {
    const auto below = [first](int64_t end) { return (uint32_t(1) << std::clamp<int64_t>(end - first, 0, 16)) - 1; };
    mask = static_cast<__mmask16>(below(hi) & ~below(lo));
  }
  C10_ALWAYS_INLINE Vectorized<float> select(const Vectorized<float>& inside, const Vectorized<float>& outside) const {
    return _mm512_mask_blend_ps(mask, outside, inside);
  }
  C10_ALWAYS_INLINE void add(Vectorized<float>& sum, const Vectorized<float>& term) const {
    sum = _mm512_mask_add_ps(sum, mask, sum, term);
  }
  C10_ALWAYS_INLINE void fmadd(Vectorized<float>& sum, const Vectorized<float>& x, const Vectorized<float>& y) const {
    sum = _mm512_mask3_fmadd_ps(x, y, sum, mask);
  }
};
#endif

// Lane k of the result: the total of rows[k]'s lanes, for kWidth rows at
// once. One horizontal reduction per row costs log2(kWidth) shuffles and adds
// of a whole vector for one value; here kWidth rows share one transposed tree
// of kWidth - 1 shuffle pairs and adds (on a 7x7 map's backward, AVX-512, the
// per-row reductions took about a sixth of the time). The tree is fixed, so
// the totals are deterministic.
template <typename V>
C10_ALWAYS_INLINE V row_totals(const V* rows) {
  using T = typename V::value_type;
  alignas(64) T totals[V::size()];
#if defined(ACON_PORTABLE_VECTORIZED)
  // vec_reduce_all's order (lane 0, then lanes 1, 2, ... added), over arrays.
  alignas(64) T lanes[V::size()][V::size()];
  for (const auto k : c10::irange(V::size())) {
    rows[k].store(lanes[k]);
  }
  for (const auto k : c10::irange(V::size())) {
    T total = lanes[k][0];
    for (const auto i : c10::irange(1, V::size())) {
      total += lanes[k][i];
    }
    totals[k] = total;
  }
#else
  for (const auto k : c10::irange(V::size())) {
    totals[k] = total_of_lanes(rows[k]);
  }
#endif
  return V::loadu(totals);
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
C10_ALWAYS_INLINE Vectorized<float> row_totals(const Vectorized<float>* rows) {
  // Pairs of rows: each 128-bit quarter holds two half-sums of each row.
  __m512 pairs[8];
  for (const auto i : c10::irange(8)) {
    const __m512 x = rows[2 * i], y = rows[2 * i + 1];
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
  }
  // Fours: each quarter holds its quarter's sum of each of four rows.
  __m512 fours[4];
  for (const auto i : c10::irange(4)) {
    const __m512 x = pairs[2 * i], y = pairs[2 * i + 1];
    fours[i] = _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE));
  }
  // Eights: quarters 0, 1 hold rows 0-3's halves, quarters 2, 3 rows 4-7's.
  __m512 eights[2];
  for (const auto i : c10::irange(2)) {
    const __m512 x = fours[2 * i], y = fours[2 * i + 1];
    eights[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  return _mm512_add_ps(
      _mm512_shuffle_f32x4(eights[0], eights[1], 0x88), _mm512_shuffle_f32x4(eights[0], eights[1], 0xDD));
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
C10_ALWAYS_INLINE Vectorized<float> row_totals(const Vectorized<float>* rows) {
  __m256 pairs[4];
  for (const auto i : c10::irange(4)) {
    const __m256 x = rows[2 * i], y = rows[2 * i + 1];
    pairs[i] = _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
  }
  __m256 fours[2];
  for (const auto i : c10::irange(2)) {
    const __m256 x = pairs[2 * i], y = pairs[2 * i + 1];
    fours[i] = _mm256_add_ps(_mm256_shuffle_ps(x, y, 0x44), _mm256_shuffle_ps(x, y, 0xEE));
  }
  return _mm256_add_ps(
      _mm256_permute2f128_ps(fours[0], fours[1], 0x20), _mm256_permute2f128_ps(fours[0], fours[1], 0x31));
}
#endif

// The a, b and g lane sums of rows of consecutive channels, kept until
// kWidth of them are in (or the next row's channel does not follow on), then
// reduced by row_totals and added to the rows' double sums. For backward
// paths whose rows are each summed once, at their end.
template <typename FVec>
struct PendingRowSums {
  static constexpr int kRows = FVec::size();
  FVec lanes[3][kRows];
  double* sinks[3];
  int64_t first = 0; // the channel of the first pending row
  int count = 0;

  PendingRowSums(double* a, double* b, double* g) : sinks{a, b, g} {}

  C10_ALWAYS_INLINE void add(int64_t c, const FVec& a, const FVec& b, const FVec& g) {
    if (count > 0 && c != first + count) {
      flush();
    }
    if (count == 0) {
      first = c;
    }
    lanes[0][count] = a;
    lanes[1][count] = b;
    lanes[2][count] = g;
    if (++count == kRows) {
      flush();
    }
  }

  void flush() {
    if (count == 0) {
      return;
    }
    using T = typename FVec::value_type;
    for (const auto k : c10::irange(3)) {
      for (int i = count; i < kRows; ++i) {
        lanes[k][i] = FVec(0);
      }
      alignas(64) T totals[kRows];
      row_totals(lanes[k]).store(totals);
      double* sink = sinks[k] + first;
      for (const auto i : c10::irange(count)) {
        sink[i] += totals[i];
      }
    }
    count = 0;
  }
};

// Backward over rows [u0, u1) of each group in [g0, g1), one channel per row
// (inner > 1). Each row's terms are added in opmath lanes, reduced by a
// fixed tree and added to its channel's double sums in row order.
template <typename scalar_t>
void backward_block_channel_runs(
    const AconCKernelArgs& args,
    int64_t g0,
    int64_t g1,
    int64_t u0,
    int64_t u1,
    const BlockSinks& sinks) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using FVec = typename L::FVec;
  using Params = ChannelParams<FVec, opmath_t>;
  const TypedArgs<scalar_t> a(args);
  const int64_t C = a.C;
  const int64_t I = a.inner;
  const int64_t group_rows = a.outer * C;
  double* own_a = sinks.own;
  double* own_b = own_a + C;
  // Runs at least a vector long that are not a whole number of vectors,
  // and shorter than a flush interval (7x7, 14x14 maps), go as one stream of
  // whole vectors, as in elementwise_stream_channel_runs; the others row by
  // row, a partial vector at the end of a run that needs one.
  const bool stream = I >= L::kStep && I % L::kStep != 0 && I < kFlushElements;

  for (int64_t g = g0; g < g1; ++g) {
    const opmath_t* beta = a.beta + g * C;
    double* g_sums = sinks.g_direct ? args.sum_g + g * C : own_b + C;
    const int64_t r_begin = g * group_rows + u0, r_end = g * group_rows + u1;
    int64_t c = u0 % C;
    FVec acc_a[L::kNumF], acc_b[L::kNumF], acc_g[L::kNumF];
    const auto clear = [](FVec* v) {
      for (const auto j : c10::irange(L::kNumF)) {
        v[j] = FVec(0);
      }
    };
    // Moves the lanes' sums to channel c's double sums; at a row's end, for
    // rows shorter than a flush interval, through `rows` to batch the
    // reductions.
    PendingRowSums<FVec> rows(own_a, own_b, g_sums);
    const auto flush = [&] {
      own_a[c] += L::sum(acc_a);
      own_b[c] += L::sum(acc_b);
      g_sums[c] += L::sum(acc_g);
      clear(acc_a);
      clear(acc_b);
      clear(acc_g);
    };
    const auto end_row = [&] {
      if (I >= kFlushElements) {
        flush();
        return;
      }
      rows.add(c, L::lane_total(acc_a), L::lane_total(acc_b), L::lane_total(acc_g));
      clear(acc_a);
      clear(acc_b);
      clear(acc_g);
    };
    clear(acc_a);
    clear(acc_b);
    clear(acc_g);
    if (!stream) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        const Params p = Params::broadcast(a.lines, beta, c);
        int64_t pending = 0;
        for (int64_t i = 0; i < I; i += L::kStep) {
          const int64_t n = std::min(L::kStep, I - i);
          FVec xv[L::kNumF], dyv[L::kNumF];
          L::load(a.x + r * I + i, n, xv);
          L::load(a.dy + r * I + i, n, dyv);
          for (const auto j : c10::irange(L::kNumF)) {
            const auto grad = acon_c_grad(xv[j], dyv[j], p.d, p.p2, p.bd);
            xv[j] = grad.dx;
            if (n >= (j + 1) * L::kWidth) {
              grad.add_to(acc_a[j], acc_b[j], acc_g[j]);
              continue;
            }
            // The lanes past the run hold zeros, whose terms are not all
            // zero (0 * inf with an infinite beta): left out.
            const LaneRange<FVec> valid(j * L::kWidth, 0, n);
            grad.add_to(valid, acc_a[j], acc_b[j], acc_g[j]);
          }
          if (a.out != nullptr) {
            L::store(a.out + r * I + i, n, xv);
          }
          if ((pending += n) >= kFlushElements) {
            flush();
            pending = 0;
          }
        }
        end_row();
        c = c + 1 == C ? 0 : c + 1;
      }
      rows.flush();
      continue;
    }
    // The stream: a vector spans at most two rows (I >= kStep); the terms
    // of its lanes of row r go to acc_*, those of row r + 1 to next_*. Rows
    // are shorter than kFlushElements a lane. One loop over vectors:
    // `front` loads a vector and computes its u and t, with a cursor and
    // parameters of its own; `back` finishes it and ends the rows. On
    // AVX-512 software-pipelined as backward_wide_rows is (the next
    // vector's front before this one's back); with AVX2's 16 vector
    // registers the two steps' state spilled and that measured slower.
    constexpr int kF = L::kNumF;
#if defined(CPU_CAPABILITY_AVX512)
    constexpr bool kPipelineStream = true;
#else
    constexpr bool kPipelineStream = false;
#endif
    const auto channel_after = [&](int64_t channel) { return channel + 1 == C ? 0 : channel + 1; };
    const int64_t end = r_end * I;
    // front's cursor: the next vector starts at f, in the row that ends at
    // row_end, whose parameters are `here`; `after` are the next row's (or
    // here's, past the range's end: those lanes are computed, not stored).
    int64_t f = r_begin * I, row_end = f + I, front_c = c;
    const auto params_after = [&](const Params& row) {
      return row_end < end ? Params::broadcast(a.lines, beta, channel_after(front_c)) : row;
    };
    Params here = Params::broadcast(a.lines, beta, front_c);
    Params after = params_after(here);
    // The step ahead, as `front` leaves it: its first element, length, and
    // lanes in its first row.
    FVec xs[kF], dys[kF], us[kF], ts[kF], ds[kF], p2s[kF];
    int64_t step_f = 0, step_n = 0, step_in_row = 0;
    const auto front = [&]() C10_ALWAYS_INLINE_ATTRIBUTE {
      step_f = f;
      step_n = std::min(L::kStep, end - f);
      step_in_row = row_end - f;
      L::load(a.x + f, step_n, xs);
      L::load(a.dy + f, step_n, dys);
      for (const auto j : c10::irange(kF)) {
        if (step_in_row >= (j + 1) * L::kWidth) {
          ds[j] = here.d;
          p2s[j] = here.p2;
          us[j] = here.bd * xs[j];
        } else {
          const LaneRange<FVec> mine(j * L::kWidth, 0, step_in_row);
          ds[j] = mine.select(here.d, after.d);
          p2s[j] = mine.select(here.p2, after.p2);
          us[j] = mine.select(here.bd, after.bd) * xs[j];
        }
        ts[j] = exp_of_minus_abs(us[j]);
      }
      f += L::kStep;
      if (f >= row_end) {
        row_end += I;
        front_c = channel_after(front_c);
        here = after;
        after = params_after(here);
      }
    };
    const auto back = [&](int64_t vf,
                          int64_t n,
                          int64_t in_row,
                          FVec* cx,
                          const FVec* cdy,
                          const FVec* cu,
                          const FVec* ct,
                          const FVec* cd,
                          const FVec* cp2) C10_ALWAYS_INLINE_ATTRIBUTE {
      if (in_row > L::kStep) { // within row r (so n == kStep)
        for (const auto j : c10::irange(kF)) {
          const auto grad = acon_c_grad_from(cx[j], cdy[j], cu[j], ct[j], cd[j], cp2[j]);
          cx[j] = grad.dx;
          grad.add_to(acc_a[j], acc_b[j], acc_g[j]);
        }
        if (a.out != nullptr) {
          L::store(a.out + vf, L::kStep, cx);
        }
        return;
      }
      // The vector that ends row r: its lanes past in_row start row r + 1
      // (none past the range's end, n).
      FVec next_a[kF], next_b[kF], next_g[kF];
      for (const auto j : c10::irange(kF)) {
        const int64_t lane0 = j * L::kWidth;
        const LaneRange<FVec> mine(lane0, 0, in_row), theirs(lane0, in_row, n);
        const auto grad = acon_c_grad_from(cx[j], cdy[j], cu[j], ct[j], cd[j], cp2[j]);
        cx[j] = grad.dx;
        grad.add_to(mine, acc_a[j], acc_b[j], acc_g[j]);
        next_a[j] = next_b[j] = next_g[j] = FVec(0);
        grad.add_to(theirs, next_a[j], next_b[j], next_g[j]);
      }
      if (a.out != nullptr) {
        L::store(a.out + vf, n, cx);
      }
      end_row();
      for (const auto j : c10::irange(kF)) {
        acc_a[j] = next_a[j];
        acc_b[j] = next_b[j];
        acc_g[j] = next_g[j];
      }
      c = channel_after(c);
    };
    front();
    for (;;) {
      FVec cx[kF], cdy[kF], cu[kF], ct[kF], cd[kF], cp2[kF];
      for (const auto j : c10::irange(kF)) {
        cx[j] = xs[j];
        cdy[j] = dys[j];
        cu[j] = us[j];
        ct[j] = ts[j];
        cd[j] = ds[j];
        cp2[j] = p2s[j];
      }
      const int64_t vf = step_f, n = step_n, in_row = step_in_row;
      const bool more = f < end;
      if (kPipelineStream && more) {
        front();
      }
      back(vf, n, in_row, cx, cdy, cu, ct, cd, cp2);
      if (!more) {
        break;
      }
      if (!kPipelineStream) {
        front();
      }
    }
    rows.flush();
  }
}

// dst[i] += src[i], i < n, in vectors (the compiler would not vectorize the
// loop: dst and src might overlap). Each element is one addition, so the
// result is the same as the loop's.
void add_into(double* dst, const double* src, int64_t n) {
  using DVec = Vectorized<double>;
  int64_t i = 0;
  for (; i + DVec::size() <= n; i += DVec::size()) {
    (DVec::loadu(dst + i) + DVec::loadu(src + i)).store(dst + i);
  }
  for (; i < n; ++i) {
    dst[i] += src[i];
  }
}

// The number of reduction blocks for about `wanted` (numel / kBlockElements)
// within `max_blocks`: more than one is rounded up to a multiple of
// kBlockMultiple where that fits. at::parallel_for gives each thread a
// contiguous run of blocks, and 25 blocks on 2 threads (a 16x2048x7x7
// input) left one thread 13 of them.
int64_t reduction_blocks(int64_t wanted, int64_t max_blocks) {
  const int64_t rounded = wanted > 1 ? ceil_div(wanted, kBlockMultiple) * kBlockMultiple : 1;
  return rounded <= max_blocks ? rounded : std::clamp<int64_t>(wanted, 1, max_blocks);
}

// The channels a block's sums reach, [first, first + count) modulo C: its
// partials are zero elsewhere, so the rest is neither cleared nor combined
// (a block of channel runs of a 16x2048x7x7 input reaches a half to two
// thirds of the 2048 channels; clearing and combining whole lines of
// partials took 5-17% of the backward's profile samples, 2 threads).
struct ChannelSpan {
  int64_t C, first, count;

  static ChannelSpan all(int64_t C) {
    return {C, 0, C};
  }
  // Runs [u0, u1), run r being channel r % C.
  static ChannelSpan of_runs(int64_t C, int64_t u0, int64_t u1) {
    return u1 - u0 >= C ? all(C) : ChannelSpan{C, u0 % C, u1 - u0};
  }
  // Calls f(lo, hi) for the (one or two) intervals of the span in [c0, c1).
  template <typename F>
  void within(int64_t c0, int64_t c1, const F& f) const {
    const int64_t spans[2][2] = {{first, std::min(first + count, C)}, {0, first + count - C}};
    for (const auto& span : spans) {
      const int64_t lo = std::max(span[0], c0), hi = std::min(span[1], c1);
      if (lo < hi) {
        f(lo, hi);
      }
    }
  }
  // Zeroes the span in each of `lines` lines of C doubles.
  void clear(double* partials, int lines) const {
    within(0, C, [&](int64_t lo, int64_t hi) {
      for (const auto line : c10::irange(lines)) {
        std::fill(partials + line * C + lo, partials + line * C + hi, 0.0);
      }
    });
  }
};

template <typename scalar_t>
void backward_typed(const AconCKernelArgs& args) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ChannelLayout& lay = args.layout;
  const int64_t C = lay.channels;
  const bool channels_inner = lay.inner == 1;
  const int64_t units = channels_inner ? lay.outer : lay.outer * C; // rows per group
  const int64_t numel = lay.groups * lay.outer * C * lay.inner;

  // A block covers either whole groups or a slice of one group.
  const int64_t max_blocks = std::clamp<int64_t>(kPartialBudget / (3 * C), 1, kMaxBlocks);
  const int64_t target = reduction_blocks(ceil_div(numel, kBlockElements), max_blocks);
  const bool whole_groups = lay.groups >= target;
  const int64_t splits = whole_groups ? 1 : std::min(ceil_div(target, lay.groups), units);
  const int64_t blocks = whole_groups ? target : lay.groups * splits;
  // A block owns whole groups also when a group is not split (one unit).
  const bool g_direct = lay.per_sample_beta && (whole_groups || splits == 1);
  // The caller asks for grad_beta exactly when every sample is one row.
  TORCH_INTERNAL_ASSERT(
      (args.grad_beta != nullptr) == (lay.per_sample_beta && lay.outer == 1 && lay.inner == 1) &&
      (args.grad_beta == nullptr || g_direct));

  // Block k's groups [g0, g1) and rows [u0, u1) of each.
  const auto block_rows = [&](int64_t k) -> std::array<int64_t, 4> {
    if (whole_groups) {
      return {k * lay.groups / blocks, (k + 1) * lay.groups / blocks, 0, units};
    }
    return {k / splits, k / splits + 1, (k % splits) * units / splits, (k % splits + 1) * units / splits};
  };
  const auto block_channels = [&](int64_t k) {
    const auto [g0, g1, u0, u1] = block_rows(k);
    return channels_inner || g1 - g0 > 1 ? ChannelSpan::all(C) : ChannelSpan::of_runs(C, u0, u1);
  };

  // partial[k] holds block k's sums: a[C], b[C], g[C].
  double* partial = thread_scratch<double>(kPartialsSlot, blocks * 3 * C);
  at::parallel_for(0, blocks, 1, [&](int64_t kb, int64_t ke) {
    // Per worker thread, for the channels-innermost kernel.
    // Zeroed once: the channels-innermost blocks leave it zeroed.
    opmath_t* acc = channels_inner ? thread_scratch<opmath_t>(kAccumulatorSlot, 3 * args.padded_channels) : nullptr;
    if (channels_inner) {
      std::fill(acc, acc + 3 * args.padded_channels, opmath_t(0));
    }
    for (int64_t k = kb; k < ke; ++k) {
      double* own = partial + k * 3 * C;
      if (!channels_inner) { // the runs add to theirs; channels-innermost blocks write theirs
        block_channels(k).clear(own, 3);
      }
      const auto [g0, g1, u0, u1] = block_rows(k);
      const BlockSinks sinks{own, g_direct};
      if (channels_inner) {
        backward_block_channels_inner<scalar_t>(args, g0, g1, u0, u1, sinks, acc);
      } else {
        backward_block_channel_runs<scalar_t>(args, g0, g1, u0, u1, sinks);
      }
    }
  });

  // Fixed-order combine of the block partials: each channel adds its blocks
  // in block order, channels split among the threads (with C = 4096 and 21
  // blocks, one thread's serial combine was 10-15% of the backward).
  at::parallel_for(0, C, kGrainElements / (3 * blocks) + 1, [&](int64_t c0, int64_t c1) {
    for (int64_t k = 0; k < blocks; ++k) {
      const double* own = partial + k * 3 * C;
      // Without g_direct, block k adds to group k / splits for a per-sample
      // beta (whole_groups is false then), and to the single row otherwise.
      // (sum_g is null with grad_beta: no offset taken from it then.)
      double* g_row = g_direct ? nullptr : lay.per_sample_beta ? args.sum_g + (k / splits) * C : args.sum_g;
      block_channels(k).within(c0, c1, [&](int64_t lo, int64_t hi) {
        add_into(args.sum_a + lo, own + lo, hi - lo);
        add_into(args.sum_b + lo, own + C + lo, hi - lo);
        if (!g_direct) {
          add_into(g_row + lo, own + 2 * C + lo, hi - lo);
        }
      });
    }
  });
  if (args.sum_g != nullptr) {
    const auto* lines = static_cast<const opmath_t*>(args.params);
    const int64_t rows = lay.per_sample_beta ? lay.groups : 1;
    scale_by_d_squared(args.sum_g, rows, C, C, [&](int64_t, int64_t c) {
      return static_cast<double>(lines[ParamLines<opmath_t>::index(c)]);
    });
  }
}

// args with their ParamLines built, in the calling thread's scratch.
template <typename scalar_t>
AconCKernelArgs with_param_lines(const AconCKernelArgs& args) {
  using opmath_t = at::opmath_type<scalar_t>;
  using PL = ParamLines<opmath_t>;
  opmath_t* lines = thread_scratch<opmath_t>(kLinesSlot, 2 * args.padded_channels);
  std::fill(lines, lines + 2 * args.padded_channels, opmath_t(0));
  const auto* p1 = static_cast<const opmath_t*>(args.p1);
  const auto* p2 = static_cast<const opmath_t*>(args.p2);
  for (int64_t c = 0; c < args.layout.channels; ++c) {
    opmath_t* line = lines + PL::index(c);
    line[0] = p1[c] - p2[c];
    line[PL::kLine] = p2[c];
  }
  AconCKernelArgs out = args;
  out.params = lines;
  return out;
}

} // namespace

void acon_c_forward_kernel(const AconCKernelArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "acon_c_forward_cpu", [&] {
    elementwise_typed<scalar_t, false>(with_param_lines<scalar_t>(args));
  });
}

void acon_c_backward_kernel(const AconCKernelArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "acon_c_backward_cpu", [&] {
    const AconCKernelArgs with_lines = with_param_lines<scalar_t>(args);
    if (args.sum_a == nullptr) {
      elementwise_typed<scalar_t, true>(with_lines);
    } else {
      backward_typed<scalar_t>(with_lines);
    }
  });
}

} // namespace acon_cuda::cpu::CPU_CAPABILITY
