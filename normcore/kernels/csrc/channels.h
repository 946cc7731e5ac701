// Per-channel statistics and scale-and-shift of [N, C, HW]: BatchNorm (and InstanceNorm's
// eval mode). Channels of at least kPlanarMin values per sample are handled plane by plane;
// shorter ones (BatchNorm1d on [N, C], channels_last inputs) as the columns of an
// [N, C*HW] matrix, vectorized along its rows.

#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel.h"
#include "reduce.h"

namespace normcore {

constexpr int64_t kPlanarMin = 64;  // shorter channel planes are reduced as columns
constexpr int kColumnRows = 128;    // rows summed in acc_t<T> per column before a double add
constexpr int64_t kColumnScratch = int64_t{1} << 22;  // Sums of per-chunk column partials

// The N * C planes of HW values cut into pieces of at most about kChunk values (a long
// plane into several), handed out to the threads a chunk of about kChunk values at a time.
struct PlanePieces {
  int64_t HW, segs, seg, count;  // pieces per plane, values per piece, pieces in all

  PlanePieces(int64_t planes, int64_t hw)
      : HW(hw), segs(std::max<int64_t>(1, hw / kChunk)), seg(ceil_div(hw, segs)),
        count(planes * segs) {}

  int64_t plane(int64_t piece) const { return piece / segs; }

  // body(piece, plane, offset of its first value, its length) for every piece.
  template <class Body>
  void each(int threads, const Body& body) const {
    const int64_t per_chunk = std::max<int64_t>(1, kChunk / seg);
    parallel_chunks(ceil_div(count, per_chunk), threads, [&](int64_t chunk) {
      const int64_t end = std::min(count, (chunk + 1) * per_chunk);
      for (int64_t q = chunk * per_chunk; q < end; ++q) {
        const int64_t p = q / segs, lo = q % segs * seg;
        body(q, p, p * HW + lo, std::min(seg, HW - lo));
      }
    });
  }
};

// acc[j] += the sums of column j of rows [row, stop) of a matrix `width` values wide, each
// value shifted by kc[j]: in acc_t<T> down the rows, in order, then one double add per
// column (s1, s2: scratch of `width` values). With kOut, the same read also writes
// y = x * ac[j] + bc[j]. The rows go kColumnTile at a time, and the columns of each tile
// kColumnVectors vectors at a time, their sums in registers while the tile's rows go by.
// Summed in memory row after row instead, each add waits for the store of the row before
// (store forwarding, several cycles): a channels_last or [N, C] BatchNorm train step took
// up to a quarter longer, and an eval pass with statistics up to two thirds longer
// (measured on a Sapphire Rapids VM). A tile's rows are short runs a row apart, which the
// prefetchers barely follow. Half-precision inputs, the most rows per byte, ask for each
// line of the next tile as they load the same line of this one: their statistics pass
// takes a quarter less time, a train step 2-13% less. float32 gained nothing that way and
// float64 lost up to 3%.
constexpr int kColumnVectors = 4;
constexpr int64_t kColumnTile = 16;  // rows: a tile of a wide matrix stays in L1

template <bool kOut, class T, class A = acc_t<T>>
void column_block_sums(const T* x, T* y, int64_t width, int64_t row, int64_t stop,
                       const A* kc, const A* ac, const A* bc, A* s1, A* s2, Sums* acc) {
  constexpr int L = kLanesOf<A>, V = kColumnVectors;
  std::fill(s1, s1 + width, A{0});
  std::fill(s2, s2 + width, A{0});
  for (int64_t r0 = row; r0 < stop; r0 += kColumnTile) {
    const int64_t r1 = std::min(stop, r0 + kColumnTile);
    int64_t j = 0;
    for (; j + V * L <= width; j += V * L) {
      vec_t<A> k[V], m[V], f[V], a[V], q[V];
      for (int v = 0; v < V; ++v) {
        k[v] = load(kc + j + v * L);
        if (kOut) {
          m[v] = load(ac + j + v * L);
          f[v] = load(bc + j + v * L);
        }
        a[v] = load(s1 + j + v * L);
        q[v] = load(s2 + j + v * L);
      }
      for (int64_t r = r0; r < r1; ++r) {
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) {
          const int64_t at = r * width + j + v * L;
          if (sizeof(T) == 2 && (v * L * sizeof(T)) % 64 == 0)  // see above
            __builtin_prefetch(x + at + kColumnTile * width, 0, 3);
          const vec_t<A> u = load(x + at);
          if (kOut) store(y + at, u * m[v] + f[v]);
          const vec_t<A> d = u - k[v];
          a[v] += d;
          q[v] += d * d;
        }
      }
      for (int v = 0; v < V; ++v) {
        store(s1 + j + v * L, a[v]);
        store(s2 + j + v * L, q[v]);
      }
    }
    for (; j + L <= width; j += L) {
      const vec_t<A> k = load(kc + j);
      vec_t<A> a = load(s1 + j), q = load(s2 + j);
      for (int64_t r = r0; r < r1; ++r) {
        const vec_t<A> u = load(x + r * width + j);
        if (kOut) store(y + r * width + j, u * load(ac + j) + load(bc + j));
        const vec_t<A> d = u - k;
        a += d;
        q += d * d;
      }
      store(s1 + j, a);
      store(s2 + j, q);
    }
    for (; j < width; ++j)
      for (int64_t r = r0; r < r1; ++r) {
        const A u = widen(x[r * width + j]);
        if (kOut) y[r * width + j] = narrow<T>(u * ac[j] + bc[j]);
        const A d = u - kc[j];
        s1[j] += d;
        s2[j] += d * d;
      }
  }
  for (int64_t j = 0; j < width; ++j) acc[j] += Sums{s1[j], s2[j]};
}

// How many rows of an [N, width] matrix to read as one: R rows of `width` values laid end
// to end make a row of whole vectors, at least kColumnVectors of them, so no column falls
// to the scalar loops of column_block_sums and affine_row. One value at a time, a
// BatchNorm train step on 8 channels (BatchNorm1d on [N, 8], channels_last BatchNorm2d)
// took 5 times a copy's time in float32 and 15 times in float16. 1 for rows that are
// whole vectors already, rows too wide to fold (their tail is a small part of them), or
// fewer than R rows.
constexpr int64_t kFoldMax = 4096;  // values in a folded row

template <class A>
int64_t fold_rows(int64_t width, int64_t N) {
  constexpr int64_t L = kLanesOf<A>;
  if (width % L == 0 && width >= kColumnVectors * L) return 1;
  int64_t R = L / std::gcd(width, L);
  while (R * width < kColumnVectors * L) R *= 2;
  return R <= N && R * width <= kFoldMax ? R : 1;
}

// The sums of each channel of [N, C, HW] reduced as the columns of an [N, C*HW] matrix
// (channel_sums's short channels), in chunks of rows on the threads; with kOut, also
// y = x * a[c] + b[c] from the same read (a and b are not read without it). Narrow rows
// are folded (fold_rows): the last N % R rows go on their own, at their width.
template <bool kOut, class T, class A = acc_t<T>>
std::vector<Sums> column_sums(const T* x, T* y, int64_t N, int64_t C, int64_t HW, const A* k,
                              const A* a, const A* b, int threads) {
  const int64_t width = C * HW, R = fold_rows<A>(width, N);
  const int64_t wide = R * width, M = N / R;  // M rows of `wide` values, then the rest
  std::vector<A> kc(wide), ac(kOut ? wide : 0), bc(kOut ? wide : 0);
  spread(k, C, HW, kc.data(), wide);
  if (kOut) {
    spread(a, C, HW, ac.data(), wide);
    spread(b, C, HW, bc.data(), wide);
  }
  const int64_t chunks = std::max<int64_t>(
      1, std::min(M * wide / kChunk, kColumnScratch / wide));
  const int64_t rows = ceil_div(M, chunks);
  std::vector<Sums> part(chunks * wide + (N % R ? width : 0));
  parallel_chunks(ceil_div(M, rows), threads, [&](int64_t chunk) {
    std::vector<A> s1(wide), s2(wide);
    Sums* acc = part.data() + chunk * wide;
    const int64_t end = std::min(M, (chunk + 1) * rows);
    for (int64_t row = chunk * rows; row < end; row += kColumnRows)
      column_block_sums<kOut>(x, y, wide, row, std::min(end, row + kColumnRows), kc.data(),
                              ac.data(), bc.data(), s1.data(), s2.data(), acc);
  });
  if (N % R) {  // fewer than R rows: the first `width` of the spread values are theirs
    std::vector<A> s1(width), s2(width);
    column_block_sums<kOut>(x, y, width, M * R, N, kc.data(), ac.data(), bc.data(),
                            s1.data(), s2.data(), part.data() + chunks * wide);
  }
  std::vector<Sums> out(C);  // part: rows of `width` partial sums, each laid out as [C, HW]
  for (int64_t at = 0; at < static_cast<int64_t>(part.size()); at += width)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) out[c] += part[at + c * HW + i];
  return out;
}

// Channels of HW >= kPlanarMin values are reduced plane by plane, cut into pieces of at
// most about kChunk values; shorter ones (BatchNorm1d on [N, C], channels_last) as the
// columns of an [N, C*HW] matrix, vectorized along its rows. Every value is shifted by its
// channel's k[c], so partial sums add up directly.
template <class T, class A = acc_t<T>>
std::vector<Sums> channel_sums(const T* x, int64_t N, int64_t C, int64_t HW, const A* k,
                               int threads) {
  if (HW >= kPlanarMin) {
    std::vector<Sums> out(C);
    const PlanePieces pieces(N * C, HW);
    std::vector<Sums> part(pieces.count);
    pieces.each(threads, [&](int64_t q, int64_t plane, int64_t at, int64_t len) {
      add_sums<true>(x + at, len, k[plane % C], part[q]);
    });
    for (int64_t q = 0; q < pieces.count; ++q) out[pieces.plane(q) % C] += part[q];
    return out;
  }
  T* const no_output = nullptr;
  const A* const none = nullptr;
  return column_sums<false>(x, no_output, N, C, HW, k, none, none, threads);
}

// The sums of channel c of planar [N, C, HW] (HW >= kPlanarMin) around k, as channel_sums
// adds them: the same pieces, in the same order, so bit for bit the same.
template <class T, class A = acc_t<T>>
Sums planar_channel_sums(const T* x, int64_t N, int64_t C, int64_t HW, int64_t c, A k) {
  const PlanePieces pieces(N * C, HW);
  Sums total;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t at = (n * C + c) * HW;
    for (int64_t lo = 0; lo < HW; lo += pieces.seg) {
      Sums part;
      add_sums<true>(x + at + lo, std::min(pieces.seg, HW - lo), k, part);
      total += part;
    }
  }
  return total;
}

// Moves k[c] to the mean of each channel whose sums (n values around k[c]) are off center;
// the channels it moved.
template <class A>
std::vector<int64_t> recenter(const std::vector<Sums>& sums, int64_t n, A* k) {
  std::vector<int64_t> moved;
  for (size_t c = 0; c < sums.size(); ++c) {
    const Moments m = moments(sums[c], n, k[c]);
    if (off_center(m)) {
      k[c] = static_cast<A>(m.mean);
      moved.push_back(static_cast<int64_t>(c));
    }
  }
  return moved;
}

// sums[c] summed again around k[c] for the `moved` channels (recenter's): planar channels
// one by one, column layouts in a whole second pass (their channels interleave in every
// row). Either way each channel's sums are channel_sums's, bit for bit.
template <class T, class A = acc_t<T>>
void resum(const T* x, int64_t N, int64_t C, int64_t HW, const A* k,
           const std::vector<int64_t>& moved, std::vector<Sums>& sums, int threads) {
  if (moved.empty()) return;
  if (HW < kPlanarMin) {
    sums = channel_sums(x, N, C, HW, k, threads);
    return;
  }
  parallel_chunks(static_cast<int64_t>(moved.size()), threads, [&](int64_t i) {
    const int64_t c = moved[i];
    sums[c] = planar_channel_sums(x, N, C, HW, c, k[c]);
  });
}

// channel_sums, with the channels whose first value was off center (rare) summed again
// around their means, k[c] set to those.
template <class T, class A = acc_t<T>>
std::vector<Sums> recentered_sums(const T* x, int64_t N, int64_t C, int64_t HW, A* k,
                                  int threads) {
  std::vector<Sums> sums = channel_sums(x, N, C, HW, k, threads);
  resum(x, N, C, HW, k, recenter(sums, N * HW, k), sums, threads);
  return sums;
}

// add_sums<true> over n contiguous values that also writes y = x * a + b: one read of x
// for a statistics pass and an eval-mode normalization. The sums are add_sums's, bit for
// bit (same blocks, same lanes, same order); y is stored plainly, never streamed.
template <class T, class A = acc_t<T>>
void affine_add_sums(const T* x, T* y, int64_t n, A k, A a, A b, Sums& s) {
  constexpr int L = kLanesOf<A>;
  const vec_t<A> kv = splat(k), av = splat(a), bv = splat(b);
  for (int64_t o = 0; o < n; o += kBlock) {
    const int64_t e = std::min(n, o + kBlock);
    vec_t<A> a1 = {}, a2 = {}, c1 = {}, c2 = {};
    int64_t i = o;
    for (; i + 2 * L <= e; i += 2 * L) {
      __builtin_prefetch(reinterpret_cast<const char*>(x + i) + kPrefetch, 0, 3);
      vec_t<A> u, v;
      load_pair(x + i, u, v);  // add_sums's lanes, for the same sums
      store_pair(y + i, u * av + bv, v * av + bv);
      const vec_t<A> d = u - kv, f = v - kv;
      a1 += d;
      c1 += f;
      a2 += d * d;
      c2 += f * f;
    }
    A t1 = 0, t2 = 0;
    for (; i < e; ++i) {
      const A u = widen(x[i]);
      y[i] = narrow<T>(u * a + b);
      const A d = u - k;
      t1 += d;
      t2 += d * d;
    }
    s.s1 += static_cast<double>(hsum<A>(a1 + c1)) + t1;
    s.s2 += static_cast<double>(hsum<A>(a2 + c2)) + t2;
  }
}

// channel_sums of [N, C, HW] (same pieces, same sums) that also writes
// y = x * a[c] + b[c]: BatchNorm's eval mode with the batch statistics, in one read of x.
// For outputs that are not streamed (see with_stream); larger ones take two passes.
template <class T, class A = acc_t<T>>
std::vector<Sums> channel_affine_sums(const T* x, T* y, int64_t N, int64_t C, int64_t HW,
                                      const A* k, const A* a, const A* b, int threads) {
  if (HW >= kPlanarMin) {
    std::vector<Sums> out(C);
    const PlanePieces pieces(N * C, HW);
    std::vector<Sums> part(pieces.count);
    pieces.each(threads, [&](int64_t q, int64_t plane, int64_t at, int64_t len) {
      const int64_t c = plane % C;
      affine_add_sums(x + at, y + at, len, k[c], a[c], b[c], part[q]);
    });
    for (int64_t q = 0; q < pieces.count; ++q) out[pieces.plane(q) % C] += part[q];
    return out;
  }
  return column_sums<true>(x, y, N, C, HW, k, a, b, threads);
}

// Whether channel_sums_affine suits [N, C, HW] of `bytes` bytes per value on `threads`
// threads: an input bigger than half a core's L2 cache (a smaller one is still there for
// the second of two whole passes), of planar channels that fit in that half (the other
// half takes their outputs), and enough of them that handing out whole channels keeps the
// threads evenly busy. A channel of planes shorter than a page is read as that many short
// streams, which the prefetchers barely ramp up on; measured on a Sapphire Rapids VM, those
// gain only while the channel is small (BatchNorm1d on [64, 64, 1024] float16 about 10%
// faster, on [256, 64, 1024] 20% slower).
inline bool channels_fit_cache(int64_t N, int64_t C, int64_t HW, int64_t bytes, int threads) {
  const int64_t l2 = l2_cache_bytes();
  const int64_t channel = N * HW * bytes;
  const bool long_planes = HW * bytes >= 4096;
  return HW >= kPlanarMin && C >= 4 * int64_t{threads} && channel * C > l2 / 2 &&
         channel <= (long_planes ? l2 / 2 : l2 / 16);
}

// channel_sums, then y = (x - k[c]) * a + b with (a, b) = finish(c, sums of c), one whole
// channel at a time: the normalizing read finds the channel where the statistics read left
// it, in the core's cache, so a train step moves about the bytes of a copy instead of
// reading x twice from memory. A channel whose k[c] was off center is summed again around
// its mean first, k[c] set to it, as recentered_sums does. The sums are those of
// channel_sums, bit for bit (same pieces, added in the same order). Only where
// channels_fit_cache holds.
template <class T, class A, class Finish>
std::vector<Sums> channel_sums_affine(const T* x, T* y, int64_t N, int64_t C, int64_t HW,
                                      A* k, const Finish& finish, int threads) {
  std::vector<Sums> out(C);
  const int64_t per_chunk = std::max<int64_t>(1, kChunk / (N * HW));  // channels
  auto sums_of = [&](int64_t c) { return planar_channel_sums(x, N, C, HW, c, k[c]); };
  with_stream<T>(N * C * HW, [&](auto stream) {
    parallel_chunks(ceil_div(C, per_chunk), threads, [&](int64_t chunk) {
      for (int64_t c = chunk * per_chunk; c < std::min(C, (chunk + 1) * per_chunk); ++c) {
        Sums total = sums_of(c);
        const Moments m = moments(total, N * HW, k[c]);
        if (off_center(m)) {
          k[c] = static_cast<A>(m.mean);
          total = sums_of(c);
        }
        out[c] = total;
        const std::pair<A, A> ab = finish(c, total);
        for (int64_t n = N - 1; n >= 0; --n) {  // the planes read last are the warmest
          const int64_t at = (n * C + c) * HW;
          affine<stream>(x + at, y + at, HW, k[c], ab.first, ab.second);
        }
      }
      if (stream) stream_fence();
    });
  });
  return out;
}

// y = (x - k[c]) * a[c] + b[c] for every value of channel c of [N, C, HW].
template <class T, class A = acc_t<T>>
void channel_affine(const T* x, T* y, int64_t N, int64_t C, int64_t HW, const A* k,
                    const A* a, const A* b, int threads) {
  const int64_t total = N * C * HW;
  if (HW >= kPlanarMin) {
    const int64_t chunks = std::max<int64_t>(1, total / kChunk);
    with_stream<T>(total, [&](auto stream) {
      const int64_t base = total / chunks, extra = total % chunks;
      // Backward: the statistics pass before this one left its last values in cache.
      parallel_chunks<true>(chunks, threads, [&](int64_t chunk) {
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
  // As rows of the [N, C*HW] matrix, narrow ones folded as column_sums folds them.
  const int64_t width = C * HW, R = fold_rows<A>(width, N);
  const int64_t wide = R * width, M = N / R;
  std::vector<A> kc(wide), ac(wide), bc(wide);
  spread(k, C, HW, kc.data(), wide);
  spread(a, C, HW, ac.data(), wide);
  spread(b, C, HW, bc.data(), wide);
  if constexpr (!kShiftOut<T>)
    for (int64_t j = 0; j < wide; ++j) bc[j] -= kc[j] * ac[j];  // see affine_row
  const int64_t rows = std::max<int64_t>(1, kChunk / wide);
  with_stream<T>(total, [&](auto stream) {
    parallel_chunks<true>(ceil_div(M, rows), threads, [&](int64_t chunk) {
      const int64_t end = std::min(M, (chunk + 1) * rows);
      for (int64_t row = chunk * rows; row < end; ++row)
        affine_row<stream>(x + row * wide, y + row * wide, wide, kc.data(), ac.data(),
                           bc.data());
      if (stream) stream_fence();
    });
    for (int64_t row = M * R; row < N; ++row)  // fewer than R rows left, at their width
      affine_row<stream>(x + row * width, y + row * width, width, kc.data(), ac.data(),
                         bc.data());
    if (stream) stream_fence();
  });
}

}  // namespace normcore
