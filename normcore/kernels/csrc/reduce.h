// Vector building blocks: shifted sums for statistics, and the affine maps that normalize.
//
// Statistics are shifted sums: with k the first value of the reduced set and d = x - k,
// sum(d) and sum(d*d) are accumulated in vector lanes of acc_t<T> (float32, or float64 for
// float64 inputs) over blocks of kBlock values and in double across blocks. |mean - k| is
// a few standard deviations, so
//     var = sum(d*d)/n - (sum(d)/n)^2
// keeps its digits where E[x^2] - E[x]^2 cancels (|mean|/std of 1e4 in float32). Where the
// first value is an outlier instead, the set is summed again around its mean (off_center).
// Outputs are formed from d too, y = d*a + (b - dm*a) with dm = mean - k: x - k is exact
// for x near k, so outputs stay accurate far from zero.
//
// Outputs larger than the caches are written with non-temporal (streaming) stores: they
// skip reading each destination line before overwriting it (a third of the memory traffic
// of a one-read-one-write kernel) and do not evict the input. Smaller outputs get ordinary
// stores: they are still in cache when the next operation reads them, and measured on a
// Sapphire Rapids VM, streaming loses up to 15% as long as input and output fit in L3.
// The threshold is glibc's for memcpy: 3/4 of the L3 cache (at least 4 times the L2).
//
// Every function is a template over the storage type T of x and y (convert.h): float,
// f16, bf16 or double, computed in acc_t<T>. GCC's vector extensions compile to whatever
// the build machine has (AVX-512, AVX2, SSE).

#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "convert.h"

namespace normcore {

constexpr int64_t kBlock = 2048;  // values summed in vector lanes before a double add
// Passes that stream through x ask for the line this many bytes ahead as they read: one
// core alone keeps too few misses in flight to stream from L3 or memory at full speed
// (statistics a third faster on 2-byte inputs, scale-and-shift a few percent, measured on
// a Sapphire Rapids VM).
constexpr int kPrefetch = 2048;

template <class A>
inline vec_t<A> splat(A v) {
  return vec_t<A>{} + v;
}

// Bytes of T behind one vector of compute lanes: 64 (float, double) or 32 (f16, bf16).
template <class T>
constexpr int kStoreBytes = kLanesOf<acc_t<T>> * static_cast<int>(sizeof(T));

// Non-temporal stores of kBytes (32 or 64) from s to p, p aligned to kBytes.
template <int kBytes>
inline void stream_bytes(void* p, const char* s) {
#if defined(__AVX512F__)
  if constexpr (kBytes == 64) {
    __m512i v;
    std::memcpy(&v, s, sizeof v);
    return _mm512_stream_si512(static_cast<__m512i*>(p), v);
  }
#endif
#if defined(__AVX__)
  for (int i = 0; i < kBytes; i += 32) {
    __m256i v;
    std::memcpy(&v, s + i, sizeof v);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<char*>(p) + i), v);
  }
#elif defined(__SSE2__)
  for (int i = 0; i < kBytes; i += 16) {
    __m128i v;
    std::memcpy(&v, s + i, sizeof v);
    _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(p) + i), v);
  }
#else
  std::memcpy(p, s, kBytes);
#endif
}

// Stores a vector to p; kStream: non-temporal, and p must be aligned to kStoreBytes<T>.
template <bool kStream, class T>
inline void put(T* p, vec_t<acc_t<T>> v) {
  if (!kStream) return store(p, v);
  alignas(kVecBytes) T out[kLanesOf<acc_t<T>>];
  store(out, v);
  stream_bytes<kStoreBytes<T>>(p, reinterpret_cast<const char*>(out));
}

// put for the two vectors of a load_pair (convert.h).
template <bool kStream, class T>
inline void put_pair(T* p, vec_t<acc_t<T>> u, vec_t<acc_t<T>> v) {
  if (!kStream) return store_pair(p, u, v);
  constexpr int n = 2 * kLanesOf<acc_t<T>>;
  alignas(kVecBytes) T out[n];
  store_pair(out, u, v);
  const char* s = reinterpret_cast<const char*>(out);
  stream_bytes<kStoreBytes<T>>(p, s);
  stream_bytes<kStoreBytes<T>>(p + n / 2, s + kStoreBytes<T>);
}

// Values before the first aligned vector address from y + i0 (streamed stores need it).
template <bool kStream, class T>
inline int64_t head(const T* y, int64_t i0, int64_t i1) {
  if (!kStream) return i0;
  const auto misaligned = reinterpret_cast<uintptr_t>(y + i0) % kStoreBytes<T>;
  const int64_t skip = misaligned ? (kStoreBytes<T> - misaligned) / sizeof(T) : 0;
  return std::min(i1, i0 + skip);
}

// Makes a thread's streamed stores visible before it reports its chunk done.
inline void stream_fence() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_sfence();
#endif
}

// One core's L2 cache in bytes, 1 MB where the system does not say.
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? int64_t{l2} : int64_t{1} << 20;
  }();
  return bytes;
}

// Outputs of at least this many bytes are streamed. Not sooner, even where the L3 is a
// whole socket's, shared with other tenants: streamed from 12 MB, 16-32 MB layer calls
// took 4-17% less time, but a call and a read of its output (the reply's encoding, the
// next layer) 26-35% more, measured on a 2-vCPU VM that sees a 300 MB L3.
inline int64_t& stream_threshold() {
  static int64_t threshold = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return std::max<int64_t>(4 * l2_cache_bytes(), l3 > 0 ? l3 / 4 * 3 : 0);
  }();
  return threshold;
}

inline bool streaming(int64_t bytes) { return bytes >= stream_threshold(); }

// f(std::true_type) if an output of this many values of T is streamed, else
// f(std::false_type).
template <class T, class F>
void with_stream(int64_t values, const F& f) {
  if (streaming(values * static_cast<int64_t>(sizeof(T))))
    f(std::true_type{});
  else
    f(std::false_type{});
}

// Sum of the lanes, pairwise (halves, then quarters, ...): a few roundings, far below a
// block's own.
template <class A>
inline A hsum(vec_t<A> v) {
  constexpr int n = kLanesOf<A>;
  A a[n];
  std::memcpy(a, &v, sizeof a);
  for (int w = n / 2; w >= 4; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return (a[0] + a[2]) + (a[1] + a[3]);
}

struct Sums {
  double s1 = 0, s2 = 0;
  Sums& operator+=(const Sums& o) {
    s1 += o.s1;
    s2 += o.s2;
    return *this;
  }
};

// s.s1 += sum(x - k), s.s2 += sum((x - k)^2) over n contiguous values. Without kMean
// only s.s2 = sum(x^2) is wanted (k is 0).
template <bool kMean, class T>
void add_sums(const T* x, int64_t n, acc_t<T> k, Sums& s) {
  using A = acc_t<T>;
  constexpr int L = kLanesOf<A>;
  const vec_t<A> kv = splat(k);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    vec_t<A> a1 = {}, a2 = {}, c1 = {}, c2 = {};
    int64_t i = b;
    for (; i + 2 * L <= e; i += 2 * L) {
      __builtin_prefetch(reinterpret_cast<const char*>(x + i) + kPrefetch, 0, 3);
      vec_t<A> u, v;
      load_pair(x + i, u, v);  // for bfloat16, permuted lanes (convert.h)
      const vec_t<A> d = u - kv, f = v - kv;
      if (kMean) {
        a1 += d;
        c1 += f;
      }
      a2 += d * d;
      c2 += f * f;
    }
    A t1 = 0, t2 = 0;
    for (; i < e; ++i) {
      const A d = widen(x[i]) - k;
      t1 += d;
      t2 += d * d;
    }
    if (kMean) s.s1 += static_cast<double>(hsum<A>(a1 + c1)) + t1;
    s.s2 += static_cast<double>(hsum<A>(a2 + c2)) + t2;
  }
}

// Finished statistics of n values shifted by k.
struct Moments {
  double dm;    // mean - k
  double mean;  // k + dm
  double var;   // biased
  bool finite() const { return std::isfinite(mean) && std::isfinite(var); }
};

inline Moments moments(const Sums& s, int64_t n, double k) {
  const double dm = s.s1 / n, var = s.s2 / n - dm * dm;
  // A tiny negative from rounding becomes 0; NaN (Inf - Inf from an infinite input) stays.
  return {dm, k + dm, var < 0.0 ? 0.0 : var};
}

// The shift of a reduced set: its first value, or 0 if that is not finite (an infinite
// shift would make every d NaN, where the sums of the values keep torch's Inf mean).
template <class T>
inline acc_t<T> shift_of(T first) {
  const acc_t<T> k = widen(first);
  return std::isfinite(k) ? k : acc_t<T>{0};
}

// Whether sums around k lost digits because k was far from the mean: a set's first value
// that is an outlier. Its lanes keep about 2^-24 of var + dm^2 each (float32), so var
// keeps dm^2 / var times less of its own, and d * d may even overflow. Such a set is summed
// again around its mean (recentered): more than kOffCenter standard deviations from it, the
// first value of normally distributed data is once in 16,000 sets.
constexpr double kOffCenter = 4;

inline bool off_center(const Moments& m) {
  // An infinite var from finite values: d * d overflowed in the lanes.
  return std::isfinite(m.mean) &&
         !(std::isfinite(m.var) && m.dm * m.dm <= kOffCenter * kOffCenter * m.var);
}

// Moments of the n contiguous values at x from their sums s around k; summed again around
// their mean where k was off center, k then set to it.
template <class T, class A = acc_t<T>>
Moments recentered_moments(const T* x, int64_t n, Sums s, A& k) {
  const Moments m = moments(s, n, k);
  if (!off_center(m)) return m;
  k = static_cast<A>(m.mean);
  s = Sums{};
  add_sums<true>(x, n, k, s);
  return moments(s, n, k);
}

inline double rstd_of(double var, double eps) { return 1.0 / std::sqrt(var + eps); }

// Outputs are formed from x - k (above) for float32 and float64. A 2-byte input carries 8
// or 11 significant bits, its own rounding thousands of times coarser than that of x * a
// in float32, so its outputs skip the subtraction: x * a + (b - k * a), one FMA.
template <class T>
constexpr bool kShiftOut = sizeof(T) > 2;

// y = (x - k) * a + b over n contiguous values.
template <bool kStream, class T>
inline void affine(const T* x, T* y, int64_t n, acc_t<T> k, acc_t<T> a, acc_t<T> b) {
  using A = acc_t<T>;
  constexpr int L = kLanesOf<A>;
  if constexpr (!kShiftOut<T>) b -= k * a;
  const vec_t<A> kv = splat(k), av = splat(a), bv = splat(b);
  auto one = [&](int64_t i) {
    y[i] = narrow<T>(kShiftOut<T> ? (widen(x[i]) - k) * a + b : widen(x[i]) * a + b);
  };
  int64_t i = 0;
  for (const int64_t h = head<kStream>(y, 0, n); i < h; ++i) one(i);
  auto map = [&](vec_t<A> v) { return kShiftOut<T> ? (v - kv) * av + bv : v * av + bv; };
  for (; i + 2 * L <= n; i += 2 * L) {  // in pairs: for bfloat16, cheaper (convert.h)
    __builtin_prefetch(reinterpret_cast<const char*>(x + i) + kPrefetch, 0, 3);
    vec_t<A> u, v;
    load_pair(x + i, u, v);
    put_pair<kStream>(y + i, map(u), map(v));
  }
  for (; i + L <= n; i += L) put<kStream>(y + i, map(load(x + i)));
  for (; i < n; ++i) one(i);
}

// y = (x - k[j]) * a[j] + b[j] over one row of n values; for 2-byte T (kShiftOut) the
// caller has folded k into b: y = x * a[j] + b[j].
template <bool kStream, class T, class A = acc_t<T>>
inline void affine_row(const T* x, T* y, int64_t n, const A* k, const A* a, const A* b) {
  constexpr int L = kLanesOf<A>;
  auto one = [&](int64_t i) {
    const A u = widen(x[i]);
    y[i] = narrow<T>((kShiftOut<T> ? u - k[i] : u) * a[i] + b[i]);
  };
  int64_t i = 0;
  for (const int64_t h = head<kStream>(y, 0, n); i < h; ++i) one(i);
  for (; i + L <= n; i += L) {
    const vec_t<A> v = load(x + i);
    put<kStream>(y + i, (kShiftOut<T> ? v - load(k + i) : v) * load(a + i) + load(b + i));
  }
  for (; i < n; ++i) one(i);
}

// The n values of v in load_pair's lane order for bfloat16 (convert.h), block by block of
// 2 * kLanesOf<float>: the values at even offsets, then those at odd ones; a partial last
// block stays as it is. Per-value weights for a map on those lanes (scale_row's).
template <class A>
std::vector<A> bf16_pair_order(const A* v, int64_t n) {
  constexpr int L = kLanesOf<A>;
  std::vector<A> out(v, v + n);
  for (int64_t o = 0; o + 2 * L <= n; o += 2 * L)
    for (int j = 0; j < L; ++j) {
      out[o + j] = v[o + 2 * j];
      out[o + L + j] = v[o + 2 * j + 1];
    }
  return out;
}

// y = ((x - k) * s + o) * w[i] + b[i] over [i0, i1): LayerNorm's normalize-then-affine
// (RMSNorm with k = o = 0). For bfloat16, wp and bp are w and b in bf16_pair_order (or
// null where w, b are): its values then go in pairs of vectors, which widen and round
// for about half the instructions of single ones (convert.h), 10-15% off this loop.
template <bool kStream, bool kWeight, bool kBias, class T, class A = acc_t<T>>
void scale_row(const T* x, T* y, int64_t i0, int64_t i1, A k, A s, A o, const A* w,
               const A* b, const A* wp = nullptr, const A* bp = nullptr) {
  constexpr int L = kLanesOf<A>;
  if constexpr (!kShiftOut<T>) o -= k * s;
  auto one = [&](int64_t i) {
    A u = (kShiftOut<T> ? widen(x[i]) - k : widen(x[i])) * s + o;
    if (kWeight) u *= w[i];
    if (kBias) u += b[i];
    y[i] = narrow<T>(u);
  };
  const vec_t<A> kv = splat(k), sv = splat(s), ov = splat(o);
  int64_t i = i0;
  for (const int64_t h = head<kStream>(y, i0, i1); i < h; ++i) one(i);
  if constexpr (std::is_same_v<T, bf16> && !kStream) {
    if ((!kWeight || wp) && (!kBias || bp)) {
      for (; i % (2 * L) && i < i1; ++i) one(i);  // to a block of the pair order
      for (; i + 2 * L <= i1; i += 2 * L) {
        vec_t<A> u, v;
        load_pair(x + i, u, v);
        u = u * sv + ov;
        v = v * sv + ov;
        if (kWeight) {
          u *= load(wp + i);
          v *= load(wp + i + L);
        }
        if (kBias) {
          u += load(bp + i);
          v += load(bp + i + L);
        }
        store_pair(y + i, u, v);
      }
    }
  }
  for (; i + L <= i1; i += L) {
    const vec_t<A> v = load(x + i);
    vec_t<A> u = (kShiftOut<T> ? v - kv : v) * sv + ov;
    if (kWeight) u *= load(w + i);
    if (kBias) u += load(b + i);
    put<kStream>(y + i, u);
  }
  for (; i < i1; ++i) one(i);
}

// out[j] = v[c] for the `n` (>= C * HW) columns j of rows of C * HW values laid end to
// end, c the channel of column j % (C * HW): a per-channel value for each column of an
// [N, C*HW] matrix, or of one whose rows hold several of those rows (fold_rows).
template <class A>
inline void spread(const A* v, int64_t C, int64_t HW, A* out, int64_t n) {
  const int64_t width = C * HW;
  for (int64_t c = 0; c < C; ++c) std::fill(out + c * HW, out + (c + 1) * HW, v[c]);
  for (int64_t j = width; j < n; j += width) std::copy(out, out + std::min(width, n - j), out + j);
}

}  // namespace normcore
