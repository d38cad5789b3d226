// hqjax's native XLA:CPU kernels, as typed XLA FFI handlers in one library (they share the
// thread-pool partitioning and the run-time ISA selection below):
//
//   1. HqjaxConv2dWeightGradF32 -- weight gradient of a 2-D NHWC convolution (this section);
//   2. HqjaxConv2dForwardF32    -- direct forward 2-D convolution ("Forward convolution");
//   3. HqjaxGramSchmidtF32      -- modified Gram-Schmidt for Lanczos ("Modified Gram-Schmidt");
//   4. HqjaxMatmulF32           -- strided batched GEMM ("Strided batched GEMM").
//
// Python side: hqjax.kernels.cpu (conv_weight_grad.py, conv_forward.py, gram_schmidt.py,
// matmul.py; built and loaded by _library.py).
//
// 1. Weight gradient of a 2-D NHWC convolution.
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
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
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

// Work shared by the calling thread and the tasks it schedules on XLA's pool: chunks
// [0, chunks) are claimed through `next` and each is run once by fn(chunk). The caller waits
// until `done` counts every chunk, never for a task to start (XLA may run scheduled tasks
// late, on the caller, or on a pool of one thread); a late task finds no chunk left and
// only touches this shared state, never fn's captures.
struct Parallel {
  std::function<void(int64_t)> fn;
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

void run_chunks(Parallel& p) {
  int64_t finished = 0;
  for (int64_t c; (c = p.next.fetch_add(1)) < p.chunks; ++finished) p.fn(c);
  if (finished > 0 && p.done.fetch_add(finished) + finished == p.chunks) {
    std::lock_guard<std::mutex> lock(p.mu);
    p.cv.notify_all();
  }
}

// fn(c) for every c in [0, chunks), on the calling thread and up to num_threads - 1 helpers.
void parallel_for(ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> fn) {
  if (chunks <= 0) return;
  auto p = std::make_shared<Parallel>();
  p->fn = std::move(fn);
  p->chunks = chunks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([p] { run_chunks(*p); });
  run_chunks(*p);
  std::unique_lock<std::mutex> lock(p->mu);
  p->cv.wait(lock, [&] { return p->done.load() == p->chunks; });
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

  const int64_t rpt = rows_per_tile(g);
  const int64_t tiles = (total_rows + rpt - 1) / rpt;
  // A chunk count that depends on the shape only (deterministic sums), enough to balance a
  // few threads, and private accumulators of at most ~4 MiB in all.
  const int64_t by_memory = std::max<int64_t>(1, (4 << 20) / (size * 4));
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({tiles, int64_t{16}, by_memory}));
  std::vector<float> partial(chunks * size, 0.0f);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  parallel_for(pool, chunks, [&](int64_t c) {
    const int isa = current_isa();
    std::vector<Row> rows, shifted;
    float* acc = partial.data() + c * size;
    for (int64_t t = c * tiles / chunks; t < (c + 1) * tiles / chunks; ++t) {
      const int64_t r0 = t * rpt;
      tile(g, xp, dyp, r0, std::min(total_rows, r0 + rpt), acc, isa, rows, shifted);
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    const float* p = partial.data() + c * size;
    for (int64_t i = 0; i < size; ++i) out[i] += p[i];
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// Forward convolution
//
//   y[b, oh, ow, co] = sum_{kh, kw, ci} x[b, oh*sh + kh - ph, ow*sw + kw - pw, ci] * w[kh, kw, ci, co]
//
// Direct convolution: a tile of P consecutive output pixels of one row x 16 output channels
// (2P ymm accumulators, P <= 6) stays in registers while the loop runs over the taps and
// input channels: per (tap, ci), two vector loads of w[kh, kw, ci, co:co+16], P broadcasts of
// x and 2P FMAs. For fixed kh, (kw, ci) walks contiguous memory in both x (NHWC) and w
// (HWIO), so the kw and ci loops are one. Padding is never materialized: rows clip their kh
// range at the image's top and bottom, the pixels whose window crosses the left or right
// edge run as tiles of one pixel with their own kw range, the rest as full tiles. Every
// output element is written by one thread with one summation order, so the result does not
// depend on the partition of the (b, oh) rows over XLA's thread pool.

constexpr int FP = 6;  // output pixels per tile

// One tile's operands: x at (pixel 0, first tap), w at (first tap, ci 0, co block), y at pixel 0.
struct FwdTile {
  const float* x;
  const float* w;
  float* y;
  int64_t nkh, nk;     // taps rows, and kw * CI steps per row
  int64_t x_kh, w_kh;  // strides per kh step
  int64_t x_pix;       // x stride between output pixels (SW * CI)
  int64_t CO;          // w's ci stride and y's pixel stride
  // Edge tiles (some pixel's window crosses the left or right border): x points at column 0
  // of the first tap row, pixel i's tap kw reads column col0 + i*SW + kw, and taps outside
  // [0, W) read CI zeros from `zeros` instead.
  int64_t col0, SW, W, CI, KW;
  const float* zeros;
};

template <bool EDGE>
void fwd_generic(const FwdTile& t, int p, int nc) {
  float acc[FP][NR];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t kh = 0; kh < t.nkh; ++kh) {
    const float* xr = t.x + kh * t.x_kh;
    const float* wr = t.w + kh * t.w_kh;
    if (EDGE) {
      for (int64_t kw = 0; kw < t.KW; ++kw) {
        for (int64_t ci = 0; ci < t.CI; ++ci) {
          const float* wv = wr + (kw * t.CI + ci) * t.CO;
          for (int i = 0; i < p; ++i) {
            const int64_t c = t.col0 + i * t.SW + kw;
            const float xv = (c >= 0 && c < t.W) ? xr[c * t.CI + ci] : 0.0f;
            for (int v = 0; v < nc; ++v) acc[i][v] += xv * wv[v];
          }
        }
      }
      continue;
    }
    for (int64_t k = 0; k < t.nk; ++k) {
      const float* wv = wr + k * t.CO;
      for (int i = 0; i < p; ++i) {
        const float xv = xr[i * t.x_pix + k];
        for (int v = 0; v < nc; ++v) acc[i][v] += xv * wv[v];
      }
    }
  }
  for (int i = 0; i < p; ++i)
    for (int v = 0; v < nc; ++v) t.y[i * t.CO + v] = acc[i][v];
}

#if HQJAX_X86
template <int P, int V, bool MASKED, bool EDGE>
__attribute__((target("avx2,fma"))) void fwd_avx2(const FwdTile& t, int tail) {
  // (the mask is built here: a __m256i argument from a non-AVX caller would break the ABI)
  static_assert(P >= 1 && P <= FP && V >= 1 && V <= 2, "tile size");
  const __m256i mask = MASKED ? tail_mask(tail) : _mm256_setzero_si256();
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
         a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  const int64_t co = t.CO;
  // One (kh[, kw]) run of n steps: x of pixel i at p##i[k], w at wv + k*co.
#define HQJAX_STEPS(n)                                                                                 \
  for (int64_t k = 0; k < (n); ++k, wv += co) {                                                       \
    const __m256 d0 = (MASKED && V == 1) ? _mm256_maskload_ps(wv, mask) : _mm256_loadu_ps(wv);        \
    const __m256 d1 = V < 2 ? d0 : (MASKED ? _mm256_maskload_ps(wv + 8, mask) : _mm256_loadu_ps(wv + 8)); \
    __m256 xb;                                                                                         \
    HQJAX_PIX(0) HQJAX_PIX(1) HQJAX_PIX(2) HQJAX_PIX(3) HQJAX_PIX(4) HQJAX_PIX(5)                     \
  }
#define HQJAX_PIX(i)                                       \
  if (P > i) {                                             \
    xb = _mm256_broadcast_ss(p##i + k);                    \
    a##i##0 = _mm256_fmadd_ps(xb, d0, a##i##0);            \
    if (V > 1) a##i##1 = _mm256_fmadd_ps(xb, d1, a##i##1); \
  }
  for (int64_t kh = 0; kh < t.nkh; ++kh) {
    const float* xr = t.x + kh * t.x_kh;
    const float* wv = t.w + kh * t.w_kh;
    if (EDGE) {
      for (int64_t kw = 0; kw < t.KW; ++kw) {
        auto px = [&](int i) {
          const int64_t c = t.col0 + i * t.SW + kw;
          return (c >= 0 && c < t.W) ? xr + c * t.CI : t.zeros;
        };
        const float *p0 = px(0), *p1 = px(1), *p2 = px(2), *p3 = px(3), *p4 = px(4), *p5 = px(5);
        HQJAX_STEPS(t.CI)
      }
    } else {
      const float *p0 = xr, *p1 = xr + t.x_pix, *p2 = xr + 2 * t.x_pix, *p3 = xr + 3 * t.x_pix,
                  *p4 = xr + 4 * t.x_pix, *p5 = xr + 5 * t.x_pix;
      HQJAX_STEPS(t.nk)
    }
  }
#undef HQJAX_PIX
#undef HQJAX_STEPS
  const __m256 acc[6][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
  for (int i = 0; i < P; ++i) {
    for (int v = 0; v < V; ++v) {
      float* o = t.y + i * co + 8 * v;
      if (MASKED && v == V - 1) {
        _mm256_maskstore_ps(o, mask, acc[i][v]);
      } else {
        _mm256_storeu_ps(o, acc[i][v]);
      }
    }
  }
}

using FwdFn = void (*)(const FwdTile&, int);

template <int P, bool EDGE>
FwdFn fwd_pick_v(int v, bool masked) {
  if (v == 1) return masked ? fwd_avx2<P, 1, true, EDGE> : fwd_avx2<P, 1, false, EDGE>;
  return masked ? fwd_avx2<P, 2, true, EDGE> : fwd_avx2<P, 2, false, EDGE>;
}

template <bool EDGE>
FwdFn fwd_pick(int p, int v, bool masked) {
  switch (p) {
    case 1: return fwd_pick_v<1, EDGE>(v, masked);
    case 2: return fwd_pick_v<2, EDGE>(v, masked);
    case 3: return fwd_pick_v<3, EDGE>(v, masked);
    case 4: return fwd_pick_v<4, EDGE>(v, masked);
    case 5: return fwd_pick_v<5, EDGE>(v, masked);
    default: return fwd_pick_v<6, EDGE>(v, masked);
  }
}
#endif

// Output rows [r0, r1) of the flattened (b, oh) rows. Each row is covered by ceil(OW / 6)
// tiles of (nearly) equal width (see below for few input channels): a tile of 4 or more pixels keeps enough independent FMA
// chains in flight, a 1-pixel tile would wait on FMA latency. Tiles whose pixels' windows
// all lie inside the image run the merged (kw, ci) loop; the others the edge loop.
void fwd_rows(const Geometry& g, const float* x, const float* w, float* y, int64_t r0, int64_t r1, int isa,
              const float* zeros) {
  // Interior columns: every kw of the window inside the image.
  int64_t in_lo = (g.PW + g.SW - 1) / g.SW;
  int64_t in_hi = g.W - g.KW + g.PW < 0 ? 0 : (g.W - g.KW + g.PW) / g.SW + 1;
  in_hi = std::min(in_hi, g.OW);
  // Tiles (first pixel, width) of a row. With few input channels (the first layer) the edge
  // loop's short per-kw runs cost more than latency-bound 1-pixel tiles: there the border
  // pixels are tiles of their own and the interior is split evenly.
  std::vector<std::pair<int64_t, int>> tiles;
  auto split = [&](int64_t lo, int64_t hi) {
    const int64_t n = hi - lo, k = (n + FP - 1) / FP;
    for (int64_t j = 0; j < k; lo += n / k + (j < n % k ? 1 : 0), ++j)
      tiles.emplace_back(lo, static_cast<int>(n / k + (j < n % k ? 1 : 0)));
  };
  if (g.CI < 8 && in_lo < in_hi) {
    for (int64_t o = 0; o < in_lo; ++o) tiles.emplace_back(o, 1);
    split(in_lo, in_hi);
    for (int64_t o = in_hi; o < g.OW; ++o) tiles.emplace_back(o, 1);
  } else {
    split(0, g.OW);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.OH, oh = r % g.OH;
    const int64_t top = oh * g.SH - g.PH;
    const int64_t kh0 = std::max<int64_t>(0, -top), kh1 = std::max(kh0, std::min<int64_t>(g.KH, g.H - top));
    const float* xrow = x + (b * g.H + top + kh0) * g.W * g.CI;  // only read when kh1 > kh0
    float* yrow = y + r * g.OW * g.CO;
    for (int64_t c0 = 0; c0 < g.CO; c0 += NR) {
      const int nc = static_cast<int>(std::min<int64_t>(NR, g.CO - c0));
      const int v = (nc + 7) / 8;
      const int tail = nc - 8 * (v - 1);
      for (const auto& [o0, p] : tiles) {
        const bool edge = o0 < in_lo || o0 + p > in_hi;
        FwdTile t;
        t.col0 = o0 * g.SW - g.PW;
        t.x = edge ? xrow : xrow + t.col0 * g.CI;
        t.w = w + (kh0 * g.KW * g.CI) * g.CO + c0;
        t.y = yrow + o0 * g.CO + c0;
        t.nkh = kh1 - kh0;
        t.nk = g.KW * g.CI;
        t.x_kh = g.W * g.CI;
        t.w_kh = g.KW * g.CI * g.CO;
        t.x_pix = g.SW * g.CI;
        t.CO = g.CO;
        t.SW = g.SW;
        t.W = g.W;
        t.CI = g.CI;
        t.KW = g.KW;
        t.zeros = zeros;
#if HQJAX_X86
        if (isa == 1) {
          (edge ? fwd_pick<true>(p, v, tail != 8) : fwd_pick<false>(p, v, tail != 8))(t, tail);
          continue;
        }
#endif
        (void)isa;
        (void)v;
        (void)tail;
        if (edge) {
          fwd_generic<true>(t, p, nc);
        } else {
          fwd_generic<false>(t, p, nc);
        }
      }
    }
  }
}

ffi::Error conv_forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                        int64_t pad_w) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("conv2d forward: x, w and y must have rank 4");
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1], stride_h, stride_w, pad_h, pad_w};
  if (yd[0] != g.B || wd[2] != g.CI || wd[3] != g.CO || g.SH < 1 || g.SW < 1 || g.PH < 0 || g.PW < 0)
    return ffi::Error::InvalidArgument("conv2d forward: inconsistent shapes, strides or padding");
  const int64_t total_rows = g.B * g.OH;
  if (total_rows == 0 || g.OW == 0 || g.CO == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // Rows per chunk: about 64 chunks, for balance across threads (any partition gives the same result).
  const int64_t chunks = std::min<int64_t>(total_rows, 64);
  const std::vector<float> zeros(g.CI, 0.0f);  // what taps outside the image read
  parallel_for(pool, chunks, [&](int64_t c) {
    fwd_rows(g, xp, wp, yp, c * total_rows / chunks, (c + 1) * total_rows / chunks, current_isa(), zeros.data());
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// Modified Gram-Schmidt for Lanczos reorthogonalization (hqjax.kernels.cpu.gram_schmidt, for Lanczos):
//
//   for i < count:  w -= (v_i . w) v_i        (v_i: row i of V [rows, n])
//
// XLA computes classical Gram-Schmidt as two matrix-vector products, each streaming the
// basis from memory (it is far larger than any cache). Here sweep i subtracts row i-1 and
// accumulates row i's dot product with the updated w in one pass: row i-1 was just read by
// the previous sweep (one row plus w fits in L3), so every basis row comes from memory once.
// The n entries are split into a fixed number of chunks (a function of n only) whose
// partial sums are added in order, so results do not depend on threads or scheduling.

// One sweep over [0, len): w -= c * prev (if prev), then the dot of next with the new w (if next).
template <int L>
inline double gs_sweep_body(float* w, const float* prev, const float* next, int64_t len, float c) {
  float acc[L] = {};  // independent accumulators, so the compiler can vectorize the sum
  int64_t e = 0;
  if (prev != nullptr && next != nullptr) {
    for (; e + L <= len; e += L)
      for (int l = 0; l < L; ++l) {
        const float x = w[e + l] - c * prev[e + l];
        w[e + l] = x;
        acc[l] += next[e + l] * x;
      }
    for (; e < len; ++e) {
      w[e] -= c * prev[e];
      acc[0] += next[e] * w[e];
    }
  } else if (prev != nullptr) {
    for (; e < len; ++e) w[e] -= c * prev[e];
  } else if (next != nullptr) {
    for (; e + L <= len; e += L)
      for (int l = 0; l < L; ++l) acc[l] += next[e + l] * w[e + l];
    for (; e < len; ++e) acc[0] += next[e] * w[e];
  }
  double total = 0;
  for (int l = 0; l < L; ++l) total += acc[l];
  return total;
}

#if HQJAX_X86
__attribute__((target("avx2,fma"))) double gs_sweep_avx2(float* w, const float* prev, const float* next,
                                                          int64_t len, float c) {
  return gs_sweep_body<16>(w, prev, next, len, c);
}
#endif

double gs_sweep(float* w, const float* prev, const float* next, int64_t len, float c, int isa) {
#if HQJAX_X86
  if (isa == 1) return gs_sweep_avx2(w, prev, next, len, c);
#endif
  (void)isa;
  return gs_sweep_body<8>(w, prev, next, len, c);
}

ffi::Error gram_schmidt(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> basis,
                        ffi::Buffer<ffi::S32> count_in, ffi::ResultBuffer<ffi::F32> w_out) {
  const auto vd = basis.dimensions();
  const int64_t n = static_cast<int64_t>(w_in.element_count());
  if (vd.size() != 2 || vd[1] != n || w_out->element_count() != w_in.element_count() ||
      count_in.element_count() != 1)
    return ffi::Error::InvalidArgument("gram_schmidt: need w [n], V [rows, n] and a scalar count");
  const int64_t count = std::clamp<int64_t>(count_in.typed_data()[0], 0, vd[0]);
  float* w = w_out->typed_data();
  if (w != w_in.typed_data()) std::memcpy(w, w_in.typed_data(), sizeof(float) * n);
  if (count == 0 || n == 0) return ffi::Error::Success();
  const float* v = basis.typed_data();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, n / 4096));
  std::vector<double> partial(chunks);
  const int isa = current_isa();
  float c = 0.0f;
  for (int64_t i = 0; i <= count; ++i) {
    const float* prev = i > 0 ? v + (i - 1) * n : nullptr;
    const float* next = i < count ? v + i * n : nullptr;
    parallel_for(pool, chunks, [&](int64_t k) {
      const int64_t lo = k * n / chunks, hi = (k + 1) * n / chunks;
      partial[k] = gs_sweep(w + lo, prev ? prev + lo : nullptr, next ? next + lo : nullptr, hi - lo, c, isa);
    });
    if (next != nullptr) {
      double dot = 0;
      for (int64_t k = 0; k < chunks; ++k) dot += partial[k];
      c = static_cast<float>(dot);
    }
  }
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------
// Strided batched GEMM
//
//   C[b, m, n] = sum_k A(b, m, k) B(b, k, n),   A(b, m, k) = a[b*ab + m*am + k*ak],
//                                               B(b, k, n) = b[b*bb + k*bk + n*bn]
//
// with C row-major [batch, M, N]. Any strides, so a dot_general whose operands XLA would
// transpose first (a weight gradient contracts over the tokens, the leading axis of both
// operands) reads them where they lie. BLIS-style: for each block of KC reduction steps,
// MC x KC of A and KC x NC of B are packed into panels of MR rows and NR columns (zero-padded
// at the edges), and the 6 x 16 register tile of the AVX2 micro-kernel runs over them from
// L1/L2. The (batch, MC block, NC block) chunks partition C, each element is computed by one
// chunk in a fixed order of k: results do not depend on threads or scheduling.

constexpr int64_t GEMM_KC = 256;
// Rows of A per block (a multiple of MR; 264 KiB packed, in L2). 264 rather than 240: a batch
// of 256 rows is then one block, so B is packed once, not twice (1.1x on 256 x 1024 x 1024).
constexpr int64_t GEMM_MC_MAX = 264;
constexpr int64_t GEMM_NC_MAX = 256;  // columns of B per block (a multiple of NR)

// Floats from one packed panel of `width` columns to the next: one cache line more than the
// panel, so panels (16 KiB for B) do not all start at the same offset in a 4 KiB page, where
// stores to them and the loads that follow alias and stall.
constexpr int64_t gemm_panel(int64_t width, int64_t kc) { return width * kc + 16; }

struct Gemm {
  int64_t batch, M, N, K;
  int64_t ab, am, ak;  // A strides (elements)
  int64_t bb, bk, bn;  // B strides
};

// Packing reads each source row (fixed k, or fixed m / n) contiguously where the layout
// allows: reading one panel at a time down a column of a row-major operand touches a new
// cache line per k and left the packing slower than the arithmetic.

#if HQJAX_X86
// The row-contiguous packings with explicit vector moves (GCC copied element by element).
__attribute__((target("avx2,fma"))) void gemm_pack_a_rows_avx2(const float* a, int64_t ak, int64_t mc, int64_t kc,
                                                               float* dst) {
  // 4 + 2 floats per panel row: masked stores (vmaskmovps) are microcoded and slow on AMD.
  for (int64_t k = 0; k < kc; ++k) {
    const float* s = a + k * ak;
    int64_t p = 0;
    for (; p + MR <= mc; p += MR) {
      float* d = dst + (p / MR) * gemm_panel(MR, kc) + k * MR;
      _mm_storeu_ps(d, _mm_loadu_ps(s + p));
      _mm_store_sd(reinterpret_cast<double*>(d + 4), _mm_load_sd(reinterpret_cast<const double*>(s + p + 4)));
    }
    if (p < mc) {
      float* d = dst + (p / MR) * gemm_panel(MR, kc) + k * MR;
      for (int64_t i = 0; i < MR; ++i) d[i] = p + i < mc ? s[p + i] : 0.0f;
    }
  }
}

__attribute__((target("avx2,fma"))) void gemm_pack_b_rows_avx2(const float* b, int64_t bk, int64_t nc, int64_t kc,
                                                               float* dst) {
  for (int64_t k = 0; k < kc; ++k) {
    const float* s = b + k * bk;
    int64_t p = 0;
    for (; p + NR <= nc; p += NR) {
      float* d = dst + (p / NR) * gemm_panel(NR, kc) + k * NR;
      _mm256_storeu_ps(d, _mm256_loadu_ps(s + p));
      _mm256_storeu_ps(d + 8, _mm256_loadu_ps(s + p + 8));
    }
    if (p < nc) {
      float* d = dst + (p / NR) * gemm_panel(NR, kc) + k * NR;
      const int64_t cols = nc - p;
      _mm256_storeu_ps(d, _mm256_maskload_ps(s + p, tail_mask(static_cast<int>(std::min<int64_t>(8, cols)))));
      _mm256_storeu_ps(d + 8, cols > 8 ? _mm256_maskload_ps(s + p + 8, tail_mask(static_cast<int>(cols - 8)))
                                       : _mm256_setzero_ps());
    }
  }
}

// Transposes the 8 x 8 block r[0..7] (row i = r[i]) in place: afterwards r[j] holds column j.
__attribute__((target("avx2,fma"))) inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    u[h] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
    r[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
  }
}

// Full panels of W entries whose kc steps are contiguous (s_k == 1: row-major A, or B read
// transposed as in dy @ W^T), as 8 x 8 transposes: the free entries of one k then leave as one
// vector store instead of W strided ones (NT products 1.14x, single-threaded).
// Returns how many entries of `len` it packed (whole panels only; kc a multiple of 8).
template <int W>
__attribute__((target("avx2,fma"))) int64_t gemm_pack_cols_avx2(const float* src, int64_t s_free, int64_t len,
                                                                 int64_t kc, float* dst) {
  static_assert(W == MR || W == NR, "panels are MR or NR wide");
  int64_t p = 0;
  for (; p + W <= len; p += W) {
    float* d = dst + (p / W) * gemm_panel(W, kc);
    for (int64_t g = 0; g < W; g += 8) {  // 8 free entries at a time (W = 6: the last two lanes unused)
      const float* rows[8];
      for (int i = 0; i < 8; ++i) rows[i] = src + (p + std::min<int64_t>(g + i, W - 1)) * s_free;
      for (int64_t k = 0; k < kc; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[i] + k);
        transpose8(r);
        for (int j = 0; j < 8; ++j) {
          float* o = d + (k + j) * W + g;
          if constexpr (W == NR) {
            _mm256_storeu_ps(o, r[j]);
          } else {
            _mm_storeu_ps(o, _mm256_castps256_ps128(r[j]));
            _mm_store_sd(reinterpret_cast<double*>(o + 4), _mm_castps_pd(_mm256_extractf128_ps(r[j], 1)));
          }
        }
      }
    }
  }
  return p;
}
#endif

// `len` entries along an operand's free axis (stride s_free) x kc steps (stride s_k) as
// panels of W entries: panel q holds entry (q * W + i, k) at [k * W + i], zero past `len`.
// A is packed with W = MR (rows m), B with W = NR (columns n).
template <int W>
void gemm_pack_portable(const float* src, int64_t s_free, int64_t s_k, int64_t len, int64_t kc, float* dst) {
  if (s_free == 1) {  // a row of fixed k is contiguous along the free axis
    for (int64_t k = 0; k < kc; ++k) {
      const float* s = src + k * s_k;
      for (int64_t p = 0; p < len; p += W) {
        float* d = dst + (p / W) * gemm_panel(W, kc) + k * W;
        if (len - p >= W) {
          for (int i = 0; i < W; ++i) d[i] = s[p + i];
        } else {
          for (int64_t i = 0; i < W; ++i) d[i] = i < len - p ? s[p + i] : 0.0f;
        }
      }
    }
    return;
  }
  for (int64_t p = 0; p < len; p += W) {  // otherwise one free index at a time (contiguous in k when s_k == 1)
    float* d = dst + (p / W) * gemm_panel(W, kc);
    for (int64_t i = 0; i < W; ++i) {
      if (p + i < len) {
        const float* s = src + (p + i) * s_free;
        for (int64_t k = 0; k < kc; ++k) d[k * W + i] = s[k * s_k];
      } else {
        for (int64_t k = 0; k < kc; ++k) d[k * W + i] = 0.0f;
      }
    }
  }
}

// `len` entries along an operand's free axis (stride s_free) x kc steps (stride s_k) as panels
// of W entries, as gemm_pack_portable lays them out: A with W = MR (panel q holds A(q * MR + i,
// k) at [k * MR + i]), B with W = NR (B(k, q * NR + j) at [k * NR + j]). Vector code where a
// row of fixed k, or a run of k, is contiguous; the portable copy for the rest.
template <int W>
void gemm_pack(const float* src, int64_t s_free, int64_t s_k, int64_t len, int64_t kc, float* dst, int isa) {
#if HQJAX_X86
  if (s_free == 1 && isa == 1) {
    if constexpr (W == MR) return gemm_pack_a_rows_avx2(src, s_k, len, kc, dst);
    else return gemm_pack_b_rows_avx2(src, s_k, len, kc, dst);
  }
  if (s_k == 1 && isa == 1 && kc % 8 == 0) {
    const int64_t done = gemm_pack_cols_avx2<W>(src, s_free, len, kc, dst);
    if (done < len)
      gemm_pack_portable<W>(src + done * s_free, s_free, s_k, len - done, kc, dst + done / W * gemm_panel(W, kc));
    return;
  }
#endif
  (void)isa;
  gemm_pack_portable<W>(src, s_free, s_k, len, kc, dst);
}

// The valid mr x nr corner of a full MR x NR tile into C (added to C when accumulate).
inline void gemm_store(const float* tile, float* c, int64_t ldc, int64_t mr, int64_t nr, bool accumulate) {
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + tile[i * NR + j] : tile[i * NR + j];
}

void gemm_tile_generic(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, int64_t mr, int64_t nr,
                       bool accumulate) {
  float acc[MR * NR] = {};
  for (int64_t k = 0; k < kc; ++k, ap += MR, bp += NR)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i * NR + j] += ap[i] * bp[j];
  gemm_store(acc, c, ldc, mr, nr, accumulate);
}

#if HQJAX_X86
__attribute__((target("avx2,fma"))) void gemm_tile_avx2(int64_t kc, const float* ap, const float* bp, float* c,
                                                        int64_t ldc, int64_t mr, int64_t nr, bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  // C's rows are touched only after the k loop, and lie 4 KiB or more apart (misses each):
  // fetched now, they arrive while the tile computes (1.1x single-threaded).
  for (int64_t i = 0; i < mr; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + NR - 1), _MM_HINT_T0);
  }
  for (int64_t k = 0; k < kc; ++k, ap += MR, bp += NR) {
    const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
    __m256 a;
#define HQJAX_GEMM_ROW(i)                   \
  a = _mm256_broadcast_ss(ap + i);          \
  c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0); \
  c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);
    HQJAX_GEMM_ROW(0) HQJAX_GEMM_ROW(1) HQJAX_GEMM_ROW(2) HQJAX_GEMM_ROW(3) HQJAX_GEMM_ROW(4) HQJAX_GEMM_ROW(5)
#undef HQJAX_GEMM_ROW
  }
  const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (mr == MR && nr == NR) {
    for (int i = 0; i < MR; ++i) {
      float* o = c + i * ldc;
      if (accumulate) {
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[i][0]));
        _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), acc[i][1]));
      } else {
        _mm256_storeu_ps(o, acc[i][0]);
        _mm256_storeu_ps(o + 8, acc[i][1]);
      }
    }
    return;
  }
  alignas(32) float tile[MR * NR];
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(tile + i * NR, acc[i][0]);
    _mm256_store_ps(tile + i * NR + 8, acc[i][1]);
  }
  gemm_store(tile, c, ldc, mr, nr, accumulate);
}
#endif

// One (batch, m block, n block) chunk of C, all of K.
void gemm_chunk(const Gemm& g, const float* a, const float* b, float* c, int64_t bi, int64_t m0, int64_t mc,
                int64_t n0, int64_t nc, std::vector<float>& apack, std::vector<float>& bpack, int isa) {
  float* cblock = c + (bi * g.M + m0) * g.N + n0;
  if (g.K == 0) {
    for (int64_t i = 0; i < mc; ++i) std::fill(cblock + i * g.N, cblock + i * g.N + nc, 0.0f);
    return;
  }
  const float* ablock = a + bi * g.ab + m0 * g.am;
  const float* bblock = b + bi * g.bb + n0 * g.bn;
  for (int64_t k0 = 0; k0 < g.K; k0 += GEMM_KC) {
    const int64_t kc = std::min(GEMM_KC, g.K - k0);
    gemm_pack<MR>(ablock + k0 * g.ak, g.am, g.ak, mc, kc, apack.data(), isa);
    gemm_pack<NR>(bblock + k0 * g.bk, g.bn, g.bk, nc, kc, bpack.data(), isa);
    for (int64_t jr = 0; jr < nc; jr += NR) {
      for (int64_t ir = 0; ir < mc; ir += MR) {
        const float* ap = apack.data() + (ir / MR) * gemm_panel(MR, kc);
        const float* bp = bpack.data() + (jr / NR) * gemm_panel(NR, kc);
        float* ct = cblock + ir * g.N + jr;
        const int64_t mr = std::min<int64_t>(MR, mc - ir), nr = std::min<int64_t>(NR, nc - jr);
#if HQJAX_X86
        if (isa == 1) {
          gemm_tile_avx2(kc, ap, bp, ct, g.N, mr, nr, k0 > 0);
          continue;
        }
#endif
        gemm_tile_generic(kc, ap, bp, ct, g.N, mr, nr, k0 > 0);
      }
    }
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Blocks: all of M in one block when it fits (B, usually the larger operand, is then packed
// once), N split so that there are at least two chunks per thread. The partition does not
// change any result: every element of C sums its k in the same order whatever the blocks.
void gemm_run(ffi::ThreadPool* pool, const Gemm& g, const float* a, const float* b, float* c) {
  const int64_t threads = pool == nullptr ? 1 : std::max<int64_t>(1, pool->num_threads());
  const int64_t mb = (g.M + GEMM_MC_MAX - 1) / GEMM_MC_MAX;
  const int64_t mc = round_up((g.M + mb - 1) / mb, MR);
  const int64_t nb_wanted = std::max<int64_t>(1, (2 * threads + g.batch * mb - 1) / (g.batch * mb));
  const int64_t nc = std::clamp<int64_t>(round_up((g.N + nb_wanted - 1) / nb_wanted, NR), NR, GEMM_NC_MAX);
  const int64_t nb = (g.N + nc - 1) / nc;
  const int64_t chunks = g.batch * mb * nb;
  const int isa = current_isa();
  auto run = [&](int64_t ch) {
    // packing buffers per thread, reused across calls (no allocation in the hot path)
    thread_local std::vector<float> apack, bpack;
    apack.resize(std::max<size_t>(apack.size(), mc / MR * gemm_panel(MR, GEMM_KC)));
    bpack.resize(std::max<size_t>(bpack.size(), nc / NR * gemm_panel(NR, GEMM_KC)));
    const int64_t bi = ch / (mb * nb), r = ch % (mb * nb);
    const int64_t m0 = (r / nb) * mc, n0 = (r % nb) * nc;
    gemm_chunk(g, a, b, c, bi, m0, std::min(mc, g.M - m0), n0, std::min(nc, g.N - n0), apack, bpack, isa);
  };
  if (pool == nullptr) {
    for (int64_t ch = 0; ch < chunks; ++ch) run(ch);
  } else {
    parallel_for(*pool, chunks, run);
  }
}

ffi::Error matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                  int64_t batch, int64_t m, int64_t n, int64_t k, int64_t a_batch, int64_t a_m, int64_t a_k,
                  int64_t b_batch, int64_t b_k, int64_t b_n) {
  const Gemm g{batch, m, n, k, a_batch, a_m, a_k, b_batch, b_k, b_n};
  // the largest index each operand is read at must lie inside it (strides are non-negative)
  auto last = [](int64_t bs, int64_t s1, int64_t n1, int64_t s2, int64_t n2, int64_t nb) {
    return (nb - 1) * bs + (n1 - 1) * s1 + (n2 - 1) * s2;
  };
  if (batch < 0 || m < 0 || n < 0 || k < 0 || a_batch < 0 || a_m < 0 || a_k < 0 || b_batch < 0 || b_k < 0 || b_n < 0 ||
      c->element_count() != static_cast<size_t>(batch * m * n))
    return ffi::Error::InvalidArgument("matmul: negative sizes or strides, or C is not [batch, M, N]");
  if (batch * m * n == 0) return ffi::Error::Success();
  if (k > 0 && (last(a_batch, a_m, m, a_k, k, batch) >= static_cast<int64_t>(a.element_count()) ||
                last(b_batch, b_k, k, b_n, n, batch) >= static_cast<int64_t>(b.element_count())))
    return ffi::Error::InvalidArgument("matmul: the strides reach past an operand's end");
  gemm_run(&pool, g, a.typed_data(), b.typed_data(), c->typed_data());
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

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* HqjaxConv2dForwardF32(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(HqjaxConv2dForwardF32, conv_forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x, NHWC
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w, HWIO
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y, NHWC
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* HqjaxGramSchmidtF32(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(HqjaxGramSchmidtF32, gram_schmidt,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [n]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // V [rows, n]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // count: rows 0..count-1 are used
                                  .Ret<ffi::Buffer<ffi::F32>>());  // w minus its projections

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* HqjaxMatmulF32(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(HqjaxMatmulF32, matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A, any shape (read through strides)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B, any shape
                                  .Ret<ffi::Buffer<ffi::F32>>()  // C [batch, M, N] (any shape of that size)
                                  .Attr<int64_t>("batch")
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("a_batch")
                                  .Attr<int64_t>("a_m")
                                  .Attr<int64_t>("a_k")
                                  .Attr<int64_t>("b_batch")
                                  .Attr<int64_t>("b_k")
                                  .Attr<int64_t>("b_n"));

// Which micro-kernel runs: 1 AVX2+FMA, 0 portable. hqjax_wgrad_set_isa(0) forces the
// portable one (tests); hqjax_wgrad_set_isa(1) is ignored on CPUs without AVX2+FMA.
extern "C" __attribute__((visibility("default"))) int hqjax_wgrad_isa() { return current_isa(); }

extern "C" __attribute__((visibility("default"))) int hqjax_wgrad_set_isa(int isa) {
  g_isa.store(isa == 1 && cpu_has_avx2_fma() ? 1 : 0);
  return current_isa();
}

#ifdef HQJAX_WGRAD_BENCH
// Single-threaded forward convolution (d as for hqjax_wgrad_direct, y: [B, OH, OW, CO]).
extern "C" __attribute__((visibility("default"))) void hqjax_forward_direct(const float* x, const float* w, float* y,
                                                                             const int64_t* d) {
  Geometry g{d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12]};
  const std::vector<float> zeros(g.CI, 0.0f);
  fwd_rows(g, x, w, y, 0, g.B * g.OH, current_isa(), zeros.data());
}

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
