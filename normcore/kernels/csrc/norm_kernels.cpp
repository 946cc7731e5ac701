// Fused normalization kernels for contiguous CPU tensors, as a Python module.
//
// The normalization entry points take torch tensors and check and allocate in C++
// (tensors.h, tensors.cpp). The drift entry points here take what normcore/kernels/drift.py
// passes after its own checks: a dtype code (Dtype in calls.h), raw data pointers (Python
// ints, 0 for none) and sizes. Each kernel is one template over the storage type
// (convert.h): inputs and outputs of float32, float16, bfloat16 or float64, with
// parameters, running statistics and returned statistics in acc_t<T> (float32, or float64
// for float64 inputs).
//
// Memory traffic: BatchNorm train reads x twice (statistics, then normalization) and
// writes y once; BatchNorm eval folds the running statistics into one scale and shift per
// channel (1 read, 1 write), and computes the batch statistics in that same read when they
// are wanted (InstanceNorm's eval: those of each plane); LayerNorm, RMSNorm, GroupNorm and
// InstanceNorm normalize each row or (sample, group) plane right after its statistics,
// while it is still in cache.
//
// Work is cut into chunks of about kChunk values (parallel.h runs them); inputs smaller
// than two chunks run on the calling thread. Partial statistics are kept per chunk and added in
// a fixed order, so results do not depend on the number of threads. The GIL is released
// while a kernel runs, except for inputs too small to be worth it.

#include <Python.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "calls.h"
#include "drift.h"
#include "parallel.h"
#include "reduce.h"
#include "table.h"
#include "tensors.h"

namespace normcore {
namespace {

// gaussian_drift(dtype, mean, var, rows, C, unbias, ref_dtype, ref_mean, ref_var, eps,
//                weight, top) -> (score, ((channel, J_c), ...))
// drift.h: the drift score of a batch's statistics ([rows, C], var biased, times unbias)
// against a reference (unbiased var), its `top` channels that moved most, and the
// reference moved by weight towards the batch when the score is finite.
PyObject* gaussian_drift_(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  void *mean, *var, *rm, *rv;
  int64_t dtype, rows, C, ref_dtype, top;
  double unbias, eps, weight;
  if (!parse(args, nargs, "gaussian_drift", "sppnndsppddn", &dtype, &mean, &var, &rows, &C,
             &unbias, &ref_dtype, &rm, &rv, &eps, &weight, &top))
    return nullptr;
  DriftResult result;
  typed2(dtype, ref_dtype, [&](auto s, auto r) {
    using S = decltype(s);
    using R = decltype(r);
    result = gaussian_drift(in<S>(mean), in<S>(var), rows, C, unbias, out<R>(rm), out<R>(rv),
                            eps, weight, top);
  });
  return drift_tuple(result);
}

// feature_drift(dtype, x, N, C, HW, ref_dtype, ref_mean, ref_var, eps, weight, top, threads)
//     -> (score, ((channel, J_c), ...))
// gaussian_drift of the per-channel statistics of [N, C, HW] of any storage type (as
// batch_norm_train computes them, never stored): LayerNorm's and RMSNorm's input features
// as [rows, features, 1].
PyObject* feature_drift(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  void *x, *rm, *rv;
  int64_t dtype, N, C, HW, ref_dtype, top, threads;
  double eps, weight;
  if (!parse(args, nargs, "feature_drift", "tpnnnsppddnn", &dtype, &x, &N, &C, &HW,
             &ref_dtype, &rm, &rv, &eps, &weight, &top, &threads))
    return nullptr;
  const int64_t n = N * HW;
  std::vector<double> mean(C), var(C);
  {
    Unlocked unlocked(N * C * HW);
    table_of_code(dtype).moments(x, N, C, HW, mean.data(), var.data(), static_cast<int>(threads));
  }
  DriftResult result;
  typed2(kF64, ref_dtype, [&](auto, auto r) {
    using R = decltype(r);
    result = gaussian_drift(mean.data(), var.data(), 1, C, n / static_cast<double>(n - 1),
                            out<R>(rm), out<R>(rv), eps, weight, top);
  });
  return drift_tuple(result);
}

// stalls() -> (regions that stalled so far, current back-off span): for diagnostics.
PyObject* stalls(PyObject*, PyObject* const*, Py_ssize_t) {
  return Py_BuildValue("(LL)", static_cast<long long>(Backoff::get().stalls()),
                       static_cast<long long>(Backoff::get().span()));
}

// stream_threshold(bytes=-1) -> bytes: outputs from this size on are streamed; a
// non-negative argument sets it (for benchmarks that compare both kinds of store).
PyObject* stream_threshold_(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t bytes;
  if (!parse(args, nargs, "stream_threshold", "n", &bytes)) return nullptr;
  if (bytes >= 0) stream_threshold() = bytes;
  return PyLong_FromLongLong(stream_threshold());
}

template <PyObject* (*F)(PyObject*, PyObject* const*, Py_ssize_t)>
constexpr PyMethodDef method(const char* name) {
  return {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(F)), METH_FASTCALL,
          nullptr};
}

PyMethodDef methods[] = {
    method<batch_norm_train_tensors>("batch_norm_train"),
    method<batch_norm_eval_tensors>("batch_norm_eval"),
    method<batch_norm_eval_stats_tensors>("batch_norm_eval_stats"),
    method<instance_norm_eval_stats_tensors>("instance_norm_eval_stats"),
    method<layer_norm_tensors>("layer_norm"),
    method<rms_norm_tensors>("rms_norm"),
    method<group_norm_tensors>("group_norm"),
    method<instance_norm_train_tensors>("instance_norm_train"),
    method<gaussian_drift_>("gaussian_drift"),
    method<feature_drift>("feature_drift"),
    method<stalls>("stalls"),
    method<stream_threshold_>("stream_threshold"),
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "normcore_kernels",
    "Fused normalization kernels for contiguous CPU tensors.", -1, methods,
    nullptr, nullptr, nullptr, nullptr,
};

}  // namespace
}  // namespace normcore

PyMODINIT_FUNC PyInit_normcore_kernels(void) { return PyModule_Create(&normcore::module); }
