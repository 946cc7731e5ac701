// How the module's functions take their arguments: positional Python ints and floats read
// by format letter (pointers arrive as ints, 0 for none, dtype codes checked), and the GIL
// released while a kernel runs.

#pragma once

#include <Python.h>

#include <cstdarg>
#include <cstdint>
#include <cstring>

#include "parallel.h"

namespace normcore {

// Dtype codes, as cpu.py numbers them: float32, float16, bfloat16, float64.
enum Dtype : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

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
inline bool parse(PyObject* const* args, Py_ssize_t nargs, const char* name, const char* fmt, ...) {
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

}  // namespace normcore
