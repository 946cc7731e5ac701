// Vector building blocks: shifted sums for statistics, and the affine maps that normalize.
//
// Statistics are shifted sums: with k the first value of the reduced set and d = x - k,
// sum(d) and sum(d*d) are accumulated in float32 vector lanes over blocks of kBlock values
// and in double across blocks. |mean - k| is a few standard deviations, so
//     var = sum(d*d)/n - (sum(d)/n)^2
// keeps its digits where E[x^2] - E[x]^2 cancels (|mean|/std of 1e4 in float32). Outputs
// are formed from d too, y = d*a + (b - dm*a) with dm = mean - k: x - k is exact for x
// near k, so outputs stay accurate far from zero.
//
// Outputs larger than the caches are written with non-temporal (streaming) stores: they
// skip reading each destination line before overwriting it (a third of the memory traffic
// of a one-read-one-write kernel) and do not evict the input. Smaller outputs get ordinary
// stores: they are still in cache when the next operation reads them, and measured on a
// Sapphire Rapids VM, streaming loses up to 15% as long as input and output fit in L3.
// The threshold is glibc's for memcpy: 3/4 of the L3 cache (at least 4 times the L2).
//
// GCC's vector extensions compile to whatever the build machine has (AVX-512, AVX2, SSE).

#pragma once

#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace normcore {

constexpr int kLanes = 16;
constexpr int64_t kBlock = 2048;  // values summed in float32 lanes before a double add

typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// Stores of a vector to p; kStream: non-temporal, and p must be aligned to the vector.
template <bool kStream>
inline void put(float* p, vec v) {
  if (!kStream) return store(p, v);
#if defined(__AVX512F__)
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  for (int i = 0; i < kLanes; i += 8) {
    __m256 h;
    std::memcpy(&h, reinterpret_cast<const float*>(&v) + i, sizeof h);
    _mm256_stream_ps(p + i, h);
  }
#elif defined(__SSE__)
  for (int i = 0; i < kLanes; i += 4) {
    __m128 q;
    std::memcpy(&q, reinterpret_cast<const float*>(&v) + i, sizeof q);
    _mm_stream_ps(p + i, q);
  }
#else
  store(p, v);
#endif
}

// Values before the first vector-aligned address of y + i0 (streamed stores need it).
template <bool kStream>
inline int64_t head(const float* y, int64_t i0, int64_t i1) {
  if (!kStream) return i0;
  const auto misaligned = reinterpret_cast<uintptr_t>(y + i0) % sizeof(vec);
  const int64_t skip = misaligned ? (sizeof(vec) - misaligned) / sizeof(float) : 0;
  return std::min(i1, i0 + skip);
}

// Makes a thread's streamed stores visible before it reports its chunk done.
inline void stream_fence() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_sfence();
#endif
}

// Outputs of at least this many bytes are streamed.
inline int64_t& stream_threshold() {
  static int64_t threshold = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE), l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return std::max<int64_t>(int64_t{4} * (l2 > 0 ? l2 : 1 << 20), l3 > 0 ? l3 / 4 * 3 : 0);
  }();
  return threshold;
}

inline bool streaming(int64_t bytes) { return bytes >= stream_threshold(); }

// f(std::true_type) if an output of this many values is streamed, else f(std::false_type).
template <class F>
void with_stream(int64_t values, const F& f) {
  if (streaming(values * static_cast<int64_t>(sizeof(float))))
    f(std::true_type{});
  else
    f(std::false_type{});
}

inline vec splat(float v) { return vec{} + v; }

// Sum of the lanes, pairwise: four float32 roundings, far below a block's own.
inline float hsum(vec v) {
  typedef float half __attribute__((vector_size(kLanes * sizeof(float) / 2)));
  const half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const float s[4] = {h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]};
  return (s[0] + s[2]) + (s[1] + s[3]);
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
template <bool kMean>
void add_sums(const float* x, int64_t n, float k, Sums& s) {
  const vec kv = splat(k);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    vec a1 = {}, a2 = {}, c1 = {}, c2 = {};
    int64_t i = b;
    for (; i + 2 * kLanes <= e; i += 2 * kLanes) {
      const vec d = load(x + i) - kv, f = load(x + i + kLanes) - kv;
      if (kMean) {
        a1 += d;
        c1 += f;
      }
      a2 += d * d;
      c2 += f * f;
    }
    float t1 = 0, t2 = 0;
    for (; i < e; ++i) {
      const float d = x[i] - k;
      t1 += d;
      t2 += d * d;
    }
    if (kMean) s.s1 += static_cast<double>(hsum(a1 + c1)) + t1;
    s.s2 += static_cast<double>(hsum(a2 + c2)) + t2;
  }
}

// Finished statistics of n values shifted by k.
struct Moments {
  double dm;    // mean - k
  double mean;  // k + dm
  double var;   // biased
  bool finite() const { return std::isfinite(mean) && std::isfinite(var); }
};

inline Moments moments(const Sums& s, int64_t n, float k) {
  const double dm = s.s1 / n, var = s.s2 / n - dm * dm;
  // A tiny negative from rounding becomes 0; NaN (Inf - Inf from an infinite input) stays.
  return {dm, k + dm, var < 0.0 ? 0.0 : var};
}

inline double rstd_of(double var, double eps) { return 1.0 / std::sqrt(var + eps); }

// y = (x - k) * a + b over n contiguous values.
template <bool kStream>
inline void affine(const float* x, float* y, int64_t n, float k, float a, float b) {
  const vec kv = splat(k), av = splat(a), bv = splat(b);
  int64_t i = 0;
  for (const int64_t h = head<kStream>(y, 0, n); i < h; ++i) y[i] = (x[i] - k) * a + b;
  for (; i + kLanes <= n; i += kLanes) put<kStream>(y + i, (load(x + i) - kv) * av + bv);
  for (; i < n; ++i) y[i] = (x[i] - k) * a + b;
}

// y = (x - k[j]) * a[j] + b[j] over one row of n values.
template <bool kStream>
inline void affine_row(const float* x, float* y, int64_t n, const float* k, const float* a,
                       const float* b) {
  int64_t i = 0;
  for (const int64_t h = head<kStream>(y, 0, n); i < h; ++i) y[i] = (x[i] - k[i]) * a[i] + b[i];
  for (; i + kLanes <= n; i += kLanes)
    put<kStream>(y + i, (load(x + i) - load(k + i)) * load(a + i) + load(b + i));
  for (; i < n; ++i) y[i] = (x[i] - k[i]) * a[i] + b[i];
}

// y = ((x - k) * s + o) * w[i] + b[i] over [i0, i1): LayerNorm's normalize-then-affine
// (RMSNorm with k = o = 0).
template <bool kStream, bool kWeight, bool kBias>
void scale_row(const float* x, float* y, int64_t i0, int64_t i1, float k, float s, float o,
               const float* w, const float* b) {
  auto one = [&](int64_t i) {
    float u = (x[i] - k) * s + o;
    if (kWeight) u *= w[i];
    if (kBias) u += b[i];
    y[i] = u;
  };
  const vec kv = splat(k), sv = splat(s), ov = splat(o);
  int64_t i = i0;
  for (const int64_t h = head<kStream>(y, i0, i1); i < h; ++i) one(i);
  for (; i + kLanes <= i1; i += kLanes) {
    vec u = (load(x + i) - kv) * sv + ov;
    if (kWeight) u *= load(w + i);
    if (kBias) u += load(b + i);
    put<kStream>(y + i, u);
  }
  for (; i < i1; ++i) one(i);
}

// out[c * HW + i] = v[c]: a per-channel value for each column of an [N, C*HW] matrix.
inline void spread(const float* v, int64_t C, int64_t HW, float* out) {
  for (int64_t c = 0; c < C; ++c) std::fill(out + c * HW, out + (c + 1) * HW, v[c]);
}

}  // namespace normcore
