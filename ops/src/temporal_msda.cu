// Temporal multi-scale deformable attention: one fused launch per clip (forward and backward).
//
// Semantics are those of devis_core/attention.py::ms_deform_attn_reference (spec §2-§3): every
// (frame t, query q, head m) reads L*P_c bilinear samples of its own frame and W*L*P_t samples of
// the frames temporal_frames[t, w], addressing them by index in the (T, S, M, D) value tensor, so no
// per-frame loop and no gathered copy of the other frames exist.
//
// Work split: one warp per (t, q, m). A lane holds 4 consecutive channels, so G = D/4 lanes cover
// one head and a warp treats 32/G samples at once; lanes first load 32 samples' (x, y, weight)
// coalesced and hand them to the sample groups by shuffle. Accumulation is always float32.
// Backward: value gradients by (vector) atomics into a float32 buffer; location and weight
// gradients by shuffle reductions inside the group, staged in shared memory so the stores of a
// 32-sample chunk are coalesced.
//
// Kept in one translation unit (bindings included) so the JIT build compiles a single file.

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kMaxLevels = 32;   // W*L pseudo-levels of the official call pattern fit too
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = 32 * kWarpsPerBlock;
constexpr unsigned kFull = 0xffffffffu;

// ---- four channels of one dtype <-> float4 ------------------------------------------------------

template <typename T> struct Quad;

template <> struct Quad<float> {
  __device__ __forceinline__ static float4 load(const float* p) {
    return __ldg(reinterpret_cast<const float4*>(p));
  }
  __device__ __forceinline__ static void store(float* p, float4 v) {
    *reinterpret_cast<float4*>(p) = v;
  }
};

template <> struct Quad<at::Half> {
  __device__ __forceinline__ static float4 load(const at::Half* p) {
    uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    float2 a = __half22float2(*reinterpret_cast<__half2*>(&raw.x));
    float2 b = __half22float2(*reinterpret_cast<__half2*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
  }
  __device__ __forceinline__ static void store(at::Half* p, float4 v) {
    __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
    uint2 raw;
    raw.x = *reinterpret_cast<unsigned*>(&a);
    raw.y = *reinterpret_cast<unsigned*>(&b);
    *reinterpret_cast<uint2*>(p) = raw;
  }
};

template <> struct Quad<at::BFloat16> {
  __device__ __forceinline__ static float4 load(const at::BFloat16* p) {
    uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    float2 a = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.x));
    float2 b = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
  }
  __device__ __forceinline__ static void store(at::BFloat16* p, float4 v) {
    __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    uint2 raw;
    raw.x = *reinterpret_cast<unsigned*>(&a);
    raw.y = *reinterpret_cast<unsigned*>(&b);
    *reinterpret_cast<uint2*>(p) = raw;
  }
};

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }

__device__ __forceinline__ void atomic_add4(float* p, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), v);   // one 16-byte reduction (sm_90+)
#else
  atomicAdd(p, v.x); atomicAdd(p + 1, v.y); atomicAdd(p + 2, v.z); atomicAdd(p + 3, v.w);
#endif
}

__device__ __forceinline__ void fma4(float4& acc, float w, float4 v) {
  acc.x = fmaf(w, v.x, acc.x); acc.y = fmaf(w, v.y, acc.y);
  acc.z = fmaf(w, v.z, acc.z); acc.w = fmaf(w, v.w, acc.w);
}

__device__ __forceinline__ float dot4(float4 a, float4 b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

struct Shape {
  int T, Q, S, M, L, Pc, W, Pt;
};

struct LevelTable {
  int h[kMaxLevels], w[kMaxLevels], start[kMaxLevels];
};

__device__ __forceinline__ void load_levels(LevelTable& tab, const int64_t* shapes,
                                            const int64_t* starts, int L) {
  for (int i = threadIdx.x; i < L; i += blockDim.x) {
    tab.h[i] = static_cast<int>(shapes[2 * i]);
    tab.w[i] = static_cast<int>(shapes[2 * i + 1]);
    tab.start[i] = static_cast<int>(starts[i]);
  }
}

// Footprint of one sample, computed once by the lane that owns the sample and then handed to the
// lanes that read it: offset (elements) of the top-left corner relative to the head's channel base,
// the row step packed with a 4-bit mask of corners on the map, the fractional position and weight.
struct Packed {
  int o00;
  int step_mask;     // (W_l * M * D) << 4 | corner mask (bit c: corner c on the map)
  float lx, ly, a;
};

// Sample `s` of a (t, q, m) row: current samples first, then temporal ones slot-major. Also returns
// the level size (for the location gradient). Samples past the end or off the map get mask 0.
template <typename scalar_t>
__device__ __forceinline__ Packed prepare(int s, int nc, int ns, int t, const Shape& sh,
                                          const scalar_t* lc, const scalar_t* ac, const scalar_t* lt,
                                          const scalar_t* at, const int64_t* frames,
                                          const LevelTable& tab, int MD, float& wl, float& hl) {
  Packed p{0, 0, 0.f, 0.f, 0.f};
  wl = 0.f; hl = 0.f;
  float x, y;
  int f, l;
  if (s < nc) {
    x = to_f(lc[2 * s]); y = to_f(lc[2 * s + 1]); p.a = to_f(ac[s]);
    f = t; l = s / sh.Pc;
  } else if (s < ns) {
    const int j = s - nc;
    const int per_slot = sh.L * sh.Pt;
    const int w = j / per_slot;
    l = (j - w * per_slot) / sh.Pt;
    x = to_f(lt[2 * j]); y = to_f(lt[2 * j + 1]); p.a = to_f(at[j]);
    f = static_cast<int>(frames[static_cast<int64_t>(t) * sh.W + w]);
  } else {
    return p;
  }
  const int h = tab.h[l], w = tab.w[l];
  wl = static_cast<float>(w); hl = static_cast<float>(h);
  const float px = x * w - 0.5f, py = y * h - 0.5f;
  // a sample with no corner on the map reads only padding (spec §2)
  if (!(px > -1.f && py > -1.f && px < w && py < h)) return p;
  const int x0 = static_cast<int>(floorf(px)), y0 = static_cast<int>(floorf(py));
  p.lx = px - x0; p.ly = py - y0;
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

template <typename scalar_t>
__device__ __forceinline__ void load_corners(const scalar_t* vhead, const Corners& c, float4 (&v)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
    v[i] = (c.mask >> i & 1) ? Quad<scalar_t>::load(vhead + c.off[i]) : make_float4(0.f, 0.f, 0.f, 0.f);
}

// A block holds kWarpsPerBlock neighbouring queries of one head (one warp each): in the encoder
// they are neighbouring pixels whose samples share cache lines, so they reuse each other's L1 lines.
// Returns false for the padding warps of the last query tile.
__device__ __forceinline__ bool locate_row(const Shape& sh, int warp_in_block, int& t, int& m, int64_t& row) {
  const int q_tiles = (sh.Q + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t b = blockIdx.x;                      // = (t * q_tiles + tile) * M + m
  m = static_cast<int>(b % sh.M);
  const int64_t tt = b / sh.M;
  const int tile = static_cast<int>(tt % q_tiles);
  t = static_cast<int>(tt / q_tiles);
  const int q = tile * kWarpsPerBlock + warp_in_block;
  if (t >= sh.T || q >= sh.Q) return false;
  row = (static_cast<int64_t>(t) * sh.Q + q) * sh.M + m;
  return true;
}

// ---- forward --------------------------------------------------------------------------------------

constexpr int kBatch = 2;   // samples whose corner loads one lane group issues together

template <typename scalar_t, int G>
__global__ void __launch_bounds__(kThreads)
temporal_msda_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                             const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc_c,
                             const scalar_t* __restrict__ attn_c, const scalar_t* __restrict__ loc_t,
                             const scalar_t* __restrict__ attn_t, const int64_t* __restrict__ frames,
                             scalar_t* __restrict__ out, Shape sh) {
  constexpr int D = 4 * G;
  constexpr int NG = 32 / G;   // sample groups per warp
  __shared__ LevelTable tab;
  load_levels(tab, shapes, starts, sh.L);
  __syncthreads();

  const int lane = threadIdx.x & 31, grp = lane / G, chan = (lane % G) * 4;
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

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int base = 0; base < ns; base += 32) {
    float wl, hl;
    const Packed mine = prepare(base + lane, nc, ns, t, sh, lc, ac, lt, at, frames, tab, MD, wl, hl);
#pragma unroll
    for (int k0 = 0; k0 < G; k0 += kBatch) {
      Corners c[kBatch];
      float4 v[kBatch][4];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        c[b] = receive(mine, (k0 + b) * NG + grp, MD, true);
        load_corners(vhead, c[b], v[b]);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
#pragma unroll
        for (int i = 0; i < 4; ++i) fma4(acc, c[b].wt[i], v[b][i]);
    }
  }
  // fold the NG sample groups (lanes equal modulo G)
#pragma unroll
  for (int o = G; o < 32; o <<= 1) {
    acc.x += __shfl_xor_sync(kFull, acc.x, o); acc.y += __shfl_xor_sync(kFull, acc.y, o);
    acc.z += __shfl_xor_sync(kFull, acc.z, o); acc.w += __shfl_xor_sync(kFull, acc.w, o);
  }
  if (grp == 0) Quad<scalar_t>::store(out + row * D + chan, acc);
}

// ---- backward -------------------------------------------------------------------------------------

template <typename scalar_t, int G>
__global__ void __launch_bounds__(kThreads)
temporal_msda_backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                              const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc_c,
                              const scalar_t* __restrict__ attn_c, const scalar_t* __restrict__ loc_t,
                              const scalar_t* __restrict__ attn_t, const int64_t* __restrict__ frames,
                              const scalar_t* __restrict__ grad_out, float* __restrict__ grad_value,
                              scalar_t* __restrict__ grad_loc_c, scalar_t* __restrict__ grad_attn_c,
                              scalar_t* __restrict__ grad_loc_t, scalar_t* __restrict__ grad_attn_t,
                              Shape sh) {
  constexpr int D = 4 * G;
  constexpr int NG = 32 / G;
  __shared__ LevelTable tab;
  __shared__ float3 stage[kWarpsPerBlock][32];   // per sample of a chunk: d/dpx, d/dpy, d/da
  load_levels(tab, shapes, starts, sh.L);
  __syncthreads();

  const int lane = threadIdx.x & 31, grp = lane / G, chan = (lane % G) * 4;
  const int wib = threadIdx.x / 32;
  int t, m;
  int64_t row;
  if (!locate_row(sh, wib, t, m, row)) return;
  const int nc = sh.L * sh.Pc, nt = sh.W * sh.L * sh.Pt, ns = nc + nt;
  const int MD = sh.M * D;
  const scalar_t* lc = loc_c + row * nc * 2;
  const scalar_t* ac = attn_c + row * nc;
  const scalar_t* lt = nt ? loc_t + row * nt * 2 : nullptr;
  const scalar_t* at = nt ? attn_t + row * nt : nullptr;
  const scalar_t* vhead = value + m * D + chan;
  float* ghead = grad_value + m * D + chan;
  const float4 go = Quad<scalar_t>::load(grad_out + row * D + chan);

  for (int base = 0; base < ns; base += 32) {
    float wl, hl;
    const Packed mine = prepare(base + lane, nc, ns, t, sh, lc, ac, lt, at, frames, tab, MD, wl, hl);
#pragma unroll
    for (int k0 = 0; k0 < G; k0 += kBatch) {
      Corners c[kBatch];
      float4 v[kBatch][4];
      float a[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int src = (k0 + b) * NG + grp;
        c[b] = receive(mine, src, MD, false);
        a[b] = __shfl_sync(kFull, mine.a, src);
        load_corners(vhead, c[b], v[b]);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const float d0 = dot4(go, v[b][0]), d1 = dot4(go, v[b][1]);
        const float d2 = dot4(go, v[b][2]), d3 = dot4(go, v[b][3]);
        const float hx = 1.f - c[b].lx, hy = 1.f - c[b].ly;
        float ga = c[b].wt[0] * d0 + c[b].wt[1] * d1 + c[b].wt[2] * d2 + c[b].wt[3] * d3;
        // d sample / d pixel; the owner lane scales by the weight and (W_l, H_l) = d pixel / d loc
        float gx = hy * (d1 - d0) + c[b].ly * (d3 - d2);
        float gy = hx * (d2 - d0) + c[b].lx * (d3 - d1);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (c[b].mask >> i & 1) {
            const float wc = a[b] * c[b].wt[i];
            atomic_add4(ghead + c[b].off[i], make_float4(wc * go.x, wc * go.y, wc * go.z, wc * go.w));
          }
        }
        // the group's lanes each hold a partial dot over 4 channels: sum them
#pragma unroll
        for (int o = 1; o < G; o <<= 1) {
          gx += __shfl_xor_sync(kFull, gx, o);
          gy += __shfl_xor_sync(kFull, gy, o);
          ga += __shfl_xor_sync(kFull, ga, o);
        }
        if (lane % G == 0) stage[wib][(k0 + b) * NG + grp] = make_float3(gx, gy, ga);
      }
    }
    __syncwarp();
    const float3 r = stage[wib][lane];
    const float sx = mine.a * wl, sy = mine.a * hl;
    const int s = base + lane;
    if (s < nc) {
      grad_loc_c[row * nc * 2 + 2 * s] = from_f<scalar_t>(r.x * sx);
      grad_loc_c[row * nc * 2 + 2 * s + 1] = from_f<scalar_t>(r.y * sy);
      grad_attn_c[row * nc + s] = from_f<scalar_t>(r.z);
    } else if (s < ns) {
      const int j = s - nc;
      grad_loc_t[row * nt * 2 + 2 * j] = from_f<scalar_t>(r.x * sx);
      grad_loc_t[row * nt * 2 + 2 * j + 1] = from_f<scalar_t>(r.y * sy);
      grad_attn_t[row * nt + j] = from_f<scalar_t>(r.z);
    }
    __syncwarp();
  }
}

// ---- host side ------------------------------------------------------------------------------------

void check_tensor(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.is_cuda(), "temporal_msda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == like.device(), "temporal_msda: ", name, " is on ", x.device(),
              ", expected ", like.device());
  TORCH_CHECK(x.is_contiguous(), "temporal_msda: ", name, " must be contiguous");
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
  TORCH_CHECK(shapes.size(0) == sh.L, "temporal_msda: spatial_shapes has ", shapes.size(0),
              " levels, loc_current has ", sh.L);
  TORCH_CHECK(sh.L <= kMaxLevels, "temporal_msda: at most ", kMaxLevels, " levels, got ", sh.L);
  // corner offsets are 32-bit (they travel between lanes by shuffle)
  TORCH_CHECK(value.numel() < (int64_t{1} << 31), "temporal_msda: value has ", value.numel(),
              " elements, the kernel addresses at most 2^31 - 1");
  return sh;
}

using Named = std::pair<const at::Tensor*, const char*>;

void check_all(std::initializer_list<Named> xs, const at::Tensor& like) {
  for (const auto& x : xs) check_tensor(*x.first, x.second, like);
}

// Calls f(scalar tag, group width G) for the supported dtypes and head dims.
template <typename F>
void dispatch(at::ScalarType st, int64_t D, F&& f) {
  auto by_dim = [&](auto tag) {
    switch (D) {
      case 16: f(tag, std::integral_constant<int, 4>{}); break;
      case 32: f(tag, std::integral_constant<int, 8>{}); break;
      case 64: f(tag, std::integral_constant<int, 16>{}); break;
      default: TORCH_CHECK(false, "temporal_msda: head dim D must be 16, 32 or 64, got ", D);
    }
  };
  switch (st) {
    case at::kFloat: by_dim(float{}); break;
    case at::kHalf: by_dim(at::Half{}); break;
    case at::kBFloat16: by_dim(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "temporal_msda: value must be float32, float16 or bfloat16, got ", st);
  }
}

void forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
             const at::Tensor& loc_c, const at::Tensor& attn_c, const at::Tensor& loc_t,
             const at::Tensor& attn_t, const at::Tensor& frames, at::Tensor& out) {
  check_all({{&shapes, "spatial_shapes"}, {&starts, "level_start_index"}, {&loc_c, "loc_current"},
             {&attn_c, "attn_current"}, {&out, "out"}}, value);
  check_tensor(value, "value", value);
  const Shape sh = shape_of(value, shapes, loc_c, loc_t);
  if (sh.W) {
    check_all({{&loc_t, "loc_temporal"}, {&attn_t, "attn_temporal"}, {&frames, "temporal_frames"}}, value);
  }
  const int64_t rows = static_cast<int64_t>(sh.T) * sh.Q * sh.M;
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(value.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t q_tiles = (sh.Q + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const dim3 grid(static_cast<unsigned>(sh.T * q_tiles * sh.M));
  dispatch(value.scalar_type(), value.size(3), [&](auto tag, auto g) {
      using scalar_t = decltype(tag);
      constexpr int G = decltype(g)::value;
      temporal_msda_forward_kernel<scalar_t, G><<<grid, kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc_c.data_ptr<scalar_t>(), attn_c.data_ptr<scalar_t>(),
          sh.W ? loc_t.data_ptr<scalar_t>() : nullptr, sh.W ? attn_t.data_ptr<scalar_t>() : nullptr,
          sh.W ? frames.data_ptr<int64_t>() : nullptr, out.data_ptr<scalar_t>(), sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
              const at::Tensor& loc_c, const at::Tensor& attn_c, const at::Tensor& loc_t,
              const at::Tensor& attn_t, const at::Tensor& frames, const at::Tensor& grad_out,
              at::Tensor& grad_value, at::Tensor& grad_loc_c, at::Tensor& grad_attn_c,
              at::Tensor& grad_loc_t, at::Tensor& grad_attn_t) {
  check_all({{&shapes, "spatial_shapes"}, {&starts, "level_start_index"}, {&loc_c, "loc_current"},
             {&attn_c, "attn_current"}, {&grad_out, "grad_output"}, {&grad_value, "grad_value"},
             {&grad_loc_c, "grad_loc_current"}, {&grad_attn_c, "grad_attn_current"}}, value);
  check_tensor(value, "value", value);
  TORCH_CHECK(grad_value.scalar_type() == at::kFloat, "temporal_msda: grad_value buffer must be float32");
  const Shape sh = shape_of(value, shapes, loc_c, loc_t);
  if (sh.W) {
    check_all({{&loc_t, "loc_temporal"}, {&attn_t, "attn_temporal"}, {&frames, "temporal_frames"},
               {&grad_loc_t, "grad_loc_temporal"}, {&grad_attn_t, "grad_attn_temporal"}}, value);
  }
  const int64_t rows = static_cast<int64_t>(sh.T) * sh.Q * sh.M;
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(value.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t q_tiles = (sh.Q + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const dim3 grid(static_cast<unsigned>(sh.T * q_tiles * sh.M));
  dispatch(value.scalar_type(), value.size(3), [&](auto tag, auto g) {
      using scalar_t = decltype(tag);
      constexpr int G = decltype(g)::value;
      temporal_msda_backward_kernel<scalar_t, G><<<grid, kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc_c.data_ptr<scalar_t>(), attn_c.data_ptr<scalar_t>(),
          sh.W ? loc_t.data_ptr<scalar_t>() : nullptr, sh.W ? attn_t.data_ptr<scalar_t>() : nullptr,
          sh.W ? frames.data_ptr<int64_t>() : nullptr, grad_out.data_ptr<scalar_t>(),
          grad_value.data_ptr<float>(), grad_loc_c.data_ptr<scalar_t>(), grad_attn_c.data_ptr<scalar_t>(),
          sh.W ? grad_loc_t.data_ptr<scalar_t>() : nullptr, sh.W ? grad_attn_t.data_ptr<scalar_t>() : nullptr,
          sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
  m.def("forward", &forward, "fused forward; writes out (T, Q, M*D)");
  m.def("backward", &backward,
        "fused backward; accumulates into grad_value (float32, zeroed by the caller) and writes the "
        "location / weight gradients");
}
