// The normalization entry points, which take torch tensors (tensors.cpp, the one unit
// built against torch's headers), declared for the module's method table in
// norm_kernels.cpp. Each answers NotImplemented to an input it does not take.

#pragma once

#include <Python.h>

namespace normcore {

// batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked,
//                  momentum, eps, reject, output, stats, threads)
//     -> (y or None, mean [C] or None, var [C] or None, not rejected)
// batch.h's batch_train: y only if `output`, the batch statistics only if `stats`. The
// running statistics move, and the batch is counted (num_batches_tracked, if given), only
// when both are given and, with `reject`, only when every statistic is finite.
PyObject* batch_norm_train_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs);

// batch_norm_eval(input, weight, bias, running_mean, running_var, eps, threads) -> y
// y = x * scale[c] + shift[c], the running statistics folded in as torch folds them.
PyObject* batch_norm_eval_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs);

// batch_norm_eval_stats(same arguments) -> (y, mean [C], var [C])
// batch_norm_eval's y, and the batch statistics as batch_norm_train computes them, from
// the same read of x: what normalize() in eval mode returns.
PyObject* batch_norm_eval_stats_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs);

// instance_norm_eval_stats(same arguments) -> (y, mean [N, C], var [N, C])
// batch_norm_eval's y, and the statistics of each (sample, channel) plane.
PyObject* instance_norm_eval_stats_tensors(PyObject*, PyObject* const* args,
                                           Py_ssize_t nargs);

// instance_norm_train(input, weight, bias, running_mean, running_var, momentum, eps,
//                     reject, stats, threads) -> (y, mean or None, var or None, not rejected)
// rows.h's instance_train: y normalized per (sample, channel), statistics [N, C] if
// `stats`, the running statistics moved (both given) unless rejected.
PyObject* instance_norm_train_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs);

// group_norm(input, num_groups, weight, bias, eps, output, stats, threads)
//     -> (y or None, mean [N, G] or None, var [N, G] or None)
PyObject* group_norm_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs);

// layer_norm(input, normalized_shape, weight, bias, eps, stats, threads)
//     -> (y, mean or None, var or None), the statistics of shape input.shape[:-k]
PyObject* layer_norm_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs);

// rms_norm(input, normalized_shape, weight, eps or None, stats, threads)
//     -> (y, mean square or None); eps None: the statistics dtype's machine epsilon
PyObject* rms_norm_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs);

}  // namespace normcore
