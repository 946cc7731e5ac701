// Statistics and normalization of rows: LayerNorm and RMSNorm (the last dims), GroupNorm
// and InstanceNorm ((sample, group) planes). Each row is normalized right after its
// statistics, while it is still in cache; a few rows too long for one chunk are cut into
// pieces for both passes instead.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "reduce.h"

namespace normcore {

// Bytes of the next row prefetched (into L2) while a row is normalized: 10-20% on rows of
// a few KB, and more would crowd out the row in hand (GroupNorm's planes).
constexpr int64_t kNextRow = 4096;

// Half-precision rows of at most this many bytes are summed one ahead: the next row's sums
// go between a row's moments and its output, so that they, not the output, wait out the
// moments' divisions and square roots, a stall on every row otherwise. LayerNorm and
// RMSNorm rows of 1024 values 3-11% faster at 4-8 MB, measured on a Sapphire Rapids VM.
// float32 and float64 rows wait on memory more than on arithmetic and gained nothing
// (within 3%); longer rows lose while two of them crowd L1 (GroupNorm's planes, up to 6%).
constexpr int64_t kEarlyRow = 4096;

// R rows of L contiguous values of T, each normalized with its own statistics.
template <class T>
struct Rows {
  using A = acc_t<T>;
  const T* x;
  T* y;  // null: statistics only
  int64_t R, L;
  double eps;
  A* mean_out;  // [R] or null
  A* var_out;   // [R] or null (RMSNorm: the mean square)
};

// Statistics of every row, then apply(r, i0, i1, k, moments) for its values [i0, i1).
// kCenter: mean and variance around k = the row's first value (a row whose first value
// was off center summed again around its mean, k then that: see off_center); otherwise
// the mean square (as var) around 0.
template <bool kCenter, bool kStream, class T, class Apply>
void run_rows(const Rows<T>& p, const Apply& apply, int threads) {
  using A = acc_t<T>;
  auto shift = [&](int64_t r) { return kCenter ? shift_of(p.x[r * p.L]) : A{0}; };
  auto finish = [&](int64_t r, const Sums& s, A& k) {
    const Moments m = kCenter ? recentered_moments(p.x + r * p.L, p.L, s, k)
                              : Moments{0.0, 0.0, s.s2 / p.L};
    if (p.mean_out) p.mean_out[r] = static_cast<A>(m.mean);
    if (p.var_out) p.var_out[r] = static_cast<A>(m.var);
    return m;
  };
  const int64_t segs = std::max<int64_t>(1, p.L / kChunk);
  if (segs == 1 || p.R >= 2 * threads) {
    // Whole rows per chunk: the second pass reads each row back from cache.
    const int64_t rows = std::max<int64_t>(1, kChunk / p.L);
    const bool early = sizeof(T) == 2 && p.L * int64_t{sizeof(T)} <= kEarlyRow;
    parallel_chunks(ceil_div(p.R, rows), threads, [&](int64_t chunk) {
      const int64_t end = std::min(p.R, (chunk + 1) * rows);
      Sums s;
      bool summed = false;  // s holds row r's sums already
      for (int64_t r = chunk * rows; r < end; ++r) {
        A k = shift(r);
        if (!summed) {
          s = Sums{};
          add_sums<kCenter>(p.x + r * p.L, p.L, k, s);
        }
        const Moments m = finish(r, s, k);
        summed = early && r + 1 < end;
        if (summed) {
          s = Sums{};
          add_sums<kCenter>(p.x + (r + 1) * p.L, p.L, shift(r + 1), s);
        }
        const int64_t unread = r + 1 + summed;  // on its way while this row is written
        if (p.y && unread < end) {
          const char* ahead = reinterpret_cast<const char*>(p.x + unread * p.L);
          for (int64_t o = 0; o < std::min<int64_t>(kNextRow, p.L * sizeof(T)); o += 64)
            __builtin_prefetch(ahead + o, 0, 2);
        }
        if (p.y) apply(r, 0, p.L, k, m);
      }
      if (kStream) stream_fence();
    });
    return;
  }
  // A few long rows: statistics of all their pieces, then the output of all their pieces.
  const int64_t seg = ceil_div(p.L, segs), pieces = p.R * segs;
  std::vector<Sums> part(pieces);
  parallel_chunks(pieces, threads, [&](int64_t q) {
    const int64_t r = q / segs, lo = q % segs * seg;
    add_sums<kCenter>(p.x + r * p.L + lo, std::min(seg, p.L - lo), shift(r), part[q]);
  });
  std::vector<Moments> ms(p.R);
  std::vector<A> ks(p.R);
  for (int64_t r = 0; r < p.R; ++r) {
    Sums s;
    for (int64_t i = 0; i < segs; ++i) s += part[r * segs + i];
    ks[r] = shift(r);
    ms[r] = finish(r, s, ks[r]);
  }
  if (!p.y) return;
  parallel_chunks(pieces, threads, [&](int64_t q) {
    const int64_t r = q / segs, lo = q % segs * seg;
    apply(r, lo, std::min(lo + seg, p.L), ks[r], ms[r]);
    if (kStream) stream_fence();
  });
}

// The per-value weights v of p's rows in scale_row's pair order, when its output is
// bfloat16 and not streamed (empty otherwise: scale_row then goes vector by vector).
// Permuting them is serial work over a whole row on every call, so it is done only for
// enough rows to pay it back: on 2 rows of 4M values it took five times the kernel.
constexpr int64_t kPairRowsPerThread = 64;

template <class T, class A, class Stream>
std::vector<A> pair_weights(const Rows<T>& p, const A* v, int threads, Stream) {
  if constexpr (std::is_same_v<T, bf16> && !Stream::value)
    if (v && p.y && p.R >= kPairRowsPerThread * threads) return bf16_pair_order(v, p.L);
  return {};
}

template <class A>
const A* data_or_null(const std::vector<A>& v) {
  return v.empty() ? nullptr : v.data();
}

template <class T, class A = acc_t<T>>
void layer_rows(const Rows<T>& p, const A* w, const A* b, int threads) {
  with_stream<T>(p.y ? p.R * p.L : 0, [&](auto stream) {
    const std::vector<A> wv = pair_weights(p, w, threads, stream),
                         bv = pair_weights(p, b, threads, stream);
    const A *wp = data_or_null(wv), *bp = data_or_null(bv);
    run_rows<true, stream>(p, [&](int64_t r, int64_t i0, int64_t i1, A k, const Moments& m) {
      const double rstd = rstd_of(m.var, p.eps);
      const A s = static_cast<A>(rstd), o = static_cast<A>(-m.dm * rstd);
      const T* x = p.x + r * p.L;
      T* y = p.y + r * p.L;
      if (w && b)
        scale_row<stream, true, true>(x, y, i0, i1, k, s, o, w, b, wp, bp);
      else if (w)
        scale_row<stream, true, false>(x, y, i0, i1, k, s, o, w, b, wp, bp);
      else if (b)
        scale_row<stream, false, true>(x, y, i0, i1, k, s, o, w, b, wp, bp);
      else
        scale_row<stream, false, false>(x, y, i0, i1, k, s, o, w, b);
    }, threads);
  });
}

template <class T, class A = acc_t<T>>
void rms_rows(const Rows<T>& p, const A* w, int threads) {
  with_stream<T>(p.y ? p.R * p.L : 0, [&](auto stream) {
    const std::vector<A> wv = pair_weights(p, w, threads, stream);
    const A* wp = data_or_null(wv);
    run_rows<false, stream>(p, [&](int64_t r, int64_t i0, int64_t i1, A, const Moments& m) {
      const A s = static_cast<A>(rstd_of(m.var, p.eps)), zero = 0;
      const A* none = nullptr;
      const T* x = p.x + r * p.L;
      T* y = p.y + r * p.L;
      if (w)
        scale_row<stream, true, false>(x, y, i0, i1, zero, s, zero, w, none, wp);
      else
        scale_row<stream, false, false>(x, y, i0, i1, zero, s, zero, w, none);
    }, threads);
  });
}

// A row is one (sample, group) plane of Cg channels of HW values, weight and bias per
// channel: GroupNorm, and InstanceNorm as Cg = 1.
template <class T, class A = acc_t<T>>
void group_rows(const Rows<T>& p, const A* w, const A* b, int64_t G, int64_t Cg, int64_t HW,
                int threads) {
  with_stream<T>(p.y ? p.R * p.L : 0, [&](auto stream) {
    run_rows<true, stream>(p, [&](int64_t r, int64_t i0, int64_t i1, A k, const Moments& m) {
      // dm and a are a few units at most: float loses nothing here.
      const A rstd = static_cast<A>(rstd_of(m.var, p.eps));
      const A dm = static_cast<A>(m.dm);
      const int64_t c0 = r % G * Cg;
      while (i0 < i1) {
        const int64_t j = i0 / HW, len = std::min(HW - i0 % HW, i1 - i0);
        const A a = w ? rstd * w[c0 + j] : rstd;
        const A o = (b ? b[c0 + j] : A{0}) - dm * a;
        affine<stream>(p.x + r * p.L + i0, p.y + r * p.L + i0, len, k, a, o);
        i0 += len;
      }
    }, threads);
  });
}

// InstanceNorm's train step: y normalized per (sample, channel), statistics [N*C] into
// p.mean_out/p.var_out (if given). Unless reject is set and a statistic is not finite
// (then false), the running statistics (if given) move towards the batch average of the
// per-instance mean and unbiased variance.
template <class T, class A = acc_t<T>>
bool instance_train(Rows<T> p, int64_t N, int64_t C, int64_t HW, const A* w, const A* b,
                    A* rm, A* rv, double momentum, bool reject, int threads) {
  p.R = N * C;
  p.L = HW;
  std::vector<A> mean_own, var_own;
  if (rm && !p.mean_out) {
    mean_own.resize(p.R);
    p.mean_out = mean_own.data();
  }
  if (rm && !p.var_out) {
    var_own.resize(p.R);
    p.var_out = var_own.data();
  }
  group_rows(p, w, b, C, 1, HW, threads);
  if (!rm) return true;
  bool finite = true;
  for (int64_t r = 0; r < p.R; ++r)
    finite = finite && std::isfinite(p.mean_out[r]) && std::isfinite(p.var_out[r]);
  if (!finite && reject) return false;
  const double unbias = HW / static_cast<double>(HW - 1);
  for (int64_t c = 0; c < C; ++c) {
    double m = 0, v = 0;
    for (int64_t n = 0; n < N; ++n) {
      m += p.mean_out[n * C + c];
      v += p.var_out[n * C + c];
    }
    rm[c] = static_cast<A>((1 - momentum) * rm[c] + momentum * m / N);
    rv[c] = static_cast<A>((1 - momentum) * rv[c] + momentum * v / N * unbias);
  }
  return true;
}

}  // namespace normcore
