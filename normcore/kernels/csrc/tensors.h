// BatchNorm's entry points that take torch tensors (tensors.cpp, the one unit built against
// torch's headers), declared for the module's method table in norm_kernels.cpp.

#pragma once

#include <Python.h>

namespace normcore {

PyObject* batch_norm_train_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* batch_norm_eval_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* batch_norm_eval_stats_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs);

}  // namespace normcore
