// Storage types: the element types the kernels read and write, and the arithmetic each is
// computed in.
//
// float32, float16 and bfloat16 tensors are computed in float32 lanes, float64 ones in
// float64 lanes (acc_t<T>). A 2-byte element is widened as it is loaded and rounded back
// (to nearest, ties to even, as torch's c10::Half and c10::BFloat16 round) as it is
// stored, so each value is read and written once in its own size: the kernels move the
// same bytes as a copy. Parameters, running statistics and returned statistics are
// acc_t<T> (float32 under a half input, as torch.nn keeps them).
//
// One vector is kVecBytes of compute lanes: 16 floats or 8 doubles (the 16 halves behind
// one float vector are 32 bytes). float16 converts with F16C (AVX-512F: one instruction per
// vector) where the build machine has it, else bit by bit; bfloat16 is the upper half of a
// float32 and widens with an integer shift, and rounds with AVX512-BF16 where there is one,
// else in integers. The kernels are compiled with -march=native on the machine that runs
// them (see _loader.py), so the #if branches below test the features of that machine.

#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace normcore {

// For the per-vector helpers below: GCC otherwise leaves a big one (store_pair for
// bfloat16) out of line in some loops, a call per 32 values.
#define NORMCORE_VECTOR_INLINE inline __attribute__((always_inline))

struct f16 {  // IEEE binary16, torch.float16
  uint16_t bits;
};
struct bf16 {  // the upper 16 bits of a float32, torch.bfloat16
  uint16_t bits;
};

template <class T>
struct Traits {
  using acc = float;  // float, f16, bf16
};
template <>
struct Traits<double> {
  using acc = double;
};
template <class T>
using acc_t = typename Traits<T>::acc;

constexpr int kVecBytes = 64;
template <class A>
struct VecOf {
  typedef A type __attribute__((vector_size(kVecBytes)));
};
template <class A>
using vec_t = typename VecOf<A>::type;  // compute lanes: vec_t<float> or vec_t<double>
template <class A>
constexpr int kLanesOf = kVecBytes / sizeof(A);

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// --- one value ------------------------------------------------------------------------------

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE half to float, exact; integer operations only (no rounding to get wrong).
inline float half_to_float_bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return bits_to_float(sign | 0x7F800000u | (m << 13));  // Inf, NaN
  if (e == 0) {
    if (m == 0) return bits_to_float(sign);
    for (e = 113; !(m & 0x400u); --e) m <<= 1;  // subnormal: normalize
    m &= 0x3FFu;
    return bits_to_float(sign | (e << 23) | (m << 13));
  }
  return bits_to_float(sign | ((e + 112) << 23) | (m << 13));
}

// float to IEEE half, rounded to nearest even; integer operations only.
inline uint16_t float_to_half_bits(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x > 0x7F800000u) return sign | 0x7E00u;     // NaN
  if (x >= 0x477FF000u) return sign | 0x7C00u;    // rounds to 65520 or more: Inf
  if (x >= 0x38800000u) {                         // normal: rebias, round off 13 bits
    const uint32_t r = x - 0x38000000u;
    return static_cast<uint16_t>(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
  }
  if (x < 0x33000000u) return sign;               // below 2^-25: zero
  const uint32_t shift = 126 - (x >> 23), m = (x & 0x7FFFFFu) | 0x800000u;  // subnormal
  const uint32_t r = m >> shift, rest = m & ((1u << shift) - 1), tie = 1u << (shift - 1);
  return static_cast<uint16_t>(sign | (r + (rest > tie || (rest == tie && (r & 1u)))));
}

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(bf16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
inline float widen(f16 x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  return half_to_float_bits(x.bits);
#endif
}

// float to bfloat16, rounded to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16_bits(float f) {
  if (f != f) return 0x7FC0;
  const uint32_t u = float_to_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <class T>
inline T narrow(acc_t<T> v);
template <>
inline float narrow<float>(float v) { return v; }
template <>
inline double narrow<double>(double v) { return v; }
template <>
inline bf16 narrow<bf16>(float v) { return {float_to_bf16_bits(v)}; }
template <>
inline f16 narrow<f16>(float v) {
#if defined(__F16C__)
  return {static_cast<uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT))};
#else
  return {float_to_half_bits(v)};
#endif
}

// --- one vector -----------------------------------------------------------------------------

inline vec_t<float> load(const float* p) {
  vec_t<float> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vec_t<double> load(const double* p) {
  vec_t<double> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vec_t<float> load(const bf16* p) {
#if defined(__AVX512F__)
  const __m512i w = _mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
#endif
  vec_t<float> v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline vec_t<float> load(const f16* p) {
  vec_t<float> v;
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &f, sizeof v);
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&v, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof lo, &hi, sizeof hi);
#else
  for (int i = 0; i < 16; ++i) v[i] = half_to_float_bits(p[i].bits);
#endif
  return v;
}

inline void store(float* p, vec_t<float> v) { std::memcpy(p, &v, sizeof v); }
inline void store(double* p, vec_t<double> v) { std::memcpy(p, &v, sizeof v); }

#if defined(__AVX512F__)
// The 16 bfloat16 values of v, rounded to nearest even (NaN stays a quiet NaN).
NORMCORE_VECTOR_INLINE __m256i bf16_words(vec_t<float> v) {
  __m512 f;
  std::memcpy(&f, &v, sizeof f);
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  // One instruction, rounding to nearest even as c10::BFloat16 does, except that it flushes
  // subnormal inputs to zero: vectors with one (0x20: the denormal class) round in integers.
  if (__builtin_expect(_mm512_fpclass_ps_mask(f, 0x20) == 0, 1)) {
    const __m256bh h = _mm512_cvtneps_pbh(f);
    __m256i w;
    std::memcpy(&w, &h, sizeof w);
    return w;
  }
#endif
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
  __m512i r = _mm512_srli_epi32(up, 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q),
                            _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
#endif

NORMCORE_VECTOR_INLINE void store(bf16* p, vec_t<float> v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_words(v));
#else
  u32x16 u;
  std::memcpy(&u, &v, sizeof u);
  const u32x16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const i32x16 nan = v != v;  // all ones in the NaN lanes
  u32x16 keep;
  std::memcpy(&keep, &nan, sizeof keep);
  const u16x16 h = __builtin_convertvector((rounded & ~keep) | (0x7FC0u & keep), u16x16);
  std::memcpy(p, &h, sizeof h);
#endif
}

inline void store(f16* p, vec_t<float> v) {
#if defined(__AVX512F__)
  __m512 f;
  std::memcpy(&f, &v, sizeof f);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  __m256 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8),
                   _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < 16; ++i) p[i].bits = float_to_half_bits(v[i]);
#endif
}

// --- two vectors ----------------------------------------------------------------------------
//
// load_pair fills two vectors of compute lanes from the 2 * kLanesOf<acc_t<T>> values at p,
// store_pair writes them back in the same order. For most types that is two loads (two
// stores). A bfloat16 is the upper half of a float32, so one 64-byte load of 32 of them
// holds the odd-indexed values in place (mask the lower halves off) and the even-indexed
// ones a shift away: one integer operation per vector instead of a widening and a shift.
// The lanes are then permuted (u: values 0, 2, 4, ...; v: 1, 3, 5, ...), which sums do not
// mind, nor a map that treats every lane alike, and store_pair puts them back in order.

template <class T, class A = acc_t<T>>
inline void load_pair(const T* p, vec_t<A>& u, vec_t<A>& v) {
  u = load(p);
  v = load(p + kLanesOf<A>);
}

inline void load_pair(const bf16* p, vec_t<float>& u, vec_t<float>& v) {
  u32x16 w;
  std::memcpy(&w, p, sizeof w);
  const u32x16 even = w << 16, odd = w & 0xFFFF0000u;
  std::memcpy(&u, &even, sizeof u);
  std::memcpy(&v, &odd, sizeof v);
}

template <class T, class A = acc_t<T>>
inline void store_pair(T* p, vec_t<A> u, vec_t<A> v) {
  store(p, u);
  store(p + kLanesOf<A>, v);
}

NORMCORE_VECTOR_INLINE void store_pair(bf16* p, vec_t<float> u, vec_t<float> v) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // Rounded words of u in the lower half, of v in the upper one, interleaved by one permute.
  __m512i words;
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  __m512 fu, fv;
  std::memcpy(&fu, &u, sizeof fu);
  std::memcpy(&fv, &v, sizeof fv);
  // One instruction for both, unless one has a subnormal (bf16_words).
  // kortest tests both masks in one instruction, where moving them out to add them took four.
  if (__builtin_expect(_kortestz_mask16_u8(_mm512_fpclass_ps_mask(fu, 0x20),
                                           _mm512_fpclass_ps_mask(fv, 0x20)),
                       1)) {
    const __m512bh h = _mm512_cvtne2ps_pbh(fv, fu);
    std::memcpy(&words, &h, sizeof words);
  } else
#endif
  words = _mm512_inserti64x4(_mm512_castsi256_si512(bf16_words(u)), bf16_words(v), 1);
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                         25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
                                         18, 2, 17, 1, 16, 0);
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(order, words));
#else
  bf16 even[16], odd[16];
  store(even, u);
  store(odd, v);
  for (int i = 0; i < 16; ++i) {
    p[2 * i] = even[i];
    p[2 * i + 1] = odd[i];
  }
#endif
}

}  // namespace normcore
