// Fused normalization kernels for contiguous float32 CPU tensors, as a Python module.
//
// normcore/kernels/cpu.py calls these with raw data pointers (Python ints, 0 for none) and
// sizes. It has already checked dtype, device, layout and sizes and allocated every
// output; whatever it cannot hand over goes through torch instead.
//
// Memory traffic: BatchNorm train reads x twice (statistics, then normalization) and
// writes y once; BatchNorm eval folds the running statistics into one scale and shift per
// channel (1 read, 1 write); LayerNorm, RMSNorm, GroupNorm and InstanceNorm normalize each
// row or (sample, group) plane right after its statistics, while it is still in cache.
//
// Work is cut into chunks of about kChunk values (parallel.h runs them); inputs smaller
// than two chunks run on the calling thread. Partial statistics are kept per chunk and added in
// a fixed order, so results do not depend on the number of threads. The GIL is released
// while a kernel runs, except for inputs too small to be worth it.

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "reduce.h"

namespace normcore {
namespace {

constexpr int64_t kChunk = 65536;    // values per chunk of work
constexpr int64_t kPlanarMin = 64;   // shorter channel planes are reduced as columns
constexpr int kColumnRows = 128;     // rows summed in float32 per column before a double add
constexpr int64_t kColumnScratch = int64_t{1} << 22;  // Sums of per-chunk column partials

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// f(std::true_type) if an output of this many values is streamed, else f(std::false_type).
template <class F>
void with_stream(int64_t values, const F& f) {
  if (streaming(values * static_cast<int64_t>(sizeof(float))))
    f(std::true_type{});
  else
    f(std::false_type{});
}

// --- per-channel statistics of [N, C, HW] (dim 1 against all others) ---------------------

// Channels of HW >= kPlanarMin values are reduced plane by plane, cut into pieces of at
// most about kChunk values; shorter ones (BatchNorm1d on [N, C], channels_last) as the
// columns of an [N, C*HW] matrix, vectorized along its rows. Every value is shifted by its
// channel's k[c], so partial sums add up directly.
std::vector<Sums> channel_sums(const float* x, int64_t N, int64_t C, int64_t HW,
                               const float* k, int threads) {
  std::vector<Sums> out(C);
  if (HW >= kPlanarMin) {
    const int64_t segs = std::max<int64_t>(1, HW / kChunk), seg = ceil_div(HW, segs);
    const int64_t pieces = N * C * segs, per_chunk = std::max<int64_t>(1, kChunk / seg);
    std::vector<Sums> part(pieces);
    parallel_chunks(ceil_div(pieces, per_chunk), threads, [&](int64_t chunk) {
      const int64_t end = std::min(pieces, (chunk + 1) * per_chunk);
      for (int64_t q = chunk * per_chunk; q < end; ++q) {
        const int64_t plane = q / segs, lo = q % segs * seg, len = std::min(seg, HW - lo);
        add_sums<true>(x + plane * HW + lo, len, k[plane % C], part[q]);
      }
    });
    for (int64_t q = 0; q < pieces; ++q) out[q / segs % C] += part[q];
    return out;
  }
  const int64_t width = C * HW;
  std::vector<float> kc(width);
  spread(k, C, HW, kc.data());
  const int64_t chunks = std::max<int64_t>(
      1, std::min(N * width / kChunk, kColumnScratch / width));
  const int64_t rows = ceil_div(N, chunks);
  std::vector<Sums> part(chunks * width);
  parallel_chunks(ceil_div(N, rows), threads, [&](int64_t chunk) {
    std::vector<float> a1(width), a2(width);
    Sums* acc = part.data() + chunk * width;
    const int64_t end = std::min(N, (chunk + 1) * rows);
    for (int64_t row = chunk * rows; row < end;) {
      const int64_t stop = std::min(end, row + kColumnRows);
      std::fill(a1.begin(), a1.end(), 0.0f);
      std::fill(a2.begin(), a2.end(), 0.0f);
      for (; row < stop; ++row) {
        const float* r = x + row * width;
        int64_t j = 0;
        for (; j + kLanes <= width; j += kLanes) {
          const vec d = load(r + j) - load(kc.data() + j);
          store(a1.data() + j, load(a1.data() + j) + d);
          store(a2.data() + j, load(a2.data() + j) + d * d);
        }
        for (; j < width; ++j) {
          const float d = r[j] - kc[j];
          a1[j] += d;
          a2[j] += d * d;
        }
      }
      for (int64_t j = 0; j < width; ++j) acc[j] += Sums{a1[j], a2[j]};
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) out[c] += part[(chunk * C + c) * HW + i];
  return out;
}

// y = (x - k[c]) * a[c] + b[c] for every value of channel c of [N, C, HW].
void channel_affine(const float* x, float* y, int64_t N, int64_t C, int64_t HW,
                    const float* k, const float* a, const float* b, int threads) {
  const int64_t total = N * C * HW;
  if (HW >= kPlanarMin) {
    const int64_t chunks = std::max<int64_t>(1, total / kChunk);
    with_stream(total, [&](auto stream) {
      const int64_t base = total / chunks, extra = total % chunks;
      parallel_chunks(chunks, threads, [&](int64_t chunk) {
        int64_t lo = chunk * base + std::min(chunk, extra);
        const int64_t hi = lo + base + (chunk < extra);
        while (lo < hi) {  // a chunk may start or end inside a plane
          const int64_t c = lo / HW % C, len = std::min(HW - lo % HW, hi - lo);
          affine<stream>(x + lo, y + lo, len, k[c], a[c], b[c]);
          lo += len;
        }
        if (stream) stream_fence();
      });
    });
    return;
  }
  const int64_t width = C * HW;
  std::vector<float> kc(width), ac(width), bc(width);
  spread(k, C, HW, kc.data());
  spread(a, C, HW, ac.data());
  spread(b, C, HW, bc.data());
  const int64_t rows = std::max<int64_t>(1, kChunk / width);
  with_stream(total, [&](auto stream) {
    parallel_chunks(ceil_div(N, rows), threads, [&](int64_t chunk) {
      const int64_t end = std::min(N, (chunk + 1) * rows);
      for (int64_t row = chunk * rows; row < end; ++row)
        affine_row<stream>(x + row * width, y + row * width, width, kc.data(), ac.data(),
                           bc.data());
      if (stream) stream_fence();
    });
  });
}

// --- row statistics: LayerNorm, RMSNorm, GroupNorm, InstanceNorm --------------------------

// R rows of L contiguous values, each normalized with its own statistics.
struct Rows {
  const float* x;
  float* y;  // null: statistics only
  int64_t R, L;
  double eps;
  float* mean_out;  // [R] or null
  float* var_out;   // [R] or null (RMSNorm: the mean square)
};

// Statistics of every row, then apply(r, i0, i1, k, moments) for its values [i0, i1).
// kCenter: mean and variance around k = the row's first value; otherwise the mean square
// (as var) around 0.
template <bool kCenter, bool kStream, class Apply>
void run_rows(const Rows& p, const Apply& apply, int threads) {
  auto shift = [&](int64_t r) { return kCenter ? p.x[r * p.L] : 0.0f; };
  auto finish = [&](int64_t r, const Sums& s) {
    const Moments m = kCenter ? moments(s, p.L, shift(r)) : Moments{0.0, 0.0, s.s2 / p.L};
    if (p.mean_out) p.mean_out[r] = static_cast<float>(m.mean);
    if (p.var_out) p.var_out[r] = static_cast<float>(m.var);
    return m;
  };
  const int64_t segs = std::max<int64_t>(1, p.L / kChunk);
  if (segs == 1 || p.R >= 2 * threads) {
    // Whole rows per chunk: the second pass reads each row back from cache.
    const int64_t rows = std::max<int64_t>(1, kChunk / p.L);
    parallel_chunks(ceil_div(p.R, rows), threads, [&](int64_t chunk) {
      const int64_t end = std::min(p.R, (chunk + 1) * rows);
      for (int64_t r = chunk * rows; r < end; ++r) {
        Sums s;
        const float k = shift(r);
        add_sums<kCenter>(p.x + r * p.L, p.L, k, s);
        const Moments m = finish(r, s);
        if (p.y) apply(r, 0, p.L, k, m);
      }
      if (kStream) stream_fence();
    });
    return;
  }
  // A few long rows: statistics of all their pieces, then the output of all their pieces.
  const int64_t seg = ceil_div(p.L, segs), pieces = p.R * segs;
  std::vector<Sums> part(pieces);
  parallel_chunks(pieces, threads, [&](int64_t q) {
    const int64_t r = q / segs, lo = q % segs * seg;
    add_sums<kCenter>(p.x + r * p.L + lo, std::min(seg, p.L - lo), shift(r), part[q]);
  });
  std::vector<Moments> ms(p.R);
  for (int64_t r = 0; r < p.R; ++r) {
    Sums s;
    for (int64_t i = 0; i < segs; ++i) s += part[r * segs + i];
    ms[r] = finish(r, s);
  }
  if (!p.y) return;
  parallel_chunks(pieces, threads, [&](int64_t q) {
    const int64_t r = q / segs, lo = q % segs * seg;
    apply(r, lo, std::min(lo + seg, p.L), shift(r), ms[r]);
    if (kStream) stream_fence();
  });
}

void layer_rows(const Rows& p, const float* w, const float* b, int threads) {
  with_stream(p.y ? p.R * p.L : 0, [&](auto stream) {
    run_rows<true, stream>(p, [&](int64_t r, int64_t i0, int64_t i1, float k, const Moments& m) {
      const double rstd = rstd_of(m.var, p.eps);
      const float s = static_cast<float>(rstd), o = static_cast<float>(-m.dm * rstd);
      const float* x = p.x + r * p.L;
      float* y = p.y + r * p.L;
      if (w && b)
        scale_row<stream, true, true>(x, y, i0, i1, k, s, o, w, b);
      else if (w)
        scale_row<stream, true, false>(x, y, i0, i1, k, s, o, w, b);
      else if (b)
        scale_row<stream, false, true>(x, y, i0, i1, k, s, o, w, b);
      else
        scale_row<stream, false, false>(x, y, i0, i1, k, s, o, w, b);
    }, threads);
  });
}

void rms_rows(const Rows& p, const float* w, int threads) {
  with_stream(p.y ? p.R * p.L : 0, [&](auto stream) {
    run_rows<false, stream>(p, [&](int64_t r, int64_t i0, int64_t i1, float, const Moments& m) {
      const float s = static_cast<float>(rstd_of(m.var, p.eps));
      const float* x = p.x + r * p.L;
      float* y = p.y + r * p.L;
      if (w)
        scale_row<stream, true, false>(x, y, i0, i1, 0.0f, s, 0.0f, w, nullptr);
      else
        scale_row<stream, false, false>(x, y, i0, i1, 0.0f, s, 0.0f, nullptr, nullptr);
    }, threads);
  });
}

// A row is one (sample, group) plane of Cg channels of HW values, weight and bias per
// channel: GroupNorm, and InstanceNorm as Cg = 1.
void group_rows(const Rows& p, const float* w, const float* b, int64_t G, int64_t Cg,
                int64_t HW, int threads) {
  with_stream(p.y ? p.R * p.L : 0, [&](auto stream) {
    run_rows<true, stream>(p, [&](int64_t r, int64_t i0, int64_t i1, float k, const Moments& m) {
      // dm and a are a few units at most: float loses nothing here.
      const float rstd = static_cast<float>(rstd_of(m.var, p.eps));
      const float dm = static_cast<float>(m.dm);
      const int64_t c0 = r % G * Cg;
      while (i0 < i1) {
        const int64_t j = i0 / HW, len = std::min(HW - i0 % HW, i1 - i0);
        const float a = w ? rstd * w[c0 + j] : rstd;
        const float o = (b ? b[c0 + j] : 0.0f) - dm * a;
        affine<stream>(p.x + r * p.L + i0, p.y + r * p.L + i0, len, k, a, o);
        i0 += len;
      }
    }, threads);
  });
}

// --- Python bindings -----------------------------------------------------------------------

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
    method<layer_norm>("layer_norm"),
    method<rms_norm>("rms_norm"),
    method<group_norm>("group_norm"),
    method<instance_norm_train>("instance_norm_train"),
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
