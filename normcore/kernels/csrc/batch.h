// BatchNorm over [N, C, HW] of any storage type, on the per-channel passes of channels.h:
// a train step (statistics, running statistics, then one scale and shift per channel),
// eval with the running statistics folded into that scale and shift, and eval that also
// returns the batch statistics from the read that normalizes, or (InstanceNorm's eval,
// the same map) the statistics of each (sample, channel) plane.
//
// Parameters, running statistics and returned statistics are acc_t<T>: float32 under
// float32, float16 and bfloat16 inputs, float64 under float64.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "channels.h"
#include "parallel.h"
#include "reduce.h"

namespace normcore {

// Per-channel statistics of [N, C, HW], each channel shifted by its first value (by its
// mean where that was off center).
template <class T>
std::vector<Moments> channel_moments(const T* x, int64_t N, int64_t C, int64_t HW,
                                     int threads) {
  std::vector<acc_t<T>> k(C);
  for (int64_t c = 0; c < C; ++c) k[c] = shift_of(x[c * HW]);
  const std::vector<Sums> sums = recentered_sums(x, N, C, HW, k.data(), threads);
  std::vector<Moments> ms(C);
  for (int64_t c = 0; c < C; ++c) ms[c] = moments(sums[c], N * HW, k[c]);
  return ms;
}

// Batch statistics per channel into mean/var (if given). Rejected (false) if reject is set
// and they are not all finite; otherwise y (if given) is normalized with them, the running
// statistics (if given) move by momentum towards the mean and unbiased variance, and
// num_batches_tracked (if given) counts one more batch.
template <class T, class A = acc_t<T>>
bool batch_train(const T* x, T* y, int64_t N, int64_t C, int64_t HW, const A* w, const A* b,
                 double eps, A* mean, A* var, A* rm, A* rv, int64_t* tracked,
                 double momentum, bool reject, int threads) {
  const int64_t n = N * HW;
  std::vector<A> k(C), a(C), off(C);
  for (int64_t c = 0; c < C; ++c) k[c] = shift_of(x[c * HW]);
  auto scale_shift = [&](int64_t c, const Moments& m) {
    const double scale = rstd_of(m.var, eps) * (w ? w[c] : A{1});
    a[c] = static_cast<A>(scale);
    off[c] = static_cast<A>((b ? b[c] : A{0}) - m.dm * scale);
    return std::pair<A, A>(a[c], off[c]);
  };
  // Channels that fit in cache are normalized as soon as their statistics are known, so y
  // is written even when the step is then rejected (y is the caller's scratch then).
  const bool fused = y && channels_fit_cache(N, C, HW, sizeof(T), threads);
  const std::vector<Sums> sums =
      fused ? channel_sums_affine(x, y, N, C, HW, k.data(),
                                  [&](int64_t c, const Sums& s) {
                                    return scale_shift(c, moments(s, n, k[c]));
                                  },
                                  threads)
            : recentered_sums(x, N, C, HW, k.data(), threads);
  bool finite = true;
  std::vector<Moments> ms(C);
  for (int64_t c = 0; c < C; ++c) {
    ms[c] = moments(sums[c], n, k[c]);
    finite = finite && ms[c].finite();
    if (mean) mean[c] = static_cast<A>(ms[c].mean);
    if (var) var[c] = static_cast<A>(ms[c].var);
  }
  if (!finite && reject) return false;
  for (int64_t c = 0; c < C; ++c) {
    if (!fused) scale_shift(c, ms[c]);
    if (rm) {
      rm[c] = static_cast<A>((1 - momentum) * rm[c] + momentum * ms[c].mean);
      rv[c] = static_cast<A>((1 - momentum) * rv[c] +
                             momentum * ms[c].var * n / static_cast<double>(n - 1));
    }
  }
  if (tracked) ++*tracked;
  if (y && !fused) channel_affine(x, y, N, C, HW, k.data(), a.data(), off.data(), threads);
  return true;
}

// y = x * scale[c] + shift[c], the running statistics and affine folded in as torch folds
// them (in acc_t<T>, torch's opmath type).
template <class A>
void eval_scale(int64_t C, const A* w, const A* b, const A* rm, const A* rv, double eps,
                A* scale, A* shift) {
  for (int64_t c = 0; c < C; ++c) {
    const A invstd = A{1} / std::sqrt(rv[c] + static_cast<A>(eps));
    scale[c] = w ? invstd * w[c] : invstd;
    shift[c] = (b ? b[c] : A{0}) - rm[c] * scale[c];
  }
}

template <class T, class A = acc_t<T>>
void batch_eval(const T* x, T* y, int64_t N, int64_t C, int64_t HW, const A* w, const A* b,
                const A* rm, const A* rv, double eps, int threads) {
  std::vector<A> zero(C, A{0}), scale(C), shift(C);
  eval_scale(C, w, b, rm, rv, eps, scale.data(), shift.data());
  channel_affine(x, y, N, C, HW, zero.data(), scale.data(), shift.data(), threads);
}

// batch_eval's y, and the batch statistics per channel into mean/var as batch_train
// computes them (the same sums), in one read of x. Outputs big enough to be streamed take
// two passes instead.
template <class T, class A = acc_t<T>>
void batch_eval_stats(const T* x, T* y, int64_t N, int64_t C, int64_t HW, const A* w,
                      const A* b, const A* rm, const A* rv, double eps, A* mean, A* var,
                      int threads) {
  std::vector<A> k(C), scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) k[c] = shift_of(x[c * HW]);
  eval_scale(C, w, b, rm, rv, eps, scale.data(), shift.data());
  std::vector<Sums> sums;
  if (streaming(N * C * HW * static_cast<int64_t>(sizeof(T)))) {
    sums = recentered_sums(x, N, C, HW, k.data(), threads);
    const std::vector<A> zero(C, A{0});
    channel_affine(x, y, N, C, HW, zero.data(), scale.data(), shift.data(), threads);
  } else {
    sums = channel_affine_sums(x, y, N, C, HW, k.data(), scale.data(), shift.data(), threads);
    resum(x, N, C, HW, k.data(), recenter(sums, N * HW, k.data()), sums, threads);
  }
  for (int64_t c = 0; c < C; ++c) {
    const Moments ms = moments(sums[c], N * HW, k[c]);
    mean[c] = static_cast<A>(ms.mean);
    var[c] = static_cast<A>(ms.var);
  }
}

// batch_eval's y, and the mean and biased variance of each (sample, channel) plane into
// mean/var [N*C], each plane shifted by its first value, in one read of x. Outputs big
// enough to be streamed take two passes instead.
template <class T, class A = acc_t<T>>
void instance_eval_stats(const T* x, T* y, int64_t N, int64_t C, int64_t HW, const A* w,
                         const A* b, const A* rm, const A* rv, double eps, A* mean, A* var,
                         int threads) {
  std::vector<A> scale(C), shift(C);
  eval_scale(C, w, b, rm, rv, eps, scale.data(), shift.data());
  const bool stream = streaming(N * C * HW * static_cast<int64_t>(sizeof(T)));
  const PlanePieces pieces(N * C, HW);
  std::vector<Sums> part(pieces.count);
  pieces.each(threads, [&](int64_t q, int64_t plane, int64_t at, int64_t len) {
    const int64_t c = plane % C;
    const A k = shift_of(x[plane * HW]);
    if (stream)
      add_sums<true>(x + at, len, k, part[q]);
    else
      affine_add_sums(x + at, y + at, len, k, scale[c], shift[c], part[q]);
  });
  if (stream) {
    const std::vector<A> zero(C, A{0});
    channel_affine(x, y, N, C, HW, zero.data(), scale.data(), shift.data(), threads);
  }
  for (int64_t plane = 0; plane < N * C; ++plane) {
    Sums s;
    for (int64_t i = 0; i < pieces.segs; ++i) s += part[plane * pieces.segs + i];
    A k = shift_of(x[plane * HW]);
    const Moments m = recentered_moments(x + plane * HW, HW, s, k);
    mean[plane] = static_cast<A>(m.mean);
    var[plane] = static_cast<A>(m.var);
  }
}

}  // namespace normcore
