// Weight gradient of a 2-D NHWC convolution for XLA:CPU, as a typed XLA FFI handler.
//
//   dW[kh, kw, ci, co] = sum_{b, oh, ow} x[b, oh*sh + kh - ph, ow*sw + kw - pw, ci] * dy[b, oh, ow, co]
//
// (terms whose x index falls outside the image are zero padding and skipped). For every tap
// (kh, kw) this is a GEMM  dW_tap[ci, co] += sum_pixels x[p, ci] * dy[p, co]  whose reduction
// runs over all output pixels, which is why XLA:CPU (a convolution with an image-sized
// window) and oneDNN's forward kernel handle it badly. Here:
//
// * rows of output pixels (b, oh) are grouped into tiles small enough that the x and dy rows
//   of a tile stay in L1/L2 while every (tap, ci block, co block) sweeps over them;
// * a 6 ci x 16 co accumulator block (12 ymm registers) stays in registers for the whole
//   tile: per pixel, 2 vector loads of dy, 6 broadcasts of x and 12 FMAs;
// * tiles are grouped into a fixed number of chunks (a function of the shape only) with one
//   private accumulator each, which XLA's thread pool works through; the chunks are summed
//   in a fixed order, so results do not depend on thread count or scheduling.
//
// The AVX2+FMA code is compiled for that ISA by function attributes and chosen at run time
// with __builtin_cpu_supports, so one build runs on any x86-64 (and the portable path on
// anything else): the library is built on the user's machine but may live in a shared cache.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#define HQJAX_X86 1
#include <immintrin.h>
#else
#define HQJAX_X86 0
#endif

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t B, H, W, CI;  // x: [B, H, W, CI]
  int64_t OH, OW, CO;   // dy: [B, OH, OW, CO]
  int64_t KH, KW;       // dW: [KH, KW, CI, CO]
  int64_t SH, SW;       // strides
  int64_t PH, PW;       // low padding (high padding is implied by OH, OW)
};

// One output row of a tile for one tap: where its x and dy pixels start (at the first
// output column whose input column is inside the image).
struct Row {
  const float* x;
  const float* dy;
};

constexpr int MR = 6;   // ci per accumulator block (broadcast operand)
constexpr int NR = 16;  // co per accumulator block (two ymm vectors)

// Output columns ow in [lo, hi) whose input column ow*s + k - p lies in [0, size).
inline void valid_range(int64_t size, int64_t out, int64_t s, int64_t k, int64_t p, int64_t* lo, int64_t* hi) {
  int64_t first = p - k;  // smallest ow*s allowed
  int64_t a = first <= 0 ? 0 : (first + s - 1) / s;
  int64_t last = size - 1 + p - k;  // largest ow*s allowed
  int64_t b = last < 0 ? 0 : last / s + 1;
  *lo = std::max<int64_t>(0, a);
  *hi = std::min<int64_t>(out, b);
  if (*hi < *lo) *hi = *lo;
}

// ---------------------------------------------------------------------------------------
// Portable micro-kernel: plain loops the compiler may vectorize for the baseline ISA.
void block_generic(const Row* rows, int64_t nrows, int64_t n, int64_t xstep, int64_t dystep, int mr, int nc,
                   float* out, int64_t CO) {
  float acc[MR][NR];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t r = 0; r < nrows; ++r) {
    const float* xp = rows[r].x;
    const float* dp = rows[r].dy;
    for (int64_t j = 0; j < n; ++j, xp += xstep, dp += dystep) {
      for (int i = 0; i < mr; ++i) {
        const float xv = xp[i];
        for (int v = 0; v < nc; ++v) acc[i][v] += xv * dp[v];
      }
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int v = 0; v < nc; ++v) out[i * CO + v] += acc[i][v];
}

#if HQJAX_X86
// ---------------------------------------------------------------------------------------
// AVX2+FMA micro-kernel, M rows of ci (broadcast) x V vectors of 8 co. MASKED: the last
// vector holds fewer than 8 valid co (loads and stores through `mask`).
template <int M, int V, bool MASKED>
__attribute__((target("avx2,fma"))) void block_avx2(const Row* rows, int64_t nrows, int64_t n, int64_t xstep,
                                                    int64_t dystep, __m256i mask, float* out, int64_t CO) {
  // Accumulators as separate named variables: GCC keeps an array of vectors in memory and
  // stores it on every iteration (measured: 3x slower), named locals stay in registers.
  static_assert(M >= 1 && M <= 6 && V >= 1 && V <= 2, "block size");
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
         a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  for (int64_t r = 0; r < nrows; ++r) {
    const float* xp = rows[r].x;
    const float* dp = rows[r].dy;
    for (int64_t j = 0; j < n; ++j, xp += xstep, dp += dystep) {
      const __m256 d0 = (MASKED && V == 1) ? _mm256_maskload_ps(dp, mask) : _mm256_loadu_ps(dp);
      const __m256 d1 = V < 2 ? d0 : (MASKED ? _mm256_maskload_ps(dp + 8, mask) : _mm256_loadu_ps(dp + 8));
      __m256 xb;
#define HQJAX_ROW(i)                                   \
  if (M > i) {                                         \
    xb = _mm256_broadcast_ss(xp + i);                  \
    a##i##0 = _mm256_fmadd_ps(xb, d0, a##i##0);        \
    if (V > 1) a##i##1 = _mm256_fmadd_ps(xb, d1, a##i##1); \
  }
      HQJAX_ROW(0) HQJAX_ROW(1) HQJAX_ROW(2) HQJAX_ROW(3) HQJAX_ROW(4) HQJAX_ROW(5)
#undef HQJAX_ROW
    }
  }
  const __m256 acc[6][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
  for (int i = 0; i < M; ++i) {
    for (int v = 0; v < V; ++v) {
      float* o = out + i * CO + 8 * v;
      if (MASKED && v == V - 1) {
        _mm256_maskstore_ps(o, mask, _mm256_add_ps(_mm256_maskload_ps(o, mask), acc[i][v]));
      } else {
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[i][v]));
      }
    }
  }
}

using BlockFn = void (*)(const Row*, int64_t, int64_t, int64_t, int64_t, __m256i, float*, int64_t);

template <int M>
BlockFn pick_v(int v, bool masked) {
  if (v == 1) return masked ? block_avx2<M, 1, true> : block_avx2<M, 1, false>;
  return masked ? block_avx2<M, 2, true> : block_avx2<M, 2, false>;
}

BlockFn pick_block(int m, int v, bool masked) {
  switch (m) {
    case 1: return pick_v<1>(v, masked);
    case 2: return pick_v<2>(v, masked);
    case 3: return pick_v<3>(v, masked);
    case 4: return pick_v<4>(v, masked);
    case 5: return pick_v<5>(v, masked);
    default: return pick_v<6>(v, masked);
  }
}

__attribute__((target("avx2,fma"))) __m256i tail_mask(int valid) {
  alignas(32) int32_t m[8];
  for (int i = 0; i < 8; ++i) m[i] = i < valid ? -1 : 0;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
}

bool cpu_has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool cpu_has_avx2_fma() { return false; }
#endif

// Every (ci block, co block) of one tap over the rows of one tile.
void sweep_generic(const Geometry& g, const std::vector<Row>& rows, std::vector<Row>& shifted, int64_t n,
                   float* acc_tap) {
  const int64_t nrows = static_cast<int64_t>(rows.size());
  shifted.resize(rows.size());
  for (int64_t c0 = 0; c0 < g.CO; c0 += NR) {
    const int nc = static_cast<int>(std::min<int64_t>(NR, g.CO - c0));
    for (int64_t i0 = 0; i0 < g.CI; i0 += MR) {
      const int mr = static_cast<int>(std::min<int64_t>(MR, g.CI - i0));
      for (int64_t r = 0; r < nrows; ++r) shifted[r] = {rows[r].x + i0, rows[r].dy + c0};
      block_generic(shifted.data(), nrows, n, g.SW * g.CI, g.CO, mr, nc, acc_tap + i0 * g.CO + c0, g.CO);
    }
  }
}

#if HQJAX_X86
__attribute__((target("avx2,fma"))) void sweep_avx2(const Geometry& g, const std::vector<Row>& rows,
                                                    std::vector<Row>& shifted, int64_t n, float* acc_tap) {
  const int64_t nrows = static_cast<int64_t>(rows.size());
  shifted.resize(rows.size());
  for (int64_t c0 = 0; c0 < g.CO; c0 += NR) {
    const int nc = static_cast<int>(std::min<int64_t>(NR, g.CO - c0));
    const int v = (nc + 7) / 8;
    const int tail = nc - 8 * (v - 1);
    const __m256i mask = tail_mask(tail);
    for (int64_t i0 = 0; i0 < g.CI; i0 += MR) {
      const int mr = static_cast<int>(std::min<int64_t>(MR, g.CI - i0));
      for (int64_t r = 0; r < nrows; ++r) shifted[r] = {rows[r].x + i0, rows[r].dy + c0};
      pick_block(mr, v, tail != 8)(shifted.data(), nrows, n, g.SW * g.CI, g.CO, mask, acc_tap + i0 * g.CO + c0,
                                   g.CO);
    }
  }
}
#endif

// 1: AVX2+FMA micro-kernel, 0: portable; -1: not decided yet (decided on first use).
std::atomic<int> g_isa{-1};

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = cpu_has_avx2_fma() ? 1 : 0;
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

// Accumulates the rows [r0, r1) of flattened (b, oh) output rows into acc ([KH, KW, CI, CO]).
void tile(const Geometry& g, const float* x, const float* dy, int64_t r0, int64_t r1, float* acc, int isa,
          std::vector<Row>& rows, std::vector<Row>& shifted) {
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      int64_t lo, hi;
      valid_range(g.W, g.OW, g.SW, kw, g.PW, &lo, &hi);
      const int64_t n = hi - lo;
      if (n == 0) continue;
      rows.clear();
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / g.OH, oh = r % g.OH;
        const int64_t ih = oh * g.SH + kh - g.PH;
        if (ih < 0 || ih >= g.H) continue;
        const int64_t iw = lo * g.SW + kw - g.PW;
        rows.push_back({x + ((b * g.H + ih) * g.W + iw) * g.CI, dy + (r * g.OW + lo) * g.CO});
      }
      if (rows.empty()) continue;
      float* acc_tap = acc + (kh * g.KW + kw) * g.CI * g.CO;
#if HQJAX_X86
      if (isa == 1) {
        sweep_avx2(g, rows, shifted, n, acc_tap);
        continue;
      }
#endif
      (void)isa;
      sweep_generic(g, rows, shifted, n, acc_tap);
    }
  }
}

// Work shared by the calling thread and the tasks it schedules on XLA's pool. Chunks are
// claimed through `next`; the caller waits until `done` counts every chunk, never for a task
// to start (XLA may run scheduled tasks late, on the caller, or on a pool of one thread).
struct Work {
  Geometry g;
  const float* x;
  const float* dy;
  int64_t rows_per_tile, tiles, chunks;
  std::vector<float> partial;  // [chunks, KH*KW*CI*CO]
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

void run_chunks(Work& w) {
  const int isa = current_isa();
  const int64_t size = w.g.KH * w.g.KW * w.g.CI * w.g.CO;
  const int64_t total_rows = w.g.B * w.g.OH;
  std::vector<Row> rows, shifted;
  int64_t finished = 0;
  for (int64_t c; (c = w.next.fetch_add(1)) < w.chunks; ++finished) {
    const int64_t t0 = c * w.tiles / w.chunks, t1 = (c + 1) * w.tiles / w.chunks;
    float* acc = w.partial.data() + c * size;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * w.rows_per_tile;
      tile(w.g, w.x, w.dy, r0, std::min(total_rows, r0 + w.rows_per_tile), acc, isa, rows, shifted);
    }
  }
  if (finished > 0 && w.done.fetch_add(finished) + finished == w.chunks) {
    std::lock_guard<std::mutex> lock(w.mu);
    w.cv.notify_all();
  }
}

// Tile height in output rows: the x and dy rows one tile touches, about 24 KiB (L1 is 32 KiB
// on the CPUs this was tuned on, and every (tap, ci block, co block) sweeps the tile again).
int64_t rows_per_tile(const Geometry& g) {
  const int64_t dy_row = g.OW * g.CO * 4;
  const int64_t x_row = g.SH * g.W * g.CI * 4;
  const int64_t budget = 24 * 1024;
  return std::max<int64_t>(1, std::min<int64_t>(g.B * g.OH, budget / std::max<int64_t>(1, dy_row + x_row)));
}

ffi::Error weight_grad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                       ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                       int64_t pad_w) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("conv2d weight gradient: x, dy and dW must have rank 4");
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1], stride_h, stride_w, pad_h, pad_w};
  if (yd[0] != g.B || wd[2] != g.CI || wd[3] != g.CO || g.SH < 1 || g.SW < 1)
    return ffi::Error::InvalidArgument("conv2d weight gradient: inconsistent shapes or strides");
  float* out = dw->typed_data();
  const int64_t size = g.KH * g.KW * g.CI * g.CO;
  std::fill(out, out + size, 0.0f);
  const int64_t total_rows = g.B * g.OH;
  if (size == 0 || total_rows == 0 || g.OW == 0) return ffi::Error::Success();

  auto work = std::make_shared<Work>();
  work->g = g;
  work->x = x.typed_data();
  work->dy = dy.typed_data();
  work->rows_per_tile = rows_per_tile(g);
  work->tiles = (total_rows + work->rows_per_tile - 1) / work->rows_per_tile;
  // A chunk count that depends on the shape only (deterministic sums), enough to balance a
  // few threads, and private accumulators of at most ~4 MiB in all.
  const int64_t by_memory = std::max<int64_t>(1, (4 << 20) / (size * 4));
  work->chunks = std::max<int64_t>(1, std::min<int64_t>({work->tiles, int64_t{16}, by_memory}));
  work->partial.assign(work->chunks * size, 0.0f);

  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { run_chunks(*work); });
  run_chunks(*work);
  {
    std::unique_lock<std::mutex> lock(work->mu);
    work->cv.wait(lock, [&] { return work->done.load() == work->chunks; });
  }
  for (int64_t c = 0; c < work->chunks; ++c) {
    const float* p = work->partial.data() + c * size;
    for (int64_t i = 0; i < size; ++i) out[i] += p[i];
  }
  return ffi::Error::Success();
}

}  // namespace

// Exported although the library is built with -fvisibility=hidden (this declaration comes first).
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* HqjaxConv2dWeightGradF32(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(HqjaxConv2dWeightGradF32, weight_grad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x, NHWC
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy, NHWC
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW, HWIO
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));

// Which micro-kernel runs: 1 AVX2+FMA, 0 portable. hqjax_wgrad_set_isa(0) forces the
// portable one (tests); hqjax_wgrad_set_isa(1) is ignored on CPUs without AVX2+FMA.
extern "C" __attribute__((visibility("default"))) int hqjax_wgrad_isa() { return current_isa(); }

extern "C" __attribute__((visibility("default"))) int hqjax_wgrad_set_isa(int isa) {
  g_isa.store(isa == 1 && cpu_has_avx2_fma() ? 1 : 0);
  return current_isa();
}

#ifdef HQJAX_WGRAD_BENCH
// Single-threaded entry point for tuning the micro-kernel outside XLA (not built normally).
extern "C" __attribute__((visibility("default"))) void hqjax_wgrad_direct(const float* x, const float* dy, float* out,
                                                                           const int64_t* d) {
  Geometry g{d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12]};
  const int64_t size = g.KH * g.KW * g.CI * g.CO;
  std::fill(out, out + size, 0.0f);
  std::vector<Row> rows, shifted;
  const int64_t rpt = rows_per_tile(g), total = g.B * g.OH;
  for (int64_t r0 = 0; r0 < total; r0 += rpt)
    tile(g, x, dy, r0, std::min(total, r0 + rpt), out, current_isa(), rows, shifted);
}
#endif
