// Fused normalization kernels for contiguous float32 CPU tensors, as a Python module.
//
// normcore/kernels/cpu.py calls these with raw data pointers (Python ints, 0 for none) and
// sizes. It has already checked dtype, device, layout and sizes and allocated every
// output; whatever it cannot hand over goes through torch instead.
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

#include "channels.h"
#include "drift.h"
#include "parallel.h"
#include "reduce.h"
#include "rows.h"

namespace normcore {
namespace {

// Arguments by format letter: p pointer (int, 0 for none), n int64, d double.
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

// batch_norm_train(x, y, N, C, HW, weight, bias, eps, mean, var, running_mean, running_var,
//                  num_batches_tracked, momentum, reject, threads) -> bool (not rejected)
// Batch statistics per channel into mean/var (if given). Rejected if reject is set and
// they are not all finite; otherwise y (if given) is normalized with them, the running
// statistics (if given) move by momentum towards the mean and unbiased variance, and
// num_batches_tracked (int64, if given) counts one more batch.
PyObject* batch_norm_train(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  float *x, *y, *w, *b, *mean, *var, *rm, *rv;
  int64_t* tracked;
  int64_t N, C, HW, reject, threads;
  double eps, momentum;
  if (!parse(args, nargs, "batch_norm_train", "ppnnnppdpppppdnn", &x, &y, &N, &C, &HW, &w,
             &b, &eps, &mean, &var, &rm, &rv, &tracked, &momentum, &reject, &threads))
    return nullptr;
  bool finite = true;
  {
    Unlocked unlocked(N * C * HW);
    std::vector<float> k(C), a(C), off(C);
    for (int64_t c = 0; c < C; ++c) k[c] = x[c * HW];
    const std::vector<Sums> sums = channel_sums(x, N, C, HW, k.data(), threads);
    const int64_t n = N * HW;
    std::vector<Moments> ms(C);
    for (int64_t c = 0; c < C; ++c) {
      ms[c] = moments(sums[c], n, k[c]);
      finite = finite && ms[c].finite();
      if (mean) mean[c] = static_cast<float>(ms[c].mean);
      if (var) var[c] = static_cast<float>(ms[c].var);
    }
    if (finite || !reject) {
      for (int64_t c = 0; c < C; ++c) {
        const double scale = rstd_of(ms[c].var, eps) * (w ? w[c] : 1.0f);
        a[c] = static_cast<float>(scale);
        off[c] = static_cast<float>((b ? b[c] : 0.0f) - ms[c].dm * scale);
        if (rm) {
          rm[c] = static_cast<float>((1 - momentum) * rm[c] + momentum * ms[c].mean);
          rv[c] = static_cast<float>((1 - momentum) * rv[c] +
                                     momentum * ms[c].var * n / static_cast<double>(n - 1));
        }
      }
      if (tracked) ++*tracked;
      if (y) channel_affine(x, y, N, C, HW, k.data(), a.data(), off.data(), threads);
    }
  }
  return PyBool_FromLong(finite || !reject);
}

// batch_norm_eval(x, y, N, C, HW, weight, bias, running_mean, running_var, eps, threads)
// y = x * scale[c] + shift[c], running statistics and affine folded as torch folds them.
PyObject* batch_norm_eval(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  float *x, *y, *w, *b, *rm, *rv;
  int64_t N, C, HW, threads;
  double eps;
  if (!parse(args, nargs, "batch_norm_eval", "ppnnnppppdn", &x, &y, &N, &C, &HW, &w, &b, &rm,
             &rv, &eps, &threads))
    return nullptr;
  {
    Unlocked unlocked(N * C * HW);
    std::vector<float> zero(C, 0.0f), scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      const float invstd = 1.0f / std::sqrt(rv[c] + static_cast<float>(eps));
      scale[c] = w ? invstd * w[c] : invstd;
      shift[c] = (b ? b[c] : 0.0f) - rm[c] * scale[c];
    }
    channel_affine(x, y, N, C, HW, zero.data(), scale.data(), shift.data(), threads);
  }
  Py_RETURN_NONE;
}

// batch_norm_eval_stats(x, y, N, C, HW, weight, bias, running_mean, running_var, eps, mean,
//                       var, threads)
// batch_norm_eval's y, and the batch statistics per channel into mean/var as
// batch_norm_train computes them (the same sums), in one read of x: what normalize() in
// eval mode returns. Outputs big enough to be streamed take two passes instead.
PyObject* batch_norm_eval_stats(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  float *x, *y, *w, *b, *rm, *rv, *mean, *var;
  int64_t N, C, HW, threads;
  double eps;
  if (!parse(args, nargs, "batch_norm_eval_stats", "ppnnnppppdppn", &x, &y, &N, &C, &HW, &w,
             &b, &rm, &rv, &eps, &mean, &var, &threads))
    return nullptr;
  {
    Unlocked unlocked(N * C * HW);
    std::vector<float> k(C), scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      k[c] = x[c * HW];
      const float invstd = 1.0f / std::sqrt(rv[c] + static_cast<float>(eps));
      scale[c] = w ? invstd * w[c] : invstd;
      shift[c] = (b ? b[c] : 0.0f) - rm[c] * scale[c];
    }
    const int t = static_cast<int>(threads);
    std::vector<Sums> sums;
    if (streaming(N * C * HW * static_cast<int64_t>(sizeof(float)))) {
      sums = channel_sums(x, N, C, HW, k.data(), t);
      const std::vector<float> zero(C, 0.0f);
      channel_affine(x, y, N, C, HW, zero.data(), scale.data(), shift.data(), t);
    } else {
      sums = channel_affine_sums(x, y, N, C, HW, k.data(), scale.data(), shift.data(), t);
    }
    for (int64_t c = 0; c < C; ++c) {
      const Moments ms = moments(sums[c], N * HW, k[c]);
      mean[c] = static_cast<float>(ms.mean);
      var[c] = static_cast<float>(ms.var);
    }
  }
  Py_RETURN_NONE;
}

// layer_norm(x, y, R, D, weight, bias, eps, mean, var, threads): rows of D values.
PyObject* layer_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  Rows p;
  float *w, *b;
  int64_t threads;
  if (!parse(args, nargs, "layer_norm", "ppnnppdppn", &p.x, &p.y, &p.R, &p.L, &w, &b, &p.eps,
             &p.mean_out, &p.var_out, &threads))
    return nullptr;
  {
    Unlocked unlocked(p.R * p.L);
    layer_rows(p, w, b, static_cast<int>(threads));
  }
  Py_RETURN_NONE;
}

// rms_norm(x, y, R, D, weight, eps, mean_square, threads): rows of D values.
PyObject* rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  Rows p;
  float* w;
  int64_t threads;
  if (!parse(args, nargs, "rms_norm", "ppnnpdpn", &p.x, &p.y, &p.R, &p.L, &w, &p.eps,
             &p.var_out, &threads))
    return nullptr;
  p.mean_out = nullptr;
  {
    Unlocked unlocked(p.R * p.L);
    rms_rows(p, w, static_cast<int>(threads));
  }
  Py_RETURN_NONE;
}

// group_norm(x, y, N, C, HW, G, weight, bias, eps, mean, var, threads): statistics per
// (sample, group) into mean/var [N*G] (either may be null); y (if given) normalized.
PyObject* group_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  Rows p;
  float *w, *b;
  int64_t N, C, HW, G, threads;
  if (!parse(args, nargs, "group_norm", "ppnnnnppdppn", &p.x, &p.y, &N, &C, &HW, &G, &w, &b,
             &p.eps, &p.mean_out, &p.var_out, &threads))
    return nullptr;
  p.R = N * G;
  p.L = C / G * HW;
  {
    Unlocked unlocked(p.R * p.L);
    group_rows(p, w, b, G, C / G, HW, static_cast<int>(threads));
  }
  Py_RETURN_NONE;
}

// instance_norm_train(x, y, N, C, HW, weight, bias, eps, mean, var, running_mean,
//                     running_var, momentum, reject, threads) -> bool (not rejected)
// y normalized per (sample, channel); statistics [N*C] into mean/var (if given). Unless
// reject is set and a statistic is not finite, the running statistics (if given) move
// towards the batch average of the per-instance mean and unbiased variance.
PyObject* instance_norm_train(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  Rows p;
  float *w, *b, *rm, *rv;
  int64_t N, C, HW, reject, threads;
  double momentum;
  if (!parse(args, nargs, "instance_norm_train", "ppnnnppdppppdnn", &p.x, &p.y, &N, &C, &HW,
             &w, &b, &p.eps, &p.mean_out, &p.var_out, &rm, &rv, &momentum, &reject,
             &threads))
    return nullptr;
  p.R = N * C;
  p.L = HW;
  bool finite = true;
  {
    Unlocked unlocked(p.R * p.L);
    std::vector<float> mean_own, var_own;
    if (rm && !p.mean_out) {
      mean_own.resize(p.R);
      p.mean_out = mean_own.data();
    }
    if (rm && !p.var_out) {
      var_own.resize(p.R);
      p.var_out = var_own.data();
    }
    group_rows(p, w, b, C, 1, HW, static_cast<int>(threads));
    if (rm) {
      for (int64_t r = 0; r < p.R; ++r)
        finite = finite && std::isfinite(p.mean_out[r]) && std::isfinite(p.var_out[r]);
      if (finite || !reject) {
        const double unbias = HW / static_cast<double>(HW - 1);
        for (int64_t c = 0; c < C; ++c) {
          double m = 0, v = 0;
          for (int64_t n = 0; n < N; ++n) {
            m += p.mean_out[n * C + c];
            v += p.var_out[n * C + c];
          }
          rm[c] = static_cast<float>((1 - momentum) * rm[c] + momentum * m / N);
          rv[c] = static_cast<float>((1 - momentum) * rv[c] + momentum * v / N * unbias);
        }
      }
    }
  }
  return PyBool_FromLong(finite || !reject);
}

// gaussian_drift(mean, var, rows, C, unbias, ref_mean, ref_var, eps, weight, top)
//     -> (score, ((channel, J_c), ...))
// drift.h: the drift score of a batch's statistics ([rows, C], var biased, times unbias)
// against a reference (unbiased var), its `top` channels that moved most, and the
// reference moved by weight towards the batch when the score is finite.
PyObject* gaussian_drift_(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  float *mean, *var, *rm, *rv;
  int64_t rows, C, top;
  double unbias, eps, weight;
  if (!parse(args, nargs, "gaussian_drift", "ppnndppddn", &mean, &var, &rows, &C, &unbias,
             &rm, &rv, &eps, &weight, &top))
    return nullptr;
  return drift_tuple(gaussian_drift(mean, var, rows, C, unbias, rm, rv, eps, weight, top));
}

// feature_drift(x, N, C, HW, ref_mean, ref_var, eps, weight, top, threads)
//     -> (score, ((channel, J_c), ...))
// gaussian_drift of the per-channel statistics of [N, C, HW] (as batch_norm_train computes
// them, never stored): LayerNorm's and RMSNorm's input features as [rows, features, 1].
PyObject* feature_drift(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  float *x, *rm, *rv;
  int64_t N, C, HW, top, threads;
  double eps, weight;
  if (!parse(args, nargs, "feature_drift", "pnnnppddnn", &x, &N, &C, &HW, &rm, &rv, &eps,
             &weight, &top, &threads))
    return nullptr;
  const int64_t n = N * HW;
  std::vector<double> mean(C), var(C);
  {
    Unlocked unlocked(N * C * HW);
    std::vector<float> k(C);
    for (int64_t c = 0; c < C; ++c) k[c] = x[c * HW];
    const std::vector<Sums> sums = channel_sums(x, N, C, HW, k.data(), threads);
    for (int64_t c = 0; c < C; ++c) {
      const Moments ms = moments(sums[c], n, k[c]);
      mean[c] = ms.mean;
      var[c] = ms.var;
    }
  }
  return drift_tuple(gaussian_drift(mean.data(), var.data(), 1, C,
                                    n / static_cast<double>(n - 1), rm, rv, eps, weight, top));
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
    "Fused normalization kernels for contiguous float32 CPU tensors.", -1, methods,
    nullptr, nullptr, nullptr, nullptr,
};

}  // namespace
}  // namespace normcore

PyMODINIT_FUNC PyInit_normcore_kernels(void) { return PyModule_Create(&normcore::module); }
