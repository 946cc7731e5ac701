// Fused normalization kernels for contiguous CPU tensors, as a Python module.
//
// normcore/kernels/cpu.py calls these with a dtype code (Dtype in calls.h), raw data
// pointers (Python ints, 0 for none) and sizes. It has already checked dtype, device, layout and
// sizes and allocated every output; whatever it cannot hand over goes through torch
// instead. BatchNorm's three entry points take the tensors themselves and do those checks
// and allocations in C++ (tensors.cpp). Each entry point is one template over the storage type (convert.h): inputs and
// outputs of float32, float16, bfloat16 or float64, with parameters, running statistics and
// returned statistics in acc_t<T> (float32, or float64 for float64 inputs).
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

// An eval with statistics per (sample, channel) plane; `kernel` is the table's function.
PyObject* eval_stats(decltype(Table::instance_eval_stats) Table::*kernel, const char* name,
                     PyObject* const* args, Py_ssize_t nargs) {
  void *x, *y, *w, *b, *rm, *rv, *mean, *var;
  int64_t dtype, N, C, HW, threads;
  double eps;
  if (!parse(args, nargs, name, "tppnnnppppdppn", &dtype, &x, &y, &N, &C, &HW, &w, &b, &rm,
             &rv, &eps, &mean, &var, &threads))
    return nullptr;
  {
    Unlocked unlocked(N * C * HW);
    (table_of_code(dtype).*kernel)(x, y, N, C, HW, w, b, rm, rv, eps, mean, var,
                           static_cast<int>(threads));
  }
  Py_RETURN_NONE;
}

// instance_norm_eval_stats(dtype, x, y, N, C, HW, weight, bias, running_mean, running_var,
//                          eps, mean, var, threads)
// batch_norm_eval's y, and the statistics of each (sample, channel) plane into mean/var
// [N*C], in the same read of x: what normalize() of an InstanceNorm in eval mode returns.
PyObject* instance_norm_eval_stats(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return eval_stats(&Table::instance_eval_stats, "instance_norm_eval_stats", args, nargs);
}

// layer_norm(dtype, x, y, R, D, weight, bias, eps, mean, var, threads): rows of D values.
PyObject* layer_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  void *x, *y, *w, *b, *mean, *var;
  int64_t dtype, R, D, threads;
  double eps;
  if (!parse(args, nargs, "layer_norm", "tppnnppdppn", &dtype, &x, &y, &R, &D, &w, &b, &eps,
             &mean, &var, &threads))
    return nullptr;
  {
    Unlocked unlocked(R * D);
    table_of_code(dtype).layer_norm(x, y, R, D, w, b, eps, mean, var, static_cast<int>(threads));
  }
  Py_RETURN_NONE;
}

// rms_norm(dtype, x, y, R, D, weight, eps, mean_square, threads): rows of D values.
PyObject* rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  void *x, *y, *w, *mean_square;
  int64_t dtype, R, D, threads;
  double eps;
  if (!parse(args, nargs, "rms_norm", "tppnnpdpn", &dtype, &x, &y, &R, &D, &w, &eps,
             &mean_square, &threads))
    return nullptr;
  {
    Unlocked unlocked(R * D);
    table_of_code(dtype).rms_norm(x, y, R, D, w, eps, mean_square, static_cast<int>(threads));
  }
  Py_RETURN_NONE;
}

// group_norm(dtype, x, y, N, C, HW, G, weight, bias, eps, mean, var, threads): statistics
// per (sample, group) into mean/var [N*G] (either may be null); y (if given) normalized.
PyObject* group_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  void *x, *y, *w, *b, *mean, *var;
  int64_t dtype, N, C, HW, G, threads;
  double eps;
  if (!parse(args, nargs, "group_norm", "tppnnnnppdppn", &dtype, &x, &y, &N, &C, &HW, &G, &w,
             &b, &eps, &mean, &var, &threads))
    return nullptr;
  {
    Unlocked unlocked(N * C * HW);
    table_of_code(dtype).group_norm(x, y, N, C, HW, G, w, b, eps, mean, var, static_cast<int>(threads));
  }
  Py_RETURN_NONE;
}

// instance_norm_train(dtype, x, y, N, C, HW, weight, bias, eps, mean, var, running_mean,
//                     running_var, momentum, reject, threads) -> bool (not rejected)
// rows.h's instance_train: y normalized per (sample, channel), statistics [N*C] into
// mean/var (if given), running statistics moved unless rejected.
PyObject* instance_norm_train(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  void *x, *y, *w, *b, *mean, *var, *rm, *rv;
  int64_t dtype, N, C, HW, reject, threads;
  double eps, momentum;
  if (!parse(args, nargs, "instance_norm_train", "tppnnnppdppppdnn", &dtype, &x, &y, &N, &C,
             &HW, &w, &b, &eps, &mean, &var, &rm, &rv, &momentum, &reject, &threads))
    return nullptr;
  bool ok = true;
  {
    Unlocked unlocked(N * C * HW);
    ok = table_of_code(dtype).instance_train(x, y, N, C, HW, w, b, eps, mean, var, rm, rv, momentum,
                                     reject != 0, static_cast<int>(threads));
  }
  return PyBool_FromLong(ok);
}

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
    method<instance_norm_eval_stats>("instance_norm_eval_stats"),
    method<layer_norm>("layer_norm"),
    method<rms_norm>("rms_norm"),
    method<group_norm>("group_norm"),
    method<instance_norm_train>("instance_norm_train"),
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
