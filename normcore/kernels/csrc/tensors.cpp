// BatchNorm's entry points, taking torch tensors rather than raw pointers.
//
// A layer's call on a few megabytes spends as long in Python as the kernel spends beyond a
// copy: the input streams through the caches and evicts the interpreter, so each check of
// a tensor's dtype, device and layout, and the allocation of the output through torch's
// Python bindings, runs from far memory (about 50 microseconds on a 4 MB input, against
// 5 here). So BatchNorm, the most called family, checks and allocates in C++: this is the
// one unit compiled against torch's headers and linked to its libraries.
//
// Each entry point declines (returns NotImplemented, and touches nothing) every input that
// normcore/kernels/cpu.py used to decline before a kernel call: anything but a plain CPU
// tensor of float32, float16, bfloat16 or float64, C-contiguous (BatchNorm2d/3d:
// channels_last too), non-empty, with per-channel tensors of C contiguous values in the
// statistics' dtype; gradients wanted, or a trace being recorded; one value per channel in
// training. The Python side then takes torch's path, which raises torch's errors.

#include <Python.h>

#include <ATen/TracerMode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <exception>

#include "calls.h"
#include "table.h"
#include "tensors.h"

namespace normcore {
namespace {

// An input's layout as the kernels take it: [N, C, HW], channels_last as [N*H*W, C, 1].
struct Layout {
  const at::Tensor* x = nullptr;
  int64_t dtype = 0, N = 0, C = 0, HW = 0;
  c10::ScalarType stats = c10::ScalarType::Float;  // of parameters and statistics
};

int64_t code_of(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Float:
      return kF32;
    case c10::ScalarType::Half:
      return kF16;
    case c10::ScalarType::BFloat16:
      return kBF16;
    case c10::ScalarType::Double:
      return kF64;
    default:
      return -1;
  }
}

// A dense CPU tensor whose data pointer means what its sizes say: no subclass that
// dispatches in Python, no functorch wrapper (no storage), no lazy negation.
bool plain_cpu(const at::Tensor& t) {
  return t.layout() == c10::kStrided && t.device().is_cpu() && t.has_storage() &&
         !t.unsafeGetTensorImpl()->is_python_dispatch() && !t.is_neg() && !t.is_conj();
}

// The tensor behind o, or nullptr for None; false when o is neither.
bool tensor_arg(PyObject* o, const at::Tensor*& t) {
  if (o == Py_None) {
    t = nullptr;
    return true;
  }
  if (!THPVariable_Check(o)) return false;
  t = &THPVariable_Unpack(o);
  return true;
}

// The layout of a taken input, with no gradient wanted of it or of weight/bias.
bool input_layout(PyObject* o, const at::Tensor* w, const at::Tensor* b, Layout& l) {
  if (o == Py_None || !tensor_arg(o, l.x)) return false;
  const at::Tensor& x = *l.x;
  l.dtype = code_of(x.scalar_type());
  if (l.dtype < 0 || x.dim() < 2 || !plain_cpu(x) || x.numel() == 0) return false;
  if (at::tracer::impl::is_dispatch_enabled()) return false;
  if (c10::GradMode::is_enabled() &&
      (x.requires_grad() || (w && w->requires_grad()) || (b && b->requires_grad())))
    return false;
  l.stats = l.dtype == kF64 ? c10::ScalarType::Double : c10::ScalarType::Float;
  const int64_t n = x.numel();
  l.C = x.size(1);
  if (x.is_contiguous()) {
    l.N = x.size(0);
    l.HW = n / (l.N * l.C);
    return true;
  }
  const bool last = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                    (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (!last) return false;
  l.N = n / l.C;
  l.HW = 1;
  return true;
}

// Each of these None or C contiguous values of the statistics' dtype on the CPU.
bool vectors(const Layout& l, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t && (t->scalar_type() != l.stats || !plain_cpu(*t) || t->numel() != l.C ||
              !t->is_contiguous()))
      return false;
  }
  return true;
}

void* ptr(const at::Tensor* t) { return t ? t->data_ptr() : nullptr; }

PyObject* wrap(const at::Tensor& t) {
  if (!t.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(t);
}

PyObject* declined() { Py_RETURN_NOTIMPLEMENTED; }

// Runs f, turning a torch error (an allocation that fails, say) into a Python exception.
template <class F>
PyObject* guarded(const F& f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

bool args_count(const char* name, Py_ssize_t nargs, Py_ssize_t want) {
  if (nargs == want) return true;
  PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, nargs);
  return false;
}

}  // namespace

// batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked,
//                  momentum, eps, reject, output, stats, threads)
//     -> (y or None, mean or None, var or None, not rejected) | NotImplemented
// batch.h's batch_train; y only if `output`, the batch statistics [C] only if `stats`.
// The running statistics move (and the batch is counted, when num_batches_tracked is
// given) only when both are given; their version counters are bumped as an in-place
// operation bumps them, so autograd sees the write.
PyObject* batch_norm_train_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (!args_count("batch_norm_train", nargs, 12)) return nullptr;
  return guarded([&]() -> PyObject* {
    const at::Tensor *w, *b, *rm, *rv, *count;
    if (!tensor_arg(args[1], w) || !tensor_arg(args[2], b) || !tensor_arg(args[3], rm) ||
        !tensor_arg(args[4], rv) || !tensor_arg(args[5], count))
      return declined();
    Layout l;
    if (!input_layout(args[0], w, b, l) || l.N * l.HW == 1 || !vectors(l, {w, b, rm, rv}))
      return declined();
    const bool update = rm && rv;
    if (!update) count = nullptr;
    if (count && (count->scalar_type() != c10::ScalarType::Long || !plain_cpu(*count) ||
                  count->numel() != 1))
      return declined();
    const double momentum = PyFloat_AsDouble(args[6]), eps = PyFloat_AsDouble(args[7]);
    const int reject = PyObject_IsTrue(args[8]), output = PyObject_IsTrue(args[9]),
              stats = PyObject_IsTrue(args[10]);
    const long threads = PyLong_AsLong(args[11]);
    if (PyErr_Occurred() || reject < 0 || output < 0 || stats < 0) return nullptr;

    const at::Tensor y = output ? at::empty_like(*l.x) : at::Tensor();
    const auto options = at::TensorOptions().dtype(l.stats);
    const at::Tensor mean = stats ? at::empty({l.C}, options) : at::Tensor();
    const at::Tensor var = stats ? at::empty({l.C}, options) : at::Tensor();
    bool ok;
    {
      Unlocked unlocked(l.N * l.C * l.HW);
      ok = table_of_code(l.dtype).batch_train(
          l.x->data_ptr(), y.defined() ? y.data_ptr() : nullptr, l.N, l.C, l.HW, ptr(w),
          ptr(b), eps, mean.defined() ? mean.data_ptr() : nullptr,
          var.defined() ? var.data_ptr() : nullptr, update ? rm->data_ptr() : nullptr,
          update ? rv->data_ptr() : nullptr,
          count ? static_cast<int64_t*>(count->data_ptr()) : nullptr, momentum,
          update && reject, static_cast<int>(threads));
    }
    if (ok && update) {
      for (const at::Tensor* t : {rm, rv, count})
        if (t) t->unsafeGetTensorImpl()->bump_version();
    }
    return Py_BuildValue("(NNNO)", wrap(y), wrap(mean), wrap(var), ok ? Py_True : Py_False);
  });
}

namespace {

// The two eval entry points: y = x * scale[c] + shift[c], the running statistics folded
// in as torch folds them; with `stats`, also the batch statistics [C] from the same read,
// as batch_norm_train computes them.
PyObject* eval_tensors(const char* name, bool stats, PyObject* const* args,
                       Py_ssize_t nargs) {
  if (!args_count(name, nargs, 7)) return nullptr;
  return guarded([&]() -> PyObject* {
    const at::Tensor *w, *b, *rm, *rv;
    if (!tensor_arg(args[1], w) || !tensor_arg(args[2], b) || !tensor_arg(args[3], rm) ||
        !tensor_arg(args[4], rv) || !rm || !rv)
      return declined();
    Layout l;
    if (!input_layout(args[0], w, b, l) || !vectors(l, {w, b, rm, rv})) return declined();
    const double eps = PyFloat_AsDouble(args[5]);
    const long threads = PyLong_AsLong(args[6]);
    if (PyErr_Occurred()) return nullptr;

    const at::Tensor y = at::empty_like(*l.x);
    const Table& kernels = table_of_code(l.dtype);
    if (!stats) {
      {
        Unlocked unlocked(l.N * l.C * l.HW);  // the GIL is back before wrap() below
        kernels.batch_eval(l.x->data_ptr(), y.data_ptr(), l.N, l.C, l.HW, ptr(w), ptr(b),
                           rm->data_ptr(), rv->data_ptr(), eps, static_cast<int>(threads));
      }
      return wrap(y);
    }
    const auto options = at::TensorOptions().dtype(l.stats);
    const at::Tensor mean = at::empty({l.C}, options), var = at::empty({l.C}, options);
    {
      Unlocked unlocked(l.N * l.C * l.HW);
      kernels.batch_eval_stats(l.x->data_ptr(), y.data_ptr(), l.N, l.C, l.HW, ptr(w), ptr(b),
                               rm->data_ptr(), rv->data_ptr(), eps, mean.data_ptr(),
                               var.data_ptr(), static_cast<int>(threads));
    }
    return Py_BuildValue("(NNN)", wrap(y), wrap(mean), wrap(var));
  });
}

}  // namespace

// batch_norm_eval(input, weight, bias, running_mean, running_var, eps, threads)
//     -> y | NotImplemented
PyObject* batch_norm_eval_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return eval_tensors("batch_norm_eval", false, args, nargs);
}

// batch_norm_eval_stats(input, weight, bias, running_mean, running_var, eps, threads)
//     -> (y, mean, var) | NotImplemented
// What normalize() in eval mode returns: y, and the batch's statistics for monitoring.
PyObject* batch_norm_eval_stats_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return eval_tensors("batch_norm_eval_stats", true, args, nargs);
}

}  // namespace normcore
