// The module's normalization entry points, taking torch tensors rather than raw pointers.
//
// A layer's call on a few megabytes used to spend as long in Python as the kernel spends
// beyond a copy: the input streams through the caches and evicts the interpreter, so each
// check of a tensor's dtype, device and layout, and each allocation through torch's Python
// bindings, ran from far memory (about 50 microseconds on a 4 MB input, against 5 here).
// So the checks and the allocations are done in C++: this is the one unit compiled against
// torch's headers and linked to its libraries.
//
// Each entry point declines (returns NotImplemented, and touches nothing) every input it
// does not take: anything but a plain CPU tensor of float32, float16, bfloat16 or float64,
// C-contiguous (BatchNorm: channels_last too), non-empty, with parameters and running
// statistics of the right sizes, contiguous, in the statistics' dtype (float32, float64
// under float64); gradients wanted or a trace being recorded; one value per channel, group
// or instance in training, where torch raises. The caller (normcore/kernels/cpu.py) then
// takes torch's path, which raises torch's errors. Outputs are allocated here, as
// torch.empty_like allocates them; running statistics written here have their version
// counters bumped, as an in-place operation bumps them, so autograd sees the write.

#include <Python.h>

#include <ATen/TracerMode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <exception>
#include <initializer_list>
#include <vector>

#include "calls.h"
#include "table.h"
#include "tensors.h"

namespace normcore {
namespace {

using Tensor = at::Tensor;

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

// A dense CPU tensor whose data pointer means what its sizes say: not nested, not a
// wrapper whose data is another tensor's (functionalization, functorch, a subclass that
// dispatches in Python), not lazily negated, and all it carries: no tangent.
constexpr c10::DispatchKeySet kWrapped({c10::DispatchKey::Functionalize,
                                         c10::DispatchKey::FuncTorchBatched,
                                         c10::DispatchKey::FuncTorchGradWrapper,
                                         c10::DispatchKey::Python});

// A dual tensor of forward-mode AD: one with a tangent at some open level, which the
// kernels would drop (torch's path carries it to the output, as torch.nn does). Forward AD
// works with gradients off too, so this is not the requires_grad check.
bool dual(const Tensor& t) {
  if (!t.unsafeGetTensorImpl()->autograd_meta()) return false;  // the common case
  for (uint64_t level = 0; torch::autograd::ForwardADLevel::try_get_by_idx(level); ++level)
    if (t._fw_grad(level).defined()) return true;
  return false;
}

bool plain_cpu(const Tensor& t) {
  return t.layout() == c10::kStrided && t.device().is_cpu() && !t.is_nested() &&
         t.has_storage() && !t.key_set().has_any(kWrapped) && !t.is_neg() && !t.is_conj() &&
         !dual(t);
}

// A running statistic a train step may write: an inference tensor only in inference mode
// (elsewhere torch refuses the in-place update before it writes, and so must this).
bool writable(const Tensor* t) {
  return !t || !t->is_inference() || c10::InferenceMode::is_enabled();
}

// The tensor behind o into t, nullptr for None; false when o is neither. Only torch.Tensor
// and nn.Parameter themselves: a subclass's output must be of its class, as torch's path
// makes it.
bool tensor_arg(PyObject* o, const Tensor*& t) {
  if (o == Py_None) {
    t = nullptr;
    return true;
  }
  if (!THPVariable_CheckExact(o)) return false;
  t = &THPVariable_Unpack(o);
  return true;
}

template <class... P>
bool tensor_args(PyObject* const* args, P*... out) {
  int i = 0;
  return (tensor_arg(args[i++], *out) && ...);
}

// The input and what the kernels need to know of it.
struct Input {
  const Tensor* x = nullptr;
  int64_t dtype = 0;  // calls.h's Dtype
  c10::ScalarType stats = c10::ScalarType::Float;  // of parameters and statistics
  int64_t N = 0, C = 0, HW = 0;  // as [N, C, HW]; channels_last as [N*H*W, C, 1]

  // Per-channel (or per-group, per-row) tensors: each null or n contiguous values of the
  // statistics' dtype.
  bool vectors(int64_t n, std::initializer_list<const Tensor*> tensors) const {
    for (const Tensor* t : tensors) {
      if (t && (t->scalar_type() != stats || !plain_cpu(*t) || t->numel() != n ||
                !t->is_contiguous()))
        return false;
    }
    return true;
  }
  at::TensorOptions options() const { return at::TensorOptions().dtype(stats); }
  int64_t work() const { return x->numel(); }
};

// x taken if it is a plain CPU tensor of a kernel dtype with values, no trace is being
// recorded and no gradient is wanted of it or of the parameters w, b. `channels_last`:
// BatchNorm's inputs may be channels_last too; others must be C-contiguous. Inputs of
// fewer than two dims have no channels: they are taken only with `rows` (LayerNorm's
// [D] is one row).
bool take(PyObject* o, const Tensor* w, const Tensor* b, Input& in, bool channels_last,
          bool rows = false) {
  if (!tensor_arg(o, in.x) || !in.x) return false;
  const Tensor& x = *in.x;
  in.dtype = code_of(x.scalar_type());
  if (in.dtype < 0 || !plain_cpu(x) || x.numel() == 0 || (x.dim() < 2 && !rows)) return false;
  if (at::tracer::impl::is_dispatch_enabled()) return false;
  if (c10::GradMode::is_enabled() &&
      (x.requires_grad() || (w && w->requires_grad()) || (b && b->requires_grad())))
    return false;
  in.stats = in.dtype == kF64 ? c10::ScalarType::Double : c10::ScalarType::Float;
  if (x.dim() < 2) return x.is_contiguous();
  const int64_t n = x.numel();
  in.C = x.size(1);
  if (x.is_contiguous()) {
    in.N = x.size(0);
    in.HW = n / (in.N * in.C);
    return true;
  }
  if (!channels_last) return false;
  const bool last = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                    (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  in.N = n / in.C;
  in.HW = 1;
  return last;
}

void* ptr(const Tensor* t) { return t ? t->data_ptr() : nullptr; }
void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

PyObject* wrap(const Tensor& t) {
  if (!t.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(t);
}

PyObject* declined() { Py_RETURN_NOTIMPLEMENTED; }

// The version counters of running statistics written through their pointers.
void bump(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors)
    if (t) t->unsafeGetTensorImpl()->bump_version();
}

// f() with a torch error (an allocation that fails, say) turned into a Python exception,
// after checking that the call has `want` arguments.
template <class F>
PyObject* guarded(const char* name, Py_ssize_t nargs, Py_ssize_t want, const F& f) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, nargs);
    return nullptr;
  }
  try {
    return f();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// Plain arguments: a float, an int, a truth value; -1 / NaN with a Python error set.
double number(PyObject* o) { return PyFloat_AsDouble(o); }
long integer(PyObject* o) { return PyLong_AsLong(o); }
int truth(PyObject* o) { return PyObject_IsTrue(o); }

// The sizes of a tuple of ints into `shape`; false (and no Python error) if it is not one.
bool int_tuple(PyObject* o, std::vector<int64_t>& shape) {
  if (!PyTuple_Check(o)) return false;
  const Py_ssize_t k = PyTuple_GET_SIZE(o);
  shape.resize(k);
  for (Py_ssize_t i = 0; i < k; ++i) {
    PyObject* v = PyTuple_GET_ITEM(o, i);
    if (!PyLong_Check(v)) return false;
    shape[i] = PyLong_AsLongLong(v);
    if (PyErr_Occurred()) {
      PyErr_Clear();  // a size past int64: torch's own error, on its path
      return false;
    }
  }
  return true;
}

// An eval pass of BatchNorm (no statistics, or the batch's [C]) or of InstanceNorm (the
// statistics of each (sample, channel), [N, C]): y = x * scale[c] + shift[c], the running
// statistics folded in as torch folds them.
enum class EvalStats { kNone, kChannels, kInstances };

PyObject* eval(const char* name, EvalStats stats, PyObject* const* args, Py_ssize_t nargs) {
  // (input, weight, bias, running_mean, running_var, eps, threads)
  return guarded(name, nargs, 7, [&]() -> PyObject* {
    const Tensor *w, *b, *rm, *rv;
    Input in;
    if (!tensor_args(args + 1, &w, &b, &rm, &rv) || !rm || !rv ||
        !take(args[0], w, b, in, stats != EvalStats::kInstances) ||
        !in.vectors(in.C, {w, b, rm, rv}))
      return declined();
    const double eps = number(args[5]);
    const long threads = integer(args[6]);
    if (PyErr_Occurred()) return nullptr;
    const Table& kernels = table_of_code(in.dtype);
    const Tensor y = at::empty_like(*in.x);
    if (stats == EvalStats::kNone) {
      {
        Unlocked unlocked(in.work());  // the GIL is back before wrap() below
        kernels.batch_eval(ptr(*in.x), ptr(y), in.N, in.C, in.HW, ptr(w), ptr(b), ptr(rm),
                           ptr(rv), eps, static_cast<int>(threads));
      }
      return wrap(y);
    }
    const bool channels = stats == EvalStats::kChannels;
    const std::vector<int64_t> shape =
        channels ? std::vector<int64_t>{in.C} : std::vector<int64_t>{in.N, in.C};
    const Tensor mean = at::empty(shape, in.options()), var = at::empty(shape, in.options());
    {
      Unlocked unlocked(in.work());
      (channels ? kernels.batch_eval_stats : kernels.instance_eval_stats)(
          ptr(*in.x), ptr(y), in.N, in.C, in.HW, ptr(w), ptr(b), ptr(rm), ptr(rv), eps,
          ptr(mean), ptr(var), static_cast<int>(threads));
    }
    return Py_BuildValue("(NNN)", wrap(y), wrap(mean), wrap(var));
  });
}

// LayerNorm's and RMSNorm's input: rows of the trailing `shape` (a tuple of ints at
// args[k]), with weight and bias of that shape; `lead` the sizes of the statistics.
bool take_rows(PyObject* const* args, int k, const Tensor* w, const Tensor* b, Input& in,
               std::vector<int64_t>& lead, int64_t& rows, int64_t& length) {
  std::vector<int64_t> shape;
  if (!int_tuple(args[k], shape) || shape.empty() || !take(args[0], w, b, in, false, true))
    return false;
  const at::IntArrayRef sizes = in.x->sizes();
  const int64_t dims = static_cast<int64_t>(shape.size()), lead_dims = in.x->dim() - dims;
  if (lead_dims < 0 || sizes.slice(lead_dims) != at::IntArrayRef(shape)) return false;
  for (const Tensor* t : {w, b}) {
    if (t && (t->scalar_type() != in.stats || !plain_cpu(*t) ||
              t->sizes() != sizes.slice(lead_dims) || !t->is_contiguous()))
      return false;
  }
  lead.assign(sizes.begin(), sizes.begin() + lead_dims);
  length = 1;
  for (int64_t s : shape) length *= s;
  rows = in.x->numel() / length;
  return true;
}

}  // namespace

PyObject* batch_norm_train_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  // (input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
  //  reject, output, stats, threads)
  return guarded("batch_norm_train", nargs, 12, [&]() -> PyObject* {
    const Tensor *w, *b, *rm, *rv, *count;
    Input in;
    if (!tensor_args(args + 1, &w, &b, &rm, &rv, &count) || !take(args[0], w, b, in, true) ||
        in.N * in.HW == 1 || !in.vectors(in.C, {w, b, rm, rv}))
      return declined();
    const bool update = rm && rv;
    if (!update) count = nullptr;
    if (count && (count->scalar_type() != c10::ScalarType::Long || !plain_cpu(*count) ||
                  count->numel() != 1))
      return declined();
    if (update && (!writable(rm) || !writable(rv) || !writable(count))) return declined();
    const double momentum = number(args[6]), eps = number(args[7]);
    const int reject = truth(args[8]), output = truth(args[9]), stats = truth(args[10]);
    const long threads = integer(args[11]);
    if (PyErr_Occurred() || reject < 0 || output < 0 || stats < 0) return nullptr;
    const Tensor y = output ? at::empty_like(*in.x) : Tensor();
    const Tensor mean = stats ? at::empty({in.C}, in.options()) : Tensor();
    const Tensor var = stats ? at::empty({in.C}, in.options()) : Tensor();
    bool ok;
    {
      Unlocked unlocked(in.work());
      ok = table_of_code(in.dtype).batch_train(
          ptr(*in.x), ptr(y), in.N, in.C, in.HW, ptr(w), ptr(b), eps, ptr(mean), ptr(var),
          update ? ptr(rm) : nullptr, update ? ptr(rv) : nullptr,
          static_cast<int64_t*>(ptr(count)), momentum, update && reject,
          static_cast<int>(threads));
    }
    if (ok && update) bump({rm, rv, count});
    return Py_BuildValue("(NNNO)", wrap(y), wrap(mean), wrap(var), ok ? Py_True : Py_False);
  });
}

PyObject* batch_norm_eval_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return eval("batch_norm_eval", EvalStats::kNone, args, nargs);
}

PyObject* batch_norm_eval_stats_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return eval("batch_norm_eval_stats", EvalStats::kChannels, args, nargs);
}

PyObject* instance_norm_eval_stats_tensors(PyObject*, PyObject* const* args,
                                           Py_ssize_t nargs) {
  return eval("instance_norm_eval_stats", EvalStats::kInstances, args, nargs);
}

PyObject* instance_norm_train_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  // (input, weight, bias, running_mean, running_var, momentum, eps, reject, stats, threads)
  return guarded("instance_norm_train", nargs, 10, [&]() -> PyObject* {
    const Tensor *w, *b, *rm, *rv;
    Input in;
    if (!tensor_args(args + 1, &w, &b, &rm, &rv) || !take(args[0], w, b, in, false) ||
        in.HW == 1 || !in.vectors(in.C, {w, b, rm, rv}))
      return declined();
    const bool update = rm && rv;
    if (update && (!writable(rm) || !writable(rv))) return declined();
    const double momentum = number(args[5]), eps = number(args[6]);
    const int reject = truth(args[7]), stats = truth(args[8]);
    const long threads = integer(args[9]);
    if (PyErr_Occurred() || reject < 0 || stats < 0) return nullptr;
    const Tensor y = at::empty_like(*in.x);
    const Tensor mean = stats ? at::empty({in.N, in.C}, in.options()) : Tensor();
    const Tensor var = stats ? at::empty({in.N, in.C}, in.options()) : Tensor();
    bool ok;
    {
      Unlocked unlocked(in.work());
      ok = table_of_code(in.dtype).instance_train(
          ptr(*in.x), ptr(y), in.N, in.C, in.HW, ptr(w), ptr(b), eps, ptr(mean), ptr(var),
          update ? ptr(rm) : nullptr, update ? ptr(rv) : nullptr, momentum, update && reject,
          static_cast<int>(threads));
    }
    if (ok && update) bump({rm, rv});
    return Py_BuildValue("(NNNO)", wrap(y), wrap(mean), wrap(var), ok ? Py_True : Py_False);
  });
}

PyObject* group_norm_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  // (input, num_groups, weight, bias, eps, output, stats, threads)
  return guarded("group_norm", nargs, 8, [&]() -> PyObject* {
    const Tensor *w, *b;
    Input in;
    // Not an int (a bool, a float) or past a long: torch raises its error.
    long groups = PyLong_CheckExact(args[1]) ? integer(args[1]) : 0;
    if (PyErr_Occurred()) {
      PyErr_Clear();
      groups = 0;
    }
    if (!tensor_args(args + 2, &w, &b) || !take(args[0], w, b, in, false) || groups <= 0 ||
        in.C % groups != 0 || in.N * (in.C / groups) * in.HW == 1 || !in.vectors(in.C, {w, b}))
      return declined();
    const double eps = number(args[4]);
    const int output = truth(args[5]), stats = truth(args[6]);
    const long threads = integer(args[7]);
    if (PyErr_Occurred() || output < 0 || stats < 0) return nullptr;
    const Tensor y = output ? at::empty_like(*in.x) : Tensor();
    const Tensor mean = stats ? at::empty({in.N, groups}, in.options()) : Tensor();
    const Tensor var = stats ? at::empty({in.N, groups}, in.options()) : Tensor();
    {
      Unlocked unlocked(in.work());
      table_of_code(in.dtype).group_norm(ptr(*in.x), ptr(y), in.N, in.C, in.HW, groups,
                                         ptr(w), ptr(b), eps, ptr(mean), ptr(var),
                                         static_cast<int>(threads));
    }
    return Py_BuildValue("(NNN)", wrap(y), wrap(mean), wrap(var));
  });
}

PyObject* layer_norm_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  // (input, normalized_shape, weight, bias, eps, stats, threads)
  return guarded("layer_norm", nargs, 7, [&]() -> PyObject* {
    const Tensor *w, *b;
    Input in;
    std::vector<int64_t> lead;
    int64_t rows, length;
    if (!tensor_args(args + 2, &w, &b) || !take_rows(args, 1, w, b, in, lead, rows, length))
      return declined();
    const double eps = number(args[4]);
    const int stats = truth(args[5]);
    const long threads = integer(args[6]);
    if (PyErr_Occurred() || stats < 0) return nullptr;
    const Tensor y = at::empty_like(*in.x);
    const Tensor mean = stats ? at::empty(lead, in.options()) : Tensor();
    const Tensor var = stats ? at::empty(lead, in.options()) : Tensor();
    {
      Unlocked unlocked(in.work());
      table_of_code(in.dtype).layer_norm(ptr(*in.x), ptr(y), rows, length, ptr(w), ptr(b), eps,
                                         ptr(mean), ptr(var), static_cast<int>(threads));
    }
    return Py_BuildValue("(NNN)", wrap(y), wrap(mean), wrap(var));
  });
}

PyObject* rms_norm_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  // (input, normalized_shape, weight, eps or None, stats, threads)
  return guarded("rms_norm", nargs, 6, [&]() -> PyObject* {
    const Tensor* w;
    Input in;
    std::vector<int64_t> lead;
    int64_t rows, length;
    if (!tensor_args(args + 2, &w) || !take_rows(args, 1, w, nullptr, in, lead, rows, length))
      return declined();
    // eps=None is torch's default: the machine epsilon of the statistics' dtype.
    const double eps = args[3] != Py_None ? number(args[3])
                       : in.dtype == kF64  ? 0x1p-52
                                           : 0x1p-23;
    const int stats = truth(args[4]);
    const long threads = integer(args[5]);
    if (PyErr_Occurred() || stats < 0) return nullptr;
    const Tensor y = at::empty_like(*in.x);
    const Tensor mean_square = stats ? at::empty(lead, in.options()) : Tensor();
    {
      Unlocked unlocked(in.work());
      table_of_code(in.dtype).rms_norm(ptr(*in.x), ptr(y), rows, length, ptr(w), eps,
                                       ptr(mean_square), static_cast<int>(threads));
    }
    return Py_BuildValue("(NN)", wrap(y), wrap(mean_square));
  });
}

}  // namespace normcore
