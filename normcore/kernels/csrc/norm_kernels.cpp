// Fused normalization kernels for contiguous CPU tensors, as a Python module.
//
// normcore/kernels/cpu.py calls these with a dtype code (kDtypes below), raw data pointers
// (Python ints, 0 for none) and sizes. It has already checked dtype, device, layout and
// sizes and allocated every output; whatever it cannot hand over goes through torch
// instead. Each entry point is one template over the storage type (convert.h): inputs and
// outputs of float32, float16, bfloat16 or float64, with parameters, running statistics and
// returned statistics in acc_t<T> (float32, or float64 for float64 inputs).
//
// Memory traffic: BatchNorm train reads x twice (statistics, then normalization) and
// writes y once; BatchNorm eval folds the running statistics into one scale and shift per
// channel (1 read, 1 write), and computes the batch statistics in that same read when they
// are wanted; LayerNorm, RMSNorm, GroupNorm and InstanceNorm normalize each
// row or (sample, group) plane right after its statistics, while it is still in cache.
//
// Work is cut into chunks of about kChunk values (parallel.h runs them); inputs smaller
// than two chunks run on the calling thread. Partial statistics are kept per chunk and added in
// a fixed order, so results do not depend on the number of threads. The GIL is released
// while a kernel runs, except for inputs too small to be worth it.

#include <Python.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstring>
#include <vector>

#include "batch.h"
#include "channels.h"
#include "convert.h"
#include "drift.h"
#include "parallel.h"
#include "reduce.h"
#include "rows.h"

namespace normcore {
namespace {

// Dtype codes, as cpu.py numbers them: float32, float16, bfloat16, float64.
enum Dtype : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// f(T{}) for the storage type of a dtype code (parse has checked it).
template <class F>
void typed(int64_t dtype, const F& f) {
  switch (dtype) {
    case kF16:
      return f(f16{});
    case kBF16:
      return f(bf16{});
    case kF64:
      return f(double{});
    default:
      return f(float{});
  }
}

// f(S{}, R{}) for statistics and a reference of dtype codes kF32 or kF64 (parse has checked).
template <class F>
void typed2(int64_t stats, int64_t ref, const F& f) {
  auto with = [&](auto s) { return ref == kF64 ? f(s, double{}) : f(s, float{}); };
  return stats == kF64 ? with(double{}) : with(float{});
}

template <class T>
const T* in(void* p) {
  return static_cast<const T*>(p);
}
template <class T>
T* out(void* p) {
  return static_cast<T*>(p);
}

// Arguments by format letter: p pointer (int, 0 for none), n int64, d double, t a dtype
// code (int64, one of Dtype), s a dtype code of statistics (kF32 or kF64).
bool parse(PyObject* const* args, Py_ssize_t nargs, const char* name, const char* fmt, ...) {
  const Py_ssize_t want = static_cast<Py_ssize_t>(std::strlen(fmt));
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, nargs);
    return false;
  }
  va_list ap;
  va_start(ap, fmt);
  for (Py_ssize_t i = 0; i < want; ++i) {
    switch (fmt[i]) {
      case 'p':
        *va_arg(ap, void**) = PyLong_AsVoidPtr(args[i]);
        break;
      case 'n':
        *va_arg(ap, int64_t*) = PyLong_AsLongLong(args[i]);
        break;
      case 't':
      case 's': {
        const int64_t code = *va_arg(ap, int64_t*) = PyLong_AsLongLong(args[i]);
        const bool ok = fmt[i] == 't' ? code >= kF32 && code <= kF64 : code == kF32 || code == kF64;
        if (!ok && !PyErr_Occurred())
          PyErr_Format(PyExc_ValueError, "%s: dtype code %lld not taken", name,
                       static_cast<long long>(code));
        break;
      }
      default:
        *va_arg(ap, double*) = PyFloat_AsDouble(args[i]);
    }
    if (PyErr_Occurred()) {
      va_end(ap);
      return false;
    }
  }
  va_end(ap);
  return true;
}

// Releases the GIL while a kernel runs, unless the input is so small that releasing and
// taking it back would cost more than the kernel.
class Unlocked {
 public:
  explicit Unlocked(int64_t work) : state_(work >= kChunk ? PyEval_SaveThread() : nullptr) {}
  ~Unlocked() {
    if (state_) PyEval_RestoreThread(state_);
  }
  Unlocked(const Unlocked&) = delete;
  Unlocked& operator=(const Unlocked&) = delete;

 private:
  PyThreadState* state_;
};

// batch_norm_train(dtype, x, y, N, C, HW, weight, bias, eps, mean, var, running_mean,
//                  running_var, num_batches_tracked, momentum, reject, threads)
//     -> bool (not rejected)
// batch.h's batch_train: statistics, running statistics, the batch counted, y normalized.
PyObject* batch_norm_train(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  void *x, *y, *w, *b, *mean, *var, *rm, *rv;
  int64_t* tracked;
  int64_t dtype, N, C, HW, reject, threads;
  double eps, momentum;
  if (!parse(args, nargs, "batch_norm_train", "tppnnnppdpppppdnn", &dtype, &x, &y, &N, &C,
             &HW, &w, &b, &eps, &mean, &var, &rm, &rv, &tracked, &momentum, &reject,
             &threads))
    return nullptr;
  bool ok = true;
  {
    Unlocked unlocked(N * C * HW);
    typed(dtype, [&](auto t) {
      using T = decltype(t);
      using A = acc_t<T>;
      ok = batch_train(in<T>(x), out<T>(y), N, C, HW, in<A>(w), in<A>(b), eps, out<A>(mean),
                       out<A>(var), out<A>(rm), out<A>(rv), tracked, momentum, reject != 0,
                       static_cast<int>(threads));
    });
  }
  return PyBool_FromLong(ok);
}

// batch_norm_eval(dtype, x, y, N, C, HW, weight, bias, running_mean, running_var, eps,
//                 threads)
// y = x * scale[c] + shift[c], running statistics and affine folded as torch folds them.
PyObject* batch_norm_eval(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  void *x, *y, *w, *b, *rm, *rv;
  int64_t dtype, N, C, HW, threads;
  double eps;
  if (!parse(args, nargs, "batch_norm_eval", "tppnnnppppdn", &dtype, &x, &y, &N, &C, &HW, &w,
             &b, &rm, &rv, &eps, &threads))
    return nullptr;
  {
    Unlocked unlocked(N * C * HW);
    typed(dtype, [&](auto t) {
      using T = decltype(t);
      using A = acc_t<T>;
      batch_eval(in<T>(x), out<T>(y), N, C, HW, in<A>(w), in<A>(b), in<A>(rm), in<A>(rv), eps,
                 static_cast<int>(threads));
    });
  }
  Py_RETURN_NONE;
}

// batch_norm_eval_stats(dtype, x, y, N, C, HW, weight, bias, running_mean, running_var, eps,
//                       mean, var, threads)
// batch_norm_eval's y, and the batch statistics per channel into mean/var as
// batch_norm_train computes them, in the same read of x: what normalize() in eval mode
// returns.
PyObject* batch_norm_eval_stats(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  void *x, *y, *w, *b, *rm, *rv, *mean, *var;
  int64_t dtype, N, C, HW, threads;
  double eps;
  if (!parse(args, nargs, "batch_norm_eval_stats", "tppnnnppppdppn", &dtype, &x, &y, &N, &C,
             &HW, &w, &b, &rm, &rv, &eps, &mean, &var, &threads))
    return nullptr;
  {
    Unlocked unlocked(N * C * HW);
    typed(dtype, [&](auto t) {
      using T = decltype(t);
      using A = acc_t<T>;
      batch_eval_stats(in<T>(x), out<T>(y), N, C, HW, in<A>(w), in<A>(b), in<A>(rm),
                       in<A>(rv), eps, out<A>(mean), out<A>(var), static_cast<int>(threads));
    });
  }
  Py_RETURN_NONE;
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
    typed(dtype, [&](auto t) {
      using T = decltype(t);
      using A = acc_t<T>;
      const Rows<T> p{in<T>(x), out<T>(y), R, D, eps, out<A>(mean), out<A>(var)};
      layer_rows(p, in<A>(w), in<A>(b), static_cast<int>(threads));
    });
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
    typed(dtype, [&](auto t) {
      using T = decltype(t);
      using A = acc_t<T>;
      const Rows<T> p{in<T>(x), out<T>(y), R, D, eps, nullptr, out<A>(mean_square)};
      rms_rows(p, in<A>(w), static_cast<int>(threads));
    });
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
    typed(dtype, [&](auto t) {
      using T = decltype(t);
      using A = acc_t<T>;
      const Rows<T> p{in<T>(x), out<T>(y), N * G, C / G * HW, eps, out<A>(mean), out<A>(var)};
      group_rows(p, in<A>(w), in<A>(b), G, C / G, HW, static_cast<int>(threads));
    });
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
    typed(dtype, [&](auto t) {
      using T = decltype(t);
      using A = acc_t<T>;
      const Rows<T> p{in<T>(x), out<T>(y), N * C, HW, eps, out<A>(mean), out<A>(var)};
      ok = instance_train(p, N, C, HW, in<A>(w), in<A>(b), out<A>(rm), out<A>(rv), momentum,
                          reject != 0, static_cast<int>(threads));
    });
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
    typed(dtype, [&](auto t) {
      const std::vector<Moments> ms =
          channel_moments(in<decltype(t)>(x), N, C, HW, static_cast<int>(threads));
      for (int64_t c = 0; c < C; ++c) {
        mean[c] = ms[c].mean;
        var[c] = ms[c].var;
      }
    });
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
    method<batch_norm_train>("batch_norm_train"),
    method<batch_norm_eval>("batch_norm_eval"),
    method<batch_norm_eval_stats>("batch_norm_eval_stats"),
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
