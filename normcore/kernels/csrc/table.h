// One storage type's kernels behind plain function pointers, arrays passed as void*: each
// storage type compiles in a translation unit of its own (types_*.cpp), all of them at
// once, and norm_kernels.cpp calls the table of a call's dtype. Arrays of the input and
// output are of the storage type T; parameters, running statistics and statistics of
// acc_t<T> (convert.h).

#pragma once

#include <cstdint>
#include <vector>

#include "batch.h"
#include "convert.h"
#include "reduce.h"
#include "rows.h"

namespace normcore {

struct Table {
  // batch.h's batch_train, batch_eval, batch_eval_stats and instance_eval_stats.
  bool (*batch_train)(const void* x, void* y, int64_t N, int64_t C, int64_t HW, const void* w,
                      const void* b, double eps, void* mean, void* var, void* rm, void* rv,
                      int64_t* tracked, double momentum, bool reject, int threads);
  void (*batch_eval)(const void* x, void* y, int64_t N, int64_t C, int64_t HW, const void* w,
                     const void* b, const void* rm, const void* rv, double eps, int threads);
  void (*batch_eval_stats)(const void* x, void* y, int64_t N, int64_t C, int64_t HW,
                           const void* w, const void* b, const void* rm, const void* rv,
                           double eps, void* mean, void* var, int threads);
  void (*instance_eval_stats)(const void* x, void* y, int64_t N, int64_t C, int64_t HW,
                              const void* w, const void* b, const void* rm, const void* rv,
                              double eps, void* mean, void* var, int threads);
  // rows.h's layer_rows (R rows of L values), rms_rows, group_rows and instance_train.
  void (*layer_norm)(const void* x, void* y, int64_t R, int64_t L, const void* w,
                     const void* b, double eps, void* mean, void* var, int threads);
  void (*rms_norm)(const void* x, void* y, int64_t R, int64_t L, const void* w, double eps,
                   void* mean_square, int threads);
  void (*group_norm)(const void* x, void* y, int64_t N, int64_t C, int64_t HW, int64_t G,
                     const void* w, const void* b, double eps, void* mean, void* var,
                     int threads);
  bool (*instance_train)(const void* x, void* y, int64_t N, int64_t C, int64_t HW,
                         const void* w, const void* b, double eps, void* mean, void* var,
                         void* rm, void* rv, double momentum, bool reject, int threads);
  // Per-channel mean and biased variance of [N, C, HW], in double (batch.h's
  // channel_moments): the features that feature_drift scores.
  void (*moments)(const void* x, int64_t N, int64_t C, int64_t HW, double* mean, double* var,
                  int threads);
};

extern const Table kF32Table, kF16Table, kBF16Table, kF64Table;

// The kernels of a dtype code (calls.h's Dtype: 0 float32, 1 float16, 2 bfloat16, 3
// float64), checked by the caller.
inline const Table& table_of_code(int64_t dtype) {
  switch (dtype) {
    case 1:
      return kF16Table;
    case 2:
      return kBF16Table;
    case 3:
      return kF64Table;
    default:
      return kF32Table;
  }
}

template <class T>
Table table_of() {
  using A = acc_t<T>;
  Table t;
  t.batch_train = [](const void* x, void* y, int64_t N, int64_t C, int64_t HW, const void* w,
                     const void* b, double eps, void* mean, void* var, void* rm, void* rv,
                     int64_t* tracked, double momentum, bool reject, int threads) {
    return batch_train(static_cast<const T*>(x), static_cast<T*>(y), N, C, HW,
                       static_cast<const A*>(w), static_cast<const A*>(b), eps,
                       static_cast<A*>(mean), static_cast<A*>(var), static_cast<A*>(rm),
                       static_cast<A*>(rv), tracked, momentum, reject, threads);
  };
  t.batch_eval = [](const void* x, void* y, int64_t N, int64_t C, int64_t HW, const void* w,
                    const void* b, const void* rm, const void* rv, double eps, int threads) {
    batch_eval(static_cast<const T*>(x), static_cast<T*>(y), N, C, HW,
               static_cast<const A*>(w), static_cast<const A*>(b), static_cast<const A*>(rm),
               static_cast<const A*>(rv), eps, threads);
  };
  t.batch_eval_stats = [](const void* x, void* y, int64_t N, int64_t C, int64_t HW,
                          const void* w, const void* b, const void* rm, const void* rv,
                          double eps, void* mean, void* var, int threads) {
    batch_eval_stats(static_cast<const T*>(x), static_cast<T*>(y), N, C, HW,
                     static_cast<const A*>(w), static_cast<const A*>(b),
                     static_cast<const A*>(rm), static_cast<const A*>(rv), eps,
                     static_cast<A*>(mean), static_cast<A*>(var), threads);
  };
  t.instance_eval_stats = [](const void* x, void* y, int64_t N, int64_t C, int64_t HW,
                             const void* w, const void* b, const void* rm, const void* rv,
                             double eps, void* mean, void* var, int threads) {
    instance_eval_stats(static_cast<const T*>(x), static_cast<T*>(y), N, C, HW,
                        static_cast<const A*>(w), static_cast<const A*>(b),
                        static_cast<const A*>(rm), static_cast<const A*>(rv), eps,
                        static_cast<A*>(mean), static_cast<A*>(var), threads);
  };
  t.layer_norm = [](const void* x, void* y, int64_t R, int64_t L, const void* w,
                    const void* b, double eps, void* mean, void* var, int threads) {
    const Rows<T> p{static_cast<const T*>(x), static_cast<T*>(y), R, L, eps,
                    static_cast<A*>(mean), static_cast<A*>(var)};
    layer_rows(p, static_cast<const A*>(w), static_cast<const A*>(b), threads);
  };
  t.rms_norm = [](const void* x, void* y, int64_t R, int64_t L, const void* w, double eps,
                  void* mean_square, int threads) {
    const Rows<T> p{static_cast<const T*>(x), static_cast<T*>(y), R, L, eps, nullptr,
                    static_cast<A*>(mean_square)};
    rms_rows(p, static_cast<const A*>(w), threads);
  };
  t.group_norm = [](const void* x, void* y, int64_t N, int64_t C, int64_t HW, int64_t G,
                    const void* w, const void* b, double eps, void* mean, void* var,
                    int threads) {
    const Rows<T> p{static_cast<const T*>(x), static_cast<T*>(y), N * G, C / G * HW, eps,
                    static_cast<A*>(mean), static_cast<A*>(var)};
    group_rows(p, static_cast<const A*>(w), static_cast<const A*>(b), G, C / G, HW, threads);
  };
  t.instance_train = [](const void* x, void* y, int64_t N, int64_t C, int64_t HW,
                        const void* w, const void* b, double eps, void* mean, void* var,
                        void* rm, void* rv, double momentum, bool reject, int threads) {
    const Rows<T> p{static_cast<const T*>(x), static_cast<T*>(y), N * C, HW, eps,
                    static_cast<A*>(mean), static_cast<A*>(var)};
    return instance_train(p, N, C, HW, static_cast<const A*>(w), static_cast<const A*>(b),
                          static_cast<A*>(rm), static_cast<A*>(rv), momentum, reject, threads);
  };
  t.moments = [](const void* x, int64_t N, int64_t C, int64_t HW, double* mean, double* var,
                 int threads) {
    const std::vector<Moments> ms = channel_moments(static_cast<const T*>(x), N, C, HW, threads);
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = ms[c].mean;
      var[c] = ms[c].var;
    }
  };
  return t;
}

}  // namespace normcore
