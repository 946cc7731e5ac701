// Drift of one batch's per-channel Gaussians from a reference, for service/core/drift.py
// (which has the formula, the same in torch): with v1 = var * unbias + eps and
// v2 = ref_var + eps,
//     J_c = ((v1 - v2)^2 + (m1 - m2)^2 (v1 + v2)) / (2 v1 v2),
// the symmetric Kullback-Leibler divergence, in double; the score is the mean of J_c.
// A few hundred flops for C channels: one call instead of a dozen tensor operations.

#pragma once

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace normcore {

struct DriftResult {
  double score = 0;
  std::vector<std::pair<int64_t, double>> top;  // (channel, J_c), largest J_c first
};

// Scores a batch whose statistics are `rows` x C (per instance: averaged over the rows, as
// InstanceNorm's running statistics average them; one row for per-channel statistics),
// var biased, and keeps its `top` channels of largest J_c (the lower index first on a tie).
// If the score is finite and weight > 0, the reference then moves towards the batch,
// ref += weight * (batch - ref), with the batch's unbiased variance (weight 1: a copy).
// T (the statistics) and R (the reference) are float or double.
template <typename T, typename R>
DriftResult gaussian_drift(const T* mean, const T* var, int64_t rows, int64_t C,
                           double unbias, R* ref_mean, R* ref_var, double eps,
                           double weight, int64_t top) {
  DriftResult out;
  top = std::min(top, C);
  out.top.reserve(top + 1);
  std::vector<double> m1(C), u1(C);
  double sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    double m = 0, v = 0;
    for (int64_t r = 0; r < rows; ++r) {
      m += mean[r * C + c];
      v += var[r * C + c];
    }
    m1[c] = m / rows;
    u1[c] = v / rows * unbias;
    const double v1 = u1[c] + eps, v2 = ref_var[c] + eps;
    const double spread = v1 - v2, shift = m1[c] - ref_mean[c];
    const double j = (spread * spread + shift * shift * (v1 + v2)) / (2 * v1 * v2);
    sum += j;
    if (top > 0 && (static_cast<int64_t>(out.top.size()) < top || j > out.top.back().second)) {
      auto at = std::upper_bound(out.top.begin(), out.top.end(), j,
                                 [](double value, const auto& e) { return value > e.second; });
      out.top.insert(at, {c, j});
      if (static_cast<int64_t>(out.top.size()) > top) out.top.pop_back();
    }
  }
  out.score = C > 0 ? sum / C : NAN;
  if (std::isfinite(out.score) && weight > 0) {
    for (int64_t c = 0; c < C; ++c) {
      ref_mean[c] = static_cast<R>(ref_mean[c] + weight * (m1[c] - ref_mean[c]));
      ref_var[c] = static_cast<R>(ref_var[c] + weight * (u1[c] - ref_var[c]));
    }
  }
  return out;
}

// (score, ((channel, J_c), ...)) as a Python tuple, built without format strings: this
// runs on every eval request.
inline PyObject* drift_tuple(const DriftResult& result) {
  const Py_ssize_t n = static_cast<Py_ssize_t>(result.top.size());
  PyObject* out = PyTuple_New(2);
  PyObject* channels = PyTuple_New(n);
  PyObject* score = PyFloat_FromDouble(result.score);
  if (!out || !channels || !score) {
    Py_XDECREF(out);
    Py_XDECREF(channels);
    Py_XDECREF(score);
    return nullptr;
  }
  PyTuple_SET_ITEM(out, 0, score);
  PyTuple_SET_ITEM(out, 1, channels);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyTuple_New(2);
    PyObject* c = PyLong_FromLongLong(result.top[i].first);
    PyObject* j = PyFloat_FromDouble(result.top[i].second);
    if (!item || !c || !j) {
      Py_XDECREF(item);
      Py_XDECREF(c);
      Py_XDECREF(j);
      Py_DECREF(out);  // and channels, and the items already in it
      return nullptr;
    }
    PyTuple_SET_ITEM(item, 0, c);
    PyTuple_SET_ITEM(item, 1, j);
    PyTuple_SET_ITEM(channels, i, item);
  }
  return out;
}

}  // namespace normcore
