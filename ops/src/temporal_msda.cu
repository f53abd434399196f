// Temporal multi-scale deformable attention: one fused launch per clip (forward and backward).
//
// Semantics are those of devis_core/attention.py::ms_deform_attn_reference (spec §2-§3): every
// (frame t, query q, head m) reads L*P_c bilinear samples of its own frame and W*L*P_t samples of
// the frames temporal_frames[t, w], addressing them by index in the (T, S, M, D) value tensor, so no
// per-frame loop and no gathered copy of the other frames exist.
//
// Work split: one warp per (t, q, m). A lane holds the C channels of one 16-byte load (C = 4 for
// float32, 8 for float16/bfloat16), so G = D/C lanes cover one head and a warp treats NG = 32/G
// samples at once; lanes first compute the footprints of 32 samples (one each) and hand them to
// the sample groups by shuffle. Accumulation is always float32.
// Backward, location and weight gradients: the G samples a lane group handled are summed over its G
// lanes by a transposed (recursive-halving) reduction, which leaves lane j of the group with sample
// j's sums: 3(G-1) shuffles per G samples instead of 3 log2(G) per sample, and the stores stay
// coalesced.
// Backward, value gradient: a counting sort instead of one atomic row per corner. Adding every
// corner's weighted grad_output row straight into the float32 buffer moved about 89 M rows (11.4 GB)
// through the L2's atomic units at the DeVIS encoder shape and set the backward's time
// (ops/README.md). Instead the samples are binned by the cell they read (target frame, head, level,
// top-left corner (x0, y0) with x0 in [-1, W_l), y0 in [-1, H_l)): the forward counts the samples
// per cell, a scan gives each cell its range, the main backward kernel writes each sample's
// (grad_output row, weight, fractional position) into its cell's range, and a last kernel walks the
// sorted list in fixed chunks, sums a cell's four corner rows in registers and adds them once per
// cell and chunk. The forward counts only when a backward will follow (count_cells, set by the
// autograd binding): it already computes every sample's corner, and its count atomics hide behind its
// value gathers (about +0.04 ms), where a separate counting pass cost 0.34-0.43 ms at the encoder
// shape (ops/README.md).
//
// Kept in one translation unit (bindings included) so the JIT build compiles a single file.

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdio>
#include <numeric>
#include <optional>
#include <vector>
#include <type_traits>

// Launch tuning (swept with ops/tune_launch.py on an H100, results in ops/README.md): warps per
// block, the minimum resident blocks per SM given to __launch_bounds__ (it caps the registers:
// 4 -> 64 registers, 50% occupancy, was the fastest forward; the backward needs 2 -> 128 to avoid
// heavy spills), and the samples whose corner loads one lane group issues before using them.
#ifndef DEVIS_WARPS_PER_BLOCK
#define DEVIS_WARPS_PER_BLOCK 8
#endif
#ifndef DEVIS_FWD_MIN_BLOCKS
#define DEVIS_FWD_MIN_BLOCKS 4
#endif
#ifndef DEVIS_BWD_MIN_BLOCKS
#define DEVIS_BWD_MIN_BLOCKS 2
#endif
#ifndef DEVIS_FWD_BATCH
#define DEVIS_FWD_BATCH 2
#endif
#ifndef DEVIS_TILE_SWIZZLE
#define DEVIS_TILE_SWIZZLE 1
#endif
#ifndef DEVIS_BWD_BATCH
#define DEVIS_BWD_BATCH 2
#endif
// sorted entries one lane group of the value-gradient kernel sums (then it adds its partial cells)
#ifndef DEVIS_BIN_CHUNK
#define DEVIS_BIN_CHUNK 64
#endif
// entries whose grad_output rows a lane group of the value-gradient kernel loads at once, and that
#ifndef DEVIS_BIN_BATCH
#define DEVIS_BIN_BATCH 4
#endif
// kernel's minimum resident blocks per SM: DEVIS_BIN_MIN_BLOCKS for lanes of 4 channels (64
// registers), DEVIS_BIN_WIDE_MIN_BLOCKS for lanes of 8 (80 registers, no spills)
#ifndef DEVIS_BIN_MIN_BLOCKS
#define DEVIS_BIN_MIN_BLOCKS 4
#endif
#ifndef DEVIS_BIN_WIDE_MIN_BLOCKS
#define DEVIS_BIN_WIDE_MIN_BLOCKS 3
#endif
// 1: the value-gradient kernel's lanes take 8 channels (one 16-byte load) for the 16-bit types;
// 0: 4 channels for every dtype
#ifndef DEVIS_BIN_WIDE
#define DEVIS_BIN_WIDE 1
#endif

namespace {

constexpr int kMaxLevels = 32;   // W*L pseudo-levels of the official call pattern fit too
constexpr int kWarpsPerBlock = DEVIS_WARPS_PER_BLOCK;
constexpr int kThreads = 32 * kWarpsPerBlock;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kBinChunk = DEVIS_BIN_CHUNK;
constexpr int kBinBatch = DEVIS_BIN_BATCH;

// ---- one 16-byte vector of a dtype <-> C floats ----------------------------------------------------

template <typename T> struct Vec;

template <> struct Vec<float> {
  static constexpr int C = 4;
  __device__ __forceinline__ static void unpack(const uint4& r, float (&f)[C]) {
    f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[C]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
};

// Two halves of a 32-bit word <-> two floats, for the 16-bit types.
template <typename H2> struct Pair;
template <> struct Pair<__half2> {
  __device__ __forceinline__ static float2 get(unsigned u) {
    __half2 h = *reinterpret_cast<__half2*>(&u);
    return __half22float2(h);
  }
  __device__ __forceinline__ static unsigned put(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<unsigned*>(&h);
  }
};
template <> struct Pair<__nv_bfloat162> {
  __device__ __forceinline__ static float2 get(unsigned u) {
    // a bfloat16 is the upper half of a float: two shifts, no conversion instruction
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  }
  __device__ __forceinline__ static unsigned put(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<unsigned*>(&h);
  }
};

template <typename H2> struct Vec16 {
  static constexpr int C = 8;
  __device__ __forceinline__ static void unpack(const uint4& r, float (&f)[C]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 p = Pair<H2>::get(w[i]);
      f[2 * i] = p.x; f[2 * i + 1] = p.y;
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[C]) {
    return make_uint4(Pair<H2>::put(f[0], f[1]), Pair<H2>::put(f[2], f[3]), Pair<H2>::put(f[4], f[5]),
                      Pair<H2>::put(f[6], f[7]));
  }
};
template <> struct Vec<at::Half> : Vec16<__half2> {};
template <> struct Vec<at::BFloat16> : Vec16<__nv_bfloat162> {};

template <typename T> __device__ __forceinline__ uint4 load16(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// 4 consecutive channels as floats (16 bytes of float32, 8 of a 16-bit type)
__device__ __forceinline__ void load4(const float* p, float (&g)[4]) {
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
  g[0] = __uint_as_float(r.x); g[1] = __uint_as_float(r.y); g[2] = __uint_as_float(r.z); g[3] = __uint_as_float(r.w);
}
template <typename T> __device__ __forceinline__ void load4(const T* p, float (&g)[4]) {
  using H2 = std::conditional_t<std::is_same_v<T, at::Half>, __half2, __nv_bfloat162>;
  const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 a = Pair<H2>::get(r.x), b = Pair<H2>::get(r.y);
  g[0] = a.x; g[1] = a.y; g[2] = b.x; g[3] = b.y;
}

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }

__device__ __forceinline__ void atomic_add4(float* p, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(a, b, c, d));   // one 16-byte reduction (sm_90+)
#else
  atomicAdd(p, a); atomicAdd(p + 1, b); atomicAdd(p + 2, c); atomicAdd(p + 3, d);
#endif
}

struct Shape {
  int T, Q, S, M, L, Pc, W, Pt;
  int tile_step;   // query tiles are visited in the order k * tile_step mod (number of tiles)
  int num_bins;    // value-gradient cells allocated: T * M * (2 S + 2 L) >= T * M * sum (H_l+1)(W_l+1)
};

// Level sizes and starts; cell_start[l]: first value-gradient cell of level l within a (frame, head),
// whose level l owns (H_l + 1) * (W_l + 1) cells (top-left corners -1 .. W_l - 1 by -1 .. H_l - 1);
// cells: the cells of one (frame, head).
struct LevelTable {
  int h[kMaxLevels], w[kMaxLevels], start[kMaxLevels], cell_start[kMaxLevels];
  int cells;
};

// Callers __syncthreads() after it.
__device__ __forceinline__ void load_levels(LevelTable& tab, const int64_t* shapes,
                                            const int64_t* starts, int L) {
  if (threadIdx.x == 0) {
    int c = 0;
    for (int i = 0; i < L; ++i) {
      tab.h[i] = static_cast<int>(shapes[2 * i]);
      tab.w[i] = static_cast<int>(shapes[2 * i + 1]);
      tab.start[i] = static_cast<int>(starts[i]);
      tab.cell_start[i] = c;
      c += (tab.h[i] + 1) * (tab.w[i] + 1);
    }
    tab.cells = c;
  }
}

// Frame, level, normalised (x, y) and weight of sample `s` of a (t, q, m) row: current samples
// first, then temporal ones slot-major (the weight only when kWeight). Returns false past the end.
template <bool kWeight, typename scalar_t>
__device__ __forceinline__ bool sample_at(int s, int nc, int ns, int t, const Shape& sh, const scalar_t* lc,
                                          const scalar_t* ac, const scalar_t* lt, const scalar_t* at,
                                          const int64_t* frames, int& f, int& l, float& x, float& y, float& a) {
  if (s < nc) {
    x = to_f(lc[2 * s]); y = to_f(lc[2 * s + 1]); if constexpr (kWeight) a = to_f(ac[s]);
    f = t; l = s / sh.Pc;
    return true;
  }
  if (s >= ns) return false;
  const int j = s - nc;
  const int per_slot = sh.L * sh.Pt;
  const int w = j / per_slot;
  l = (j - w * per_slot) / sh.Pt;
  x = to_f(lt[2 * j]); y = to_f(lt[2 * j + 1]); if constexpr (kWeight) a = to_f(at[j]);
  f = static_cast<int>(frames[static_cast<int64_t>(t) * sh.W + w]);
  return true;
}

// Pixel position of (x, y) on a level of h x w: top-left corner and fractional part. False when no
// corner is on the map (the sample reads only padding, spec §2).
__device__ __forceinline__ bool corner_of(float x, float y, int h, int w, int& x0, int& y0, float& lx, float& ly) {
  const float px = x * w - 0.5f, py = y * h - 0.5f;
  if (!(px > -1.f && py > -1.f && px < w && py < h)) return false;
  x0 = static_cast<int>(floorf(px)); y0 = static_cast<int>(floorf(py));
  lx = px - x0; ly = py - y0;
  return true;
}

// Value-gradient cell of a sample of head m that reads frame f, level l at top-left corner (x0, y0);
// -1 past the allocation (unreachable when S = sum H_l W_l, which ms_deform_attn checks).
__device__ __forceinline__ int cell_of(const LevelTable& tab, const Shape& sh, int f, int m, int l, int x0, int y0) {
  const int c = (f * sh.M + m) * tab.cells + tab.cell_start[l] + (y0 + 1) * (tab.w[l] + 1) + (x0 + 1);
  return c < sh.num_bins ? c : -1;
}

// Footprint of one sample, computed once by the lane that owns the sample and then handed to the
// lanes that read it: offset (elements) of the top-left corner relative to the head's channel base,
// the row step packed with a 4-bit mask of corners on the map, the fractional position and weight.
struct Packed {
  int o00;
  int step_mask;     // (W_l * M * D) << 4 | corner mask (bit c: corner c on the map)
  float lx, ly, a;
};

// Sample `s` of a (t, q, m) row (order of sample_at). Also returns the level size (for the location
// gradient) and the sample's value-gradient cell (-1 when it reads only padding or is past the end).
// Samples past the end or off the map get mask 0.
template <typename scalar_t>
__device__ __forceinline__ Packed prepare(int s, int nc, int ns, int t, int m, const Shape& sh,
                                          const scalar_t* lc, const scalar_t* ac, const scalar_t* lt,
                                          const scalar_t* at, const int64_t* frames,
                                          const LevelTable& tab, int MD, float& wl, float& hl, int& cell) {
  Packed p{0, 0, 0.f, 0.f, 0.f};
  wl = 0.f; hl = 0.f; cell = -1;
  float x, y;
  int f, l;
  if (!sample_at<true>(s, nc, ns, t, sh, lc, ac, lt, at, frames, f, l, x, y, p.a)) return p;
  const int h = tab.h[l], w = tab.w[l];
  wl = static_cast<float>(w); hl = static_cast<float>(h);
  int x0, y0;
  if (!corner_of(x, y, h, w, x0, y0, p.lx, p.ly)) return p;
  cell = cell_of(tab, sh, f, m, l, x0, y0);
  const bool cx0 = x0 >= 0, cx1 = x0 + 1 < w, cy0 = y0 >= 0, cy1 = y0 + 1 < h;
  const int mask = (cy0 && cx0) | (cy0 && cx1) << 1 | (cy1 && cx0) << 2 | (cy1 && cx1) << 3;
  p.o00 = ((f * sh.S + tab.start[l]) + y0 * w + x0) * MD;
  p.step_mask = (w * MD) << 4 | mask;
  return p;
}

// What a reading lane needs of sample `src`: corner offsets, bilinear weights (times the attention
// weight when asked), the corner mask.
struct Corners {
  int off[4];
  float wt[4];
  float lx, ly;
  int mask;
};

__device__ __forceinline__ Corners receive(const Packed& p, int src, int MD, bool times_attn) {
  Corners c;
  const int o = __shfl_sync(kFull, p.o00, src);
  const int sm = __shfl_sync(kFull, p.step_mask, src);
  c.lx = __shfl_sync(kFull, p.lx, src);
  c.ly = __shfl_sync(kFull, p.ly, src);
  const float a = times_attn ? __shfl_sync(kFull, p.a, src) : 1.f;
  c.mask = sm & 15;
  const int step = sm >> 4;
  c.off[0] = o; c.off[1] = o + MD; c.off[2] = o + step; c.off[3] = o + step + MD;
  const float hx = 1.f - c.lx, hy = 1.f - c.ly;
  c.wt[0] = a * hy * hx; c.wt[1] = a * hy * c.lx; c.wt[2] = a * c.ly * hx; c.wt[3] = a * c.ly * c.lx;
  return c;
}

// Raw 16-byte corner vectors (zero where the corner is off the map); unpacked only when used, so
// the 16-bit types keep half the registers in flight.
template <typename scalar_t>
__device__ __forceinline__ void load_corners(const scalar_t* vhead, const Corners& c, uint4 (&v)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
    v[i] = (c.mask >> i & 1) ? load16(vhead + c.off[i]) : make_uint4(0u, 0u, 0u, 0u);
}

// A block holds kWarpsPerBlock neighbouring queries of one head (one warp each): in the encoder
// they are neighbouring pixels whose samples share cache lines, so they reuse each other's L1 lines.
// Consecutive blocks take tiles tile_step apart (coprime to the tile count, about 0.62 of it), so
// the blocks resident at one time are spread over the image rather than all reading (and, in the
// backward, adding to) the same few coarse-level pixels. Whether a launch swizzles is decided per
// kernel and dtype from H100 measurements (swizzle_tiles, ops/README.md); tile_step 1 is row order.
// Returns false for the padding warps of the last tile.
__device__ __forceinline__ bool locate_row(const Shape& sh, int warp_in_block, int& t, int& m, int64_t& row) {
  const int q_tiles = (sh.Q + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t b = blockIdx.x;                      // = (t * q_tiles + tile) * M + m
  m = static_cast<int>(b % sh.M);
  const int64_t tt = b / sh.M;
  const int tile = static_cast<int>((tt % q_tiles) * sh.tile_step % q_tiles);
  t = static_cast<int>(tt / q_tiles);
  const int q = tile * kWarpsPerBlock + warp_in_block;
  if (t >= sh.T || q >= sh.Q) return false;
  row = (static_cast<int64_t>(t) * sh.Q + q) * sh.M + m;
  return true;
}

// ---- forward --------------------------------------------------------------------------------------

// kCount: also count the samples per value-gradient cell into counts (when a backward follows; a
// separate instantiation so the inference forward carries none of it).
template <typename scalar_t, int D, bool kCount>
__global__ void __launch_bounds__(kThreads, DEVIS_FWD_MIN_BLOCKS)
temporal_msda_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                             const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc_c,
                             const scalar_t* __restrict__ attn_c, const scalar_t* __restrict__ loc_t,
                             const scalar_t* __restrict__ attn_t, const int64_t* __restrict__ frames,
                             scalar_t* __restrict__ out, int* __restrict__ counts, Shape sh) {
  using V = Vec<scalar_t>;
  constexpr int C = V::C;
  constexpr int G = D / C;         // lanes per sample
  constexpr int NG = 32 / G;       // sample groups per warp
  constexpr int B = DEVIS_FWD_BATCH < G ? DEVIS_FWD_BATCH : G;
  __shared__ LevelTable tab;
  load_levels(tab, shapes, starts, sh.L);
  __syncthreads();

  const int lane = threadIdx.x & 31, grp = lane / G, chan = (lane % G) * C;
  int t, m;
  int64_t row;
  if (!locate_row(sh, threadIdx.x / 32, t, m, row)) return;
  const int nc = sh.L * sh.Pc, nt = sh.W * sh.L * sh.Pt, ns = nc + nt;
  const int MD = sh.M * D;
  const scalar_t* lc = loc_c + row * nc * 2;
  const scalar_t* ac = attn_c + row * nc;
  const scalar_t* lt = nt ? loc_t + row * nt * 2 : nullptr;
  const scalar_t* at = nt ? attn_t + row * nt : nullptr;
  const scalar_t* vhead = value + m * D + chan;

  float acc[C];
#pragma unroll
  for (int j = 0; j < C; ++j) acc[j] = 0.f;
  for (int base = 0; base < ns; base += 32) {
    float wl, hl;
    int cell;
    const Packed mine = prepare(base + lane, nc, ns, t, m, sh, lc, ac, lt, at, frames, tab, MD, wl, hl, cell);
    // samples per value-gradient cell, for the backward's sort
    if constexpr (kCount) {
      if (cell >= 0) atomicAdd(counts + cell, 1);
    }
#pragma unroll
    for (int k0 = 0; k0 < G; k0 += B) {
      Corners c[B];
      uint4 v[B][4];
#pragma unroll
      for (int b = 0; b < B; ++b) {
        c[b] = receive(mine, (k0 + b) * NG + grp, MD, true);
        load_corners(vhead, c[b], v[b]);
      }
#pragma unroll
      for (int b = 0; b < B; ++b)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float f[C];
          V::unpack(v[b][i], f);
#pragma unroll
          for (int j = 0; j < C; ++j) acc[j] = fmaf(c[b].wt[i], f[j], acc[j]);
        }
    }
  }
  // fold the NG sample groups (lanes equal modulo G)
#pragma unroll
  for (int o = G; o < 32; o <<= 1)
#pragma unroll
    for (int j = 0; j < C; ++j) acc[j] += __shfl_xor_sync(kFull, acc[j], o);
  if (grp == 0) *reinterpret_cast<uint4*>(out + row * D + chan) = V::pack(acc);
}

// ---- backward -------------------------------------------------------------------------------------

// r[k][0..2] of every lane of a G-lane group -> lane j of the group holds sum over the group of
// r[j][0..2] in r[0][0..2]. Recursive halving: at step H a lane keeps the half of its first 2H
// entries selected by bit H of its index and adds the partner's copy of that half. H is a template
// argument so every register index is a compile-time constant (no local-memory array).
template <int H, int G>
__device__ __forceinline__ void transpose_reduce(float (&r)[G][3], int lane) {
  const bool upper = lane & H;
#pragma unroll
  for (int i = 0; i < H; ++i)
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const float send = upper ? r[i][k] : r[i + H][k];
      const float keep = upper ? r[i + H][k] : r[i][k];
      r[i][k] = keep + __shfl_xor_sync(kFull, send, H);
    }
  if constexpr (H > 1) transpose_reduce<H / 2, G>(r, lane);
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads, DEVIS_BWD_MIN_BLOCKS)
temporal_msda_backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                              const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc_c,
                              const scalar_t* __restrict__ attn_c, const scalar_t* __restrict__ loc_t,
                              const scalar_t* __restrict__ attn_t, const int64_t* __restrict__ frames,
                              const scalar_t* __restrict__ grad_out, int* __restrict__ cell_cursor,
                              float4* __restrict__ entries,
                              scalar_t* __restrict__ grad_loc_c, scalar_t* __restrict__ grad_attn_c,
                              scalar_t* __restrict__ grad_loc_t, scalar_t* __restrict__ grad_attn_t,
                              Shape sh) {
  using V = Vec<scalar_t>;
  constexpr int C = V::C;
  constexpr int G = D / C;
  constexpr int NG = 32 / G;
  constexpr int B = DEVIS_BWD_BATCH < G ? DEVIS_BWD_BATCH : G;
  __shared__ LevelTable tab;
  load_levels(tab, shapes, starts, sh.L);
  __syncthreads();

  const int lane = threadIdx.x & 31, grp = lane / G, chan = (lane % G) * C;
  int t, m;
  int64_t row;
  if (!locate_row(sh, threadIdx.x / 32, t, m, row)) return;
  const int nc = sh.L * sh.Pc, nt = sh.W * sh.L * sh.Pt, ns = nc + nt;
  const int MD = sh.M * D;
  const scalar_t* lc = loc_c + row * nc * 2;
  const scalar_t* ac = attn_c + row * nc;
  const scalar_t* lt = nt ? loc_t + row * nt * 2 : nullptr;
  const scalar_t* at = nt ? attn_t + row * nt : nullptr;
  const scalar_t* vhead = value + m * D + chan;
  float go[C];
  V::unpack(load16(grad_out + row * D + chan), go);

  for (int base = 0; base < ns; base += 32) {
    float wl, hl;
    int cell;
    const Packed mine = prepare(base + lane, nc, ns, t, m, sh, lc, ac, lt, at, frames, tab, MD, wl, hl, cell);
    // value gradient: the owner lane files its sample under its cell (see the head of the file)
    if (cell >= 0) {
      const int slot = atomicAdd(cell_cursor + cell, 1);
      entries[slot] = make_float4(__int_as_float(static_cast<int>(row)), mine.a, mine.lx, mine.ly);
    }
    float r[G][3];   // per sample handled: partial d/dpx, d/dpy (unscaled), d/da over this lane's channels
#pragma unroll
    for (int k0 = 0; k0 < G; k0 += B) {
      Corners c[B];
      uint4 v[B][4];
#pragma unroll
      for (int b = 0; b < B; ++b) {
        c[b] = receive(mine, (k0 + b) * NG + grp, MD, false);   // bilinear weights only: d/da
        load_corners(vhead, c[b], v[b]);
      }
#pragma unroll
      for (int b = 0; b < B; ++b) {
        float d[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float f[C];
          V::unpack(v[b][i], f);
          float s = 0.f;
#pragma unroll
          for (int j = 0; j < C; ++j) s = fmaf(go[j], f[j], s);
          d[i] = s;
        }
        const float hx = 1.f - c[b].lx, hy = 1.f - c[b].ly;
        r[k0 + b][0] = hy * (d[1] - d[0]) + c[b].ly * (d[3] - d[2]);
        r[k0 + b][1] = hx * (d[2] - d[0]) + c[b].lx * (d[3] - d[1]);
        r[k0 + b][2] = c[b].wt[0] * d[0] + c[b].wt[1] * d[1] + c[b].wt[2] * d[2] + c[b].wt[3] * d[3];
      }
    }
    transpose_reduce<G / 2, G>(r, lane);
    // this lane now holds the sums of sample `src` (handled by its group at step lane % G); its
    // owner lane supplies d pixel / d loc = (W_l, H_l) times the attention weight
    const int src = (lane % G) * NG + grp;
    const float sx = __shfl_sync(kFull, mine.a * wl, src);
    const float sy = __shfl_sync(kFull, mine.a * hl, src);
    const int s = base + src;
    if (s < nc) {
      grad_loc_c[row * nc * 2 + 2 * s] = from_f<scalar_t>(r[0][0] * sx);
      grad_loc_c[row * nc * 2 + 2 * s + 1] = from_f<scalar_t>(r[0][1] * sy);
      grad_attn_c[row * nc + s] = from_f<scalar_t>(r[0][2]);
    } else if (s < ns) {
      const int j = s - nc;
      grad_loc_t[row * nt * 2 + 2 * j] = from_f<scalar_t>(r[0][0] * sx);
      grad_loc_t[row * nt * 2 + 2 * j + 1] = from_f<scalar_t>(r[0][1] * sy);
      grad_attn_t[row * nt + j] = from_f<scalar_t>(r[0][2]);
    }
  }
}

// ---- value gradient by cells -------------------------------------------------------------------------

// The cell in [lo, hi] whose entries hold entry i: the first with cell_end > i. Tries the next
// cells first (the usual case in dense maps), then bisects: sparse inputs (the decoder's few queries)
// leave long runs of empty cells that a plain walk would step through one load at a time.
__device__ __forceinline__ int cell_holding(const int* __restrict__ cell_end, int i, int lo, int hi) {
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (lo >= hi || cell_end[lo] > i) return lo;
    ++lo;
  }
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (cell_end[mid] > i) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Adds a cell's four corner sums (this lane's 4 channels) to the float32 value gradient and clears them.
template <int CV>
__device__ __forceinline__ void add_cell(const LevelTable& tab, const Shape& sh, int cell, int D, int chan,
                                         float (&acc)[4][CV], float* __restrict__ grad_value) {
  const int fm = cell / tab.cells, r = cell - fm * tab.cells;
  const int f = fm / sh.M, m = fm - f * sh.M;
  int l = 0;
  while (l + 1 < sh.L && tab.cell_start[l + 1] <= r) ++l;
  const int h = tab.h[l], w = tab.w[l], k = r - tab.cell_start[l];
  const int y0 = k / (w + 1) - 1, x0 = k % (w + 1) - 1;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int x = x0 + (c & 1), y = y0 + (c >> 1);
    if (x >= 0 && x < w && y >= 0 && y < h) {
      const int64_t pix = static_cast<int64_t>(f) * sh.S + tab.start[l] + y * w + x;
      float* dst = grad_value + (pix * sh.M + m) * D + chan;
#pragma unroll
      for (int q = 0; q < CV; q += 4) atomic_add4(dst + q, acc[c][q], acc[c][q + 1], acc[c][q + 2], acc[c][q + 3]);
    }
#pragma unroll
    for (int j = 0; j < CV; ++j) acc[c][j] = 0.f;
  }
}

// Channels per lane of the value-gradient kernel: 4 for float32 (one 16-byte load), 8 for the 16-bit
// types (one 16-byte load; half the lanes per entry, so half the shuffles and weight arithmetic per
// entry: bfloat16 backward 1.99 -> 1.80 ms on an H100, ops/README.md).
template <typename scalar_t> constexpr int bin_channels() {
  return DEVIS_BIN_WIDE && sizeof(scalar_t) == 2 ? 8 : 4;
}
template <typename scalar_t> constexpr int bin_min_blocks() {
  return bin_channels<scalar_t>() == 8 ? DEVIS_BIN_WIDE_MIN_BLOCKS : DEVIS_BIN_MIN_BLOCKS;
}

// Value gradient from the sorted entries. A lane group of G = D/CV lanes (CV = bin_channels channels
// each) takes the kBinChunk entries [i0, i1) and sums corner rows in registers until the cell changes
// (cell_end, the inclusive prefix sums of the counts, says where: see cell_holding). Its lanes load
// NB entries at once (one each, coalesced) and pass them round by shuffle, so NB grad_output rows are
// in flight together; the next NB entries load while these are summed. Every lane runs the same
// number of steps (entries past the end are masked), which keeps the full-warp shuffles legal.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads, bin_min_blocks<scalar_t>())
value_grad_kernel(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                  const float4* __restrict__ entries, const int* __restrict__ cell_end, const scalar_t* __restrict__ grad_out,
                  float* __restrict__ grad_value, Shape sh) {
  constexpr int CV = bin_channels<scalar_t>();
  constexpr int G = D / CV;
  constexpr int NB = G < kBinBatch ? G : kBinBatch;
  static_assert(kBinChunk % NB == 0, "DEVIS_BIN_CHUNK must be a multiple of DEVIS_BIN_BATCH");
  __shared__ LevelTable tab;
  load_levels(tab, shapes, starts, sh.L);
  __syncthreads();
  const int lane = threadIdx.x & 31, j = lane % G, chan = j * CV;
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const int64_t total = cell_end[sh.num_bins - 1];
  const int64_t warp_first = (group - lane / G) * kBinChunk;
  if (warp_first >= total) return;                     // whole warps only
  const int64_t first = group * kBinChunk;
  const int i0 = static_cast<int>(first < total ? first : total);
  const int i1 = static_cast<int>(i0 + kBinChunk < total ? i0 + kBinChunk : total);
  float acc[4][CV];
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int k = 0; k < CV; ++k) acc[c][k] = 0.f;
  int cell = i0 < i1 ? cell_holding(cell_end, i0, 0, sh.num_bins - 1) : 0;
  int end = cell_end[cell];
  float4 e = make_float4(0.f, 0.f, 0.f, 0.f);
  if (j < NB && i0 + j < i1) e = entries[i0 + j];
  for (int i = i0; i < i0 + kBinChunk; i += NB) {
    float4 en = make_float4(0.f, 0.f, 0.f, 0.f);
    if (j < NB && i + NB + j < i1) en = entries[i + NB + j];
    // grad_output rows: CV = 4 channels as floats, or CV = 8 16-bit channels kept packed until used
    float g[CV == 4 ? NB : 1][4];
    uint4 raw[CV == 8 ? NB : 1];
#pragma unroll
    for (int k = 0; k < NB; ++k) {
      const int row = __float_as_int(__shfl_sync(kFull, e.x, k, G));
      if constexpr (CV == 4) {
        if (i + k < i1) load4(grad_out + static_cast<int64_t>(row) * D + chan, g[k]);
      } else {
        raw[k] = i + k < i1 ? load16(grad_out + static_cast<int64_t>(row) * D + chan) : make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int k = 0; k < NB; ++k) {
      const float a = __shfl_sync(kFull, e.y, k, G), lx = __shfl_sync(kFull, e.z, k, G);
      const float ly = __shfl_sync(kFull, e.w, k, G);
      if (i + k < i1) {
        if (i + k >= end) {
          add_cell(tab, sh, cell, D, chan, acc, grad_value);
          cell = cell_holding(cell_end, i + k, cell + 1, sh.num_bins - 1);
          end = cell_end[cell];
        }
        const float hx = 1.f - lx, hy = 1.f - ly;
        const float wc[4] = {a * hy * hx, a * hy * lx, a * ly * hx, a * ly * lx};
        float gk[CV];
        if constexpr (CV == 4) {
#pragma unroll
          for (int q = 0; q < 4; ++q) gk[q] = g[k][q];
        } else {
          Vec<scalar_t>::unpack(raw[k], gk);
        }
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
          for (int q = 0; q < CV; ++q) acc[c][q] = fmaf(wc[c], gk[q], acc[c][q]);
      }
    }
    e = en;
  }
  if (i0 < i1) add_cell(tab, sh, cell, D, chan, acc, grad_value);
}

// ---- host side ------------------------------------------------------------------------------------

// Integers (and devices) enter error messages as text: on the H100 machines (torch 2.11, nvcc 13,
// g++ 13) streaming an integer into a c10 message from nvcc-compiled host code crashed the process
// with SIGSEGV (reproduced with a minimal extension), while character strings were safe.
struct Text {
  char s[48];
};
Text txt(int64_t v) {
  Text t;
  std::snprintf(t.s, sizeof t.s, "%lld", static_cast<long long>(v));
  return t;
}

void check_tensor(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.is_cuda(), "temporal_msda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == like.device(), "temporal_msda: ", name, " is on ", x.device().str().c_str(),
              ", expected ", like.device().str().c_str());
  TORCH_CHECK(x.is_contiguous(), "temporal_msda: ", name, " must be contiguous");
}

// Stride between the query tiles of consecutive blocks (see locate_row): the first integer from
// 0.618 * n up that is coprime to n, so k -> k * step mod n visits every tile once; 1 (row order)
// when not swizzling.
int tile_step(int n, bool swizzle) {
  if (!swizzle || n <= 2) return 1;
  int step = static_cast<int>(0.618 * n);
  while (std::gcd(step, n) != 1) ++step;
  return step;
}

// Whether a launch visits its query tiles swizzled (DEVIS_TILE_SWIZZLE: 0 never, 2 always, 1 the
// measured policy). On an H100 (ops/README.md) the backwards ran faster in row order at the encoder
// shape (float32 2.39 against 2.63 ms, bfloat16 2.22 against 2.33 ms with the sorted value gradient),
// while the forwards were as fast or faster swizzled.
bool swizzle_tiles(bool backward, at::ScalarType st) {
  (void)st;
#if DEVIS_TILE_SWIZZLE == 0
  (void)backward;
  return false;
#elif DEVIS_TILE_SWIZZLE == 2
  (void)backward;
  return true;
#else
  return !backward;
#endif
}

Shape shape_of(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& loc_c,
               const at::Tensor& loc_t) {
  TORCH_CHECK(value.dim() == 4, "temporal_msda: value must be (T, S, M, D)");
  TORCH_CHECK(loc_c.dim() == 6, "temporal_msda: loc_current must be (T, Q, M, L, P_c, 2)");
  Shape sh;
  sh.T = value.size(0); sh.S = value.size(1); sh.M = value.size(2);
  sh.Q = loc_c.size(1); sh.L = loc_c.size(3); sh.Pc = loc_c.size(4);
  sh.W = loc_t.numel() ? loc_t.size(3) : 0;
  sh.Pt = loc_t.numel() ? loc_t.size(5) : 0;
  sh.tile_step = 1;   // set per launch (swizzle_tiles)
  sh.num_bins = 0;    // set when counting or sorting (bind_counts)
  TORCH_CHECK(shapes.size(0) == sh.L, "temporal_msda: spatial_shapes has ", txt(shapes.size(0)).s,
              " levels, loc_current has ", txt(sh.L).s);
  TORCH_CHECK(sh.L <= kMaxLevels, "temporal_msda: at most ", txt(kMaxLevels).s, " levels, got ", txt(sh.L).s);
  // corner offsets are 32-bit (they travel between lanes by shuffle)
  TORCH_CHECK(value.numel() < (int64_t{1} << 31), "temporal_msda: value has ", txt(value.numel()).s,
              " elements, the kernel addresses at most 2^31 - 1");
  return sh;
}

// Value-gradient cells of a clip: (H_l + 1)(W_l + 1) <= 2 H_l W_l + 2, so 2 S + 2 L cells per
// (frame, head) hold every level's.
int64_t num_cells(int64_t T, int64_t S, int64_t M, int64_t L) { return T * M * (2 * S + 2 * L); }

// Checks the count buffer (int32, one per cell of num_cells) and records its size in sh.num_bins.
void bind_counts(const at::Tensor& counts, const at::Tensor& value, Shape& sh) {
  check_tensor(counts, "counts", value);
  const int64_t cells = num_cells(sh.T, sh.S, sh.M, sh.L);
  TORCH_CHECK(counts.scalar_type() == at::kInt && counts.dim() == 1 && counts.numel() == cells,
              "temporal_msda: counts must be int32 of shape (", txt(cells).s, ",) = num_cells(T, S, M, L), got ",
              c10::toString(counts.scalar_type()), " with ", txt(counts.dim()).s, " dims and ",
              txt(counts.numel()).s, " elements");
  TORCH_CHECK(cells < (int64_t{1} << 31), "temporal_msda: ", txt(cells).s,
              " value-gradient cells; the kernel indexes at most 2^31 - 1");
  sh.num_bins = static_cast<int>(cells);
}

using Named = std::pair<const at::Tensor*, const char*>;

void check_all(std::initializer_list<Named> xs, const at::Tensor& like) {
  for (const auto& x : xs) check_tensor(*x.first, x.second, like);
}

// Calls f(scalar tag, head dim D) for the supported dtypes and head dims.
template <typename F>
void dispatch(at::ScalarType st, int64_t D, F&& f) {
  auto by_dim = [&](auto tag) {
    switch (D) {
      case 16: f(tag, std::integral_constant<int, 16>{}); break;
      case 32: f(tag, std::integral_constant<int, 32>{}); break;
      case 64: f(tag, std::integral_constant<int, 64>{}); break;
      default: TORCH_CHECK(false, "temporal_msda: head dim D must be 16, 32 or 64, got ", txt(D).s);
    }
  };
  switch (st) {
    case at::kFloat: by_dim(float{}); break;
    case at::kHalf: by_dim(at::Half{}); break;
    case at::kBFloat16: by_dim(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "temporal_msda: value must be float32, float16 or bfloat16, got ", c10::toString(st));
  }
}

// An output buffer: uninitialised, or filled with `poison` (tests: an unwritten element shows).
at::Tensor output(at::IntArrayRef size, const at::TensorOptions& opt, std::optional<double> poison) {
  return poison ? at::full(size, *poison, opt) : at::empty(size, opt);
}

// Returns (out (T, Q, M*D) in value's dtype, counts): with count_cells, counts (int32, num_cells)
// holds the samples per value-gradient cell, which the backward needs; otherwise it is empty.
// Buffers are allocated here rather than in Python: each Python-side allocation cost several
// microseconds of host time, during which the GPU waits in front of a sub-millisecond kernel.
std::vector<at::Tensor> forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                const at::Tensor& loc_c, const at::Tensor& attn_c, const at::Tensor& loc_t,
                                const at::Tensor& attn_t, const at::Tensor& frames, bool count_cells,
                                std::optional<double> poison) {
  check_all({{&shapes, "spatial_shapes"}, {&starts, "level_start_index"}, {&loc_c, "loc_current"},
             {&attn_c, "attn_current"}}, value);
  check_tensor(value, "value", value);
  Shape sh = shape_of(value, shapes, loc_c, loc_t);
  if (sh.W) {
    check_all({{&loc_t, "loc_temporal"}, {&attn_t, "attn_temporal"}, {&frames, "temporal_frames"}}, value);
  }
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = output({sh.T, sh.Q, sh.M * value.size(3)}, value.options(), poison);
  at::Tensor counts = count_cells ? at::zeros({num_cells(sh.T, sh.S, sh.M, sh.L)}, value.options().dtype(at::kInt))
                                  : at::empty({0}, value.options().dtype(at::kInt));
  if (count_cells) bind_counts(counts, value, sh);
  const int64_t rows = static_cast<int64_t>(sh.T) * sh.Q * sh.M;
  if (rows == 0) return {out, counts};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t q_tiles = (sh.Q + kWarpsPerBlock - 1) / kWarpsPerBlock;
  sh.tile_step = tile_step(static_cast<int>(q_tiles), swizzle_tiles(false, value.scalar_type()));
  const dim3 grid(static_cast<unsigned>(sh.T * q_tiles * sh.M));
  dispatch(value.scalar_type(), value.size(3), [&](auto tag, auto g) {
      using scalar_t = decltype(tag);
      constexpr int D = decltype(g)::value;
      auto kernel = count_cells ? temporal_msda_forward_kernel<scalar_t, D, true>
                                : temporal_msda_forward_kernel<scalar_t, D, false>;
      kernel<<<grid, kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc_c.data_ptr<scalar_t>(), attn_c.data_ptr<scalar_t>(),
          sh.W ? loc_t.data_ptr<scalar_t>() : nullptr, sh.W ? attn_t.data_ptr<scalar_t>() : nullptr,
          sh.W ? frames.data_ptr<int64_t>() : nullptr, out.data_ptr<scalar_t>(),
          count_cells ? counts.data_ptr<int>() : nullptr, sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, counts};
}

// Returns the gradients (value, loc_current, attn_current, loc_temporal, attn_temporal), each in
// its input's dtype and shape, given grad_out (T, Q, M*D) and the forward's counts. The value
// gradient accumulates in float32 for every dtype: a cell's sums from several chunks meet in it,
// and an encoder pixel gathers hundreds of terms, too many to add in half or bfloat16.
std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                 const at::Tensor& loc_c, const at::Tensor& attn_c, const at::Tensor& loc_t,
                                 const at::Tensor& attn_t, const at::Tensor& frames, const at::Tensor& grad_out,
                                 const at::Tensor& counts, std::optional<double> poison) {
  check_all({{&shapes, "spatial_shapes"}, {&starts, "level_start_index"}, {&loc_c, "loc_current"},
             {&attn_c, "attn_current"}, {&grad_out, "grad_output"}}, value);
  check_tensor(value, "value", value);
  TORCH_CHECK(grad_out.scalar_type() == value.scalar_type(), "temporal_msda: grad_output must have value's dtype ",
              c10::toString(value.scalar_type()), ", got ", c10::toString(grad_out.scalar_type()));
  Shape sh = shape_of(value, shapes, loc_c, loc_t);
  if (sh.W) {
    check_all({{&loc_t, "loc_temporal"}, {&attn_t, "attn_temporal"}, {&frames, "temporal_frames"}}, value);
  }
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(at::kFloat));
  at::Tensor grad_loc_c = output(loc_c.sizes(), loc_c.options(), poison);
  at::Tensor grad_attn_c = output(attn_c.sizes(), attn_c.options(), poison);
  at::Tensor grad_loc_t = output(loc_t.sizes(), loc_t.options(), poison);
  at::Tensor grad_attn_t = output(attn_t.sizes(), attn_t.options(), poison);
  const int64_t rows = static_cast<int64_t>(sh.T) * sh.Q * sh.M;
  if (rows == 0) return {grad_value.to(value.scalar_type()), grad_loc_c, grad_attn_c, grad_loc_t, grad_attn_t};
  const int64_t samples = rows * (sh.L * sh.Pc + sh.W * sh.L * sh.Pt);
  TORCH_CHECK(samples < (int64_t{1} << 31), "temporal_msda: ", txt(samples).s,
              " samples; the backward indexes at most 2^31 - 1");
  bind_counts(counts, value, sh);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t q_tiles = (sh.Q + kWarpsPerBlock - 1) / kWarpsPerBlock;
  sh.tile_step = tile_step(static_cast<int>(q_tiles), swizzle_tiles(true, value.scalar_type()));
  const dim3 grid(static_cast<unsigned>(sh.T * q_tiles * sh.M));
  // Workspace: the cells' prefix sums and cursors (int32 each), one 16-byte entry per sample.
  at::Tensor cell_end = at::cumsum(counts, 0, at::kInt);
  at::Tensor cursor = cell_end - counts;             // next free entry of each cell
  at::Tensor entries = at::empty({samples, 4}, value.options().dtype(at::kFloat));
  dispatch(value.scalar_type(), value.size(3), [&](auto tag, auto g) {
      using scalar_t = decltype(tag);
      constexpr int D = decltype(g)::value;
      const scalar_t* lt = sh.W ? loc_t.data_ptr<scalar_t>() : nullptr;
      const int64_t* fr = sh.W ? frames.data_ptr<int64_t>() : nullptr;
      scalar_t* glt = sh.W ? grad_loc_t.data_ptr<scalar_t>() : nullptr;
      temporal_msda_backward_kernel<scalar_t, D><<<grid, kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc_c.data_ptr<scalar_t>(), attn_c.data_ptr<scalar_t>(), lt,
          sh.W ? attn_t.data_ptr<scalar_t>() : nullptr, fr, grad_out.data_ptr<scalar_t>(),
          cursor.data_ptr<int>(), reinterpret_cast<float4*>(entries.data_ptr<float>()),
          grad_loc_c.data_ptr<scalar_t>(), grad_attn_c.data_ptr<scalar_t>(),
          glt, sh.W ? grad_attn_t.data_ptr<scalar_t>() : nullptr, sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // one lane group of D/4 lanes per kBinChunk entries (warps past the filled entries return at once)
      const int64_t threads = (samples + kBinChunk - 1) / kBinChunk * (D / bin_channels<scalar_t>());
      value_grad_kernel<scalar_t, D><<<static_cast<unsigned>((threads + kThreads - 1) / kThreads), kThreads, 0,
                                       stream>>>(
          shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          reinterpret_cast<const float4*>(entries.data_ptr<float>()), cell_end.data_ptr<int>(),
          grad_out.data_ptr<scalar_t>(), grad_value.data_ptr<float>(), sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value.to(value.scalar_type()), grad_loc_c, grad_attn_c, grad_loc_t, grad_attn_t};
}

}  // namespace

// The build passes -DDEVIS_SOURCE_HASH=h<sha256 of this file> so a stale prebuilt module is spotted.
#ifndef DEVIS_SOURCE_HASH
#define DEVIS_SOURCE_HASH unknown
#endif
#define DEVIS_STR2(x) #x
#define DEVIS_STR(x) DEVIS_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DeVIS temporal multi-scale deformable attention (fused CUDA kernel)";
  m.attr("source_hash") = DEVIS_STR(DEVIS_SOURCE_HASH);
  // binding generation: 3 = the forward counts the value-gradient cells for the backward, and both
  // allocate their outputs
  m.attr("api") = 3;
  m.def("num_cells", &num_cells, "value-gradient cells of a clip (size of the count buffer)",
        py::arg("T"), py::arg("S"), py::arg("M"), py::arg("L"));
  m.def("forward", &forward,
        "fused forward; returns (out (T, Q, M*D), counts): with count_cells, counts (int32, num_cells) "
        "holds the samples per value-gradient cell for the backward, else it is empty; poison fills "
        "out before the kernel runs (tests)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("loc_current"),
        py::arg("attn_current"), py::arg("loc_temporal"), py::arg("attn_temporal"), py::arg("temporal_frames"),
        py::arg("count_cells"), py::arg("poison") = py::none());
  m.def("backward", &backward,
        "fused backward given grad_output and the forward's counts; returns the gradients of value, "
        "loc_current, attn_current, loc_temporal, attn_temporal (poison fills the last four first)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("loc_current"),
        py::arg("attn_current"), py::arg("loc_temporal"), py::arg("attn_temporal"), py::arg("temporal_frames"),
        py::arg("grad_output"), py::arg("counts"), py::arg("poison") = py::none());
}
