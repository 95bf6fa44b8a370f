// Device code for multi-scale deformable attention (no framework headers; see ms_deform_attn.h for the contract).
//
// Work decomposition: one group of G lanes (G a power of two <= 32, inside one warp) per (b, q, m); each lane owns
// kVec consecutive channels of D and loads them as one 8-byte vector (float2, 4 x half, 4 x bf16, 1 x double).
// The original Deformable-DETR kernel uses one thread per output element and atomics for every gradient; here the
// bilinear weights are computed once per lane group, the channel loads are coalesced vectors, and the location and
// attention-weight gradients are reduced with warp shuffles and written by one lane without atomics. Only
// grad_value, which many queries touch, uses atomics (vector atomics on sm_90).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "ms_deform_attn.h"

namespace dino_msda {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return v; }

// kVec elements loaded/stored as one aligned vector.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec, typename A>
__device__ __forceinline__ void load_pack(const T* p, A (&out)[kVec]) {
  const Pack<T, kVec> pk = *reinterpret_cast<const Pack<T, kVec>*>(p);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_acc(pk.v[i]);
}

template <typename T, int kVec, typename A>
__device__ __forceinline__ void store_pack(T* p, const A (&in)[kVec]) {
  Pack<T, kVec> pk;
#pragma unroll
  for (int i = 0; i < kVec; ++i) pk.v[i] = from_acc<T>(in[i]);
  *reinterpret_cast<Pack<T, kVec>*>(p) = pk;
}

template <int kVec, typename A>
__device__ __forceinline__ void atomic_add_pack(A* p, const A (&in)[kVec]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Vector float atomics exist on sm_90+: one instruction instead of kVec.
  constexpr bool kVector = sizeof(A) == 4 && (kVec == 2 || kVec == 4);
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector && kVec == 4) {
    atomicAdd(reinterpret_cast<float4*>(p), make_float4(in[0], in[1], in[2], in[3]));
  } else if constexpr (kVector && kVec == 2) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(in[0], in[1]));
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) atomicAdd(p + i, in[i]);
  }
}

template <int G, typename A>
__device__ __forceinline__ A group_sum(A v, unsigned mask) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off, G);
  return v;
}

// Bilinear sampling geometry of one point on one level (shared by all lanes of a group).
template <typename A>
struct Corners {
  int64_t idx[4];  // row offset in S of (lo,lo) (lo,hi) (hi,lo) (hi,hi); -1 when outside the map
  A w[4];          // bilinear weights of those corners
  A lh, lw;        // fractional parts, for the location gradient
  bool inside;     // false: the point contributes nothing (and gets zero gradient)
};

template <typename A>
__device__ __forceinline__ Corners<A> make_corners(A x, A y, int h, int w, int64_t start) {
  Corners<A> c;
  // align_corners=False: pixel centre j sits at (j + 0.5) / W.
  const A h_im = fma(y, static_cast<A>(h), static_cast<A>(-0.5));  // one rounding: fp32 stays within 1e-5
  const A w_im = fma(x, static_cast<A>(w), static_cast<A>(-0.5));
  // Only a skip of work that is exactly zero: at h_im == -1 the value is 0 but row 0 still carries a location
  // gradient (grid_sample has it), hence >= and not the original kernel's >.
  c.inside = h_im >= static_cast<A>(-1) && w_im >= static_cast<A>(-1) && h_im < static_cast<A>(h) &&
             w_im < static_cast<A>(w);
  const A hf = floor(h_im);
  const A wf = floor(w_im);
  const int h_lo = static_cast<int>(hf);
  const int w_lo = static_cast<int>(wf);
  const int h_hi = h_lo + 1;
  const int w_hi = w_lo + 1;
  c.lh = h_im - hf;
  c.lw = w_im - wf;
  const A hh = static_cast<A>(1) - c.lh;
  const A hw = static_cast<A>(1) - c.lw;
  c.w[0] = hh * hw;
  c.w[1] = hh * c.lw;
  c.w[2] = c.lh * hw;
  c.w[3] = c.lh * c.lw;
  const bool hl_ok = h_lo >= 0, hh_ok = h_hi <= h - 1, wl_ok = w_lo >= 0, wh_ok = w_hi <= w - 1;
  c.idx[0] = (hl_ok && wl_ok) ? start + static_cast<int64_t>(h_lo) * w + w_lo : -1;
  c.idx[1] = (hl_ok && wh_ok) ? start + static_cast<int64_t>(h_lo) * w + w_hi : -1;
  c.idx[2] = (hh_ok && wl_ok) ? start + static_cast<int64_t>(h_hi) * w + w_lo : -1;
  c.idx[3] = (hh_ok && wh_ok) ? start + static_cast<int64_t>(h_hi) * w + w_hi : -1;
  return c;
}

template <typename index_t>
__device__ __forceinline__ void stage_levels(const index_t* spatial_shapes, const index_t* level_start_index, int L,
                                             int* s_h, int* s_w, int64_t* s_start) {
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    s_h[l] = static_cast<int>(spatial_shapes[2 * l]);
    s_w[l] = static_cast<int>(spatial_shapes[2 * l + 1]);
    s_start[l] = static_cast<int64_t>(level_start_index[l]);
  }
  __syncthreads();
}

struct Dims {
  int64_t B, S, M, D, L, Q, P;
};

// One group of G lanes per (b, q, m); chunks of kVec channels strided by G over D / kVec.
template <typename T, int kVec, int G, typename index_t>
__global__ void __launch_bounds__(256) forward_kernel(Dims d, const T* __restrict__ value,
                                                      const index_t* __restrict__ spatial_shapes,
                                                      const index_t* __restrict__ level_start_index,
                                                      const T* __restrict__ loc, const T* __restrict__ attn,
                                                      T* __restrict__ out) {
  using A = typename AccType<T>::type;
  __shared__ int s_h[DINO_MSDA_MAX_LEVELS], s_w[DINO_MSDA_MAX_LEVELS];
  __shared__ int64_t s_start[DINO_MSDA_MAX_LEVELS];
  const int L = static_cast<int>(d.L), P = static_cast<int>(d.P);
  stage_levels(spatial_shapes, level_start_index, L, s_h, s_w, s_start);

  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const int lane = threadIdx.x % G;
  if (group >= d.B * d.Q * d.M) return;
  const int64_t m = group % d.M;
  const int64_t b = group / (d.M * d.Q);
  const int64_t n_chunks = d.D / kVec;
  const int64_t row_stride = d.M * d.D;  // elements between consecutive positions of S
  const T* vbase = value + b * d.S * row_stride + m * d.D;
  const T* lp = loc + group * L * P * 2;
  const T* ap = attn + group * L * P;
  T* op = out + group * d.D;  // (b, q, m*D) == group * D since out is (B, Q, M, D)

  for (int64_t chunk = lane; chunk < n_chunks; chunk += G) {
    const int64_t c0 = chunk * kVec;
    A acc[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = 0;
    for (int l = 0; l < L; ++l) {
      const int h = s_h[l], w = s_w[l];
      const int64_t start = s_start[l];
      for (int p = 0; p < P; ++p) {
        const int k = l * P + p;
        const Corners<A> cr = make_corners<A>(to_acc(lp[2 * k]), to_acc(lp[2 * k + 1]), h, w, start);
        if (!cr.inside) continue;
        const A a = to_acc(ap[k]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (cr.idx[j] < 0) continue;
          A v[kVec];
          load_pack<T, kVec>(vbase + cr.idx[j] * row_stride + c0, v);
          const A cw = a * cr.w[j];
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[i] += cw * v[i];
        }
      }
    }
    store_pack<T, kVec>(op + c0, acc);
  }
}

template <typename T, int kVec, int G, typename index_t>
__global__ void __launch_bounds__(256) backward_kernel(Dims d, const T* __restrict__ value,
                                                       const index_t* __restrict__ spatial_shapes,
                                                       const index_t* __restrict__ level_start_index,
                                                       const T* __restrict__ loc, const T* __restrict__ attn,
                                                       const T* __restrict__ grad_out,
                                                       typename AccType<T>::type* __restrict__ grad_value,
                                                       T* __restrict__ grad_loc, T* __restrict__ grad_attn) {
  using A = typename AccType<T>::type;
  __shared__ int s_h[DINO_MSDA_MAX_LEVELS], s_w[DINO_MSDA_MAX_LEVELS];
  __shared__ int64_t s_start[DINO_MSDA_MAX_LEVELS];
  const int L = static_cast<int>(d.L), P = static_cast<int>(d.P);
  stage_levels(spatial_shapes, level_start_index, L, s_h, s_w, s_start);

  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const int lane = threadIdx.x % G;
  if (group >= d.B * d.Q * d.M) return;  // whole groups exit together: G divides the warp and the block
  const unsigned mask = (G == 32) ? 0xffffffffu : (((1u << G) - 1u) << ((threadIdx.x % 32) / G * G));
  const int64_t m = group % d.M;
  const int64_t b = group / (d.M * d.Q);
  const int64_t n_chunks = d.D / kVec;
  const int64_t row_stride = d.M * d.D;
  const T* vbase = value + b * d.S * row_stride + m * d.D;
  A* gvbase = grad_value + b * d.S * row_stride + m * d.D;
  const T* lp = loc + group * L * P * 2;
  const T* ap = attn + group * L * P;
  const T* gop = grad_out + group * d.D;
  T* glp = grad_loc + group * L * P * 2;
  T* gap = grad_attn + group * L * P;

  // Uniform trip count across the group so every lane reaches every shuffle.
  for (int64_t base = 0; base < n_chunks; base += G) {
    const int64_t chunk = base + lane;
    const bool active = chunk < n_chunks;
    const int64_t c0 = chunk * kVec;
    A go[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) go[i] = 0;
    if (active) load_pack<T, kVec>(gop + c0, go);
    for (int l = 0; l < L; ++l) {
      const int h = s_h[l], w = s_w[l];
      const int64_t start = s_start[l];
      for (int p = 0; p < P; ++p) {
        const int k = l * P + p;
        const Corners<A> cr = make_corners<A>(to_acc(lp[2 * k]), to_acc(lp[2 * k + 1]), h, w, start);
        A g_attn = 0, g_x = 0, g_y = 0;
        if (cr.inside) {  // uniform across the group: every lane sees the same point
          const A a = to_acc(ap[k]);
          const A hh = static_cast<A>(1) - cr.lh, hw = static_cast<A>(1) - cr.lw;
          // d(weight_j)/d(w_im) and d(weight_j)/d(h_im) for the corners (lo,lo) (lo,hi) (hi,lo) (hi,hi)
          const A dw[4] = {-hh, hh, -cr.lh, cr.lh};
          const A dh[4] = {-hw, -cr.lw, hw, cr.lw};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (cr.idx[j] < 0 || !active) continue;
            A v[kVec];
            load_pack<T, kVec>(vbase + cr.idx[j] * row_stride + c0, v);
            A gv[kVec];
            A dot = 0;
#pragma unroll
            for (int i = 0; i < kVec; ++i) {
              dot += go[i] * v[i];
              gv[i] = go[i] * a * cr.w[j];
            }
            g_attn += cr.w[j] * dot;
            g_x += dw[j] * dot;
            g_y += dh[j] * dot;
            atomic_add_pack<kVec>(gvbase + cr.idx[j] * row_stride + c0, gv);
          }
          g_attn = group_sum<G>(g_attn, mask);
          g_x = group_sum<G>(g_x, mask) * a * static_cast<A>(w);
          g_y = group_sum<G>(g_y, mask) * a * static_cast<A>(h);
        }
        if (lane == 0) {
          if (base > 0) {  // D > G * kVec: add to the partial sums of earlier chunks
            g_attn += to_acc(gap[k]);
            g_x += to_acc(glp[2 * k]);
            g_y += to_acc(glp[2 * k + 1]);
          }
          gap[k] = from_acc<T>(g_attn);
          glp[2 * k] = from_acc<T>(g_x);
          glp[2 * k + 1] = from_acc<T>(g_y);
        }
      }
    }
  }
}

}  // namespace dino_msda
