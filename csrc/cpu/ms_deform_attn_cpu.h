// Framework-free CPU kernels of multi-scale deformable attention, float32 and float64: plain pointers and sizes,
// no torch or OpenVINO headers. Compiled by the PyTorch binding (csrc/torch/ms_deform_attn_cpu_binding.cpp, with
// at::parallel_for) and by the OpenVINO op (csrc/openvino/, with tbb::parallel_for in the CPU plugin's arena).
//
// value is (B, S, M, D): the D channels of one head at one position are contiguous, so each bilinear corner is one
// contiguous row of D values (grid_sample's (B*M, D, H, W) layout reads them with a stride of H*W).
// Forward: parallel over (b, q, m) groups; each group accumulates its output row of D channels in place.
// Backward: the location and attention-weight gradients belong to one (b, q, m) group, but many queries add to the
// same grad_value rows. Work is split by (b, m) first (distinct (b, m) never share a grad_value row, so no atomics),
// then, when there are more threads than (b, m) pairs, by chunks of queries, each chunk with its own grad_value
// buffer summed at the end. The summation order is fixed by the sizes and thread count: results are reproducible.
//
// ParallelFor: any callable parallel_for(begin, end, grain, body) that calls body(b, e) on disjoint sub-ranges
// [b, e) covering [begin, end), each at least `grain` long where possible.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace dino_cpu {

struct Level {
  int64_t h, w, start;
};

// B batch, S value positions (all levels), M heads, D channels per head, L levels, Q queries, P points per level.
struct Dims {
  int64_t B, S, M, D, L, Q, P;
};

// Bilinear sampling geometry of one point on one level (align_corners=False, zero padding), as the CUDA kernel.
template <typename T>
struct Corners {
  int64_t idx[4];  // positions in S of (lo,lo) (lo,hi) (hi,lo) (hi,hi); -1 when outside the map
  T w[4];          // bilinear weights of those corners
  T lh, lw;        // fractional parts, for the location gradient
  bool inside;     // false: the point contributes nothing (and gets zero gradient)
};

template <typename T>
inline Corners<T> make_corners(T x, T y, const Level& lv) {
  Corners<T> c;
  const int64_t h = lv.h, w = lv.w;
  // Pixel centre j sits at (j + 0.5) / W; one rounding (fma) keeps float32 within 1e-5 of float64.
  const T h_im = std::fma(y, static_cast<T>(h), static_cast<T>(-0.5));
  const T w_im = std::fma(x, static_cast<T>(w), static_cast<T>(-0.5));
  // At h_im == -1 the value is 0 but row 0 still carries a location gradient (grid_sample has it): >=, not >.
  c.inside = h_im >= T(-1) && w_im >= T(-1) && h_im < static_cast<T>(h) && w_im < static_cast<T>(w);
  if (!c.inside) return c;
  const T hf = std::floor(h_im), wf = std::floor(w_im);
  const int64_t h_lo = static_cast<int64_t>(hf), w_lo = static_cast<int64_t>(wf);
  const int64_t h_hi = h_lo + 1, w_hi = w_lo + 1;
  c.lh = h_im - hf;
  c.lw = w_im - wf;
  const T hh = T(1) - c.lh, hw = T(1) - c.lw;
  c.w[0] = hh * hw;
  c.w[1] = hh * c.lw;
  c.w[2] = c.lh * hw;
  c.w[3] = c.lh * c.lw;
  const bool hl_ok = h_lo >= 0, hh_ok = h_hi <= h - 1, wl_ok = w_lo >= 0, wh_ok = w_hi <= w - 1;
  c.idx[0] = (hl_ok && wl_ok) ? lv.start + h_lo * w + w_lo : -1;
  c.idx[1] = (hl_ok && wh_ok) ? lv.start + h_lo * w + w_hi : -1;
  c.idx[2] = (hh_ok && wl_ok) ? lv.start + h_hi * w + w_lo : -1;
  c.idx[3] = (hh_ok && wh_ok) ? lv.start + h_hi * w + w_hi : -1;
  return c;
}

// An empty string when every level lies inside value's S positions (the kernels read the level table without
// further bounds checks), else the message naming the first level that does not.
inline std::string check_levels(const Dims& d, const Level* levels) {
  for (int64_t l = 0; l < d.L; ++l) {
    const Level& lv = levels[l];
    if (!(lv.h >= 0 && lv.w >= 0 && lv.start >= 0 && lv.start + lv.h * lv.w <= d.S)) {
      return "ms_deform_attn: level " + std::to_string(l) + " (" + std::to_string(lv.h) + " x " +
             std::to_string(lv.w) + " from " + std::to_string(lv.start) + ") does not fit in value's " +
             std::to_string(d.S) + " positions";
    }
  }
  return "";
}

// out (B, Q, M, D) from value (B, S, M, D), loc (B, Q, M, L, P, 2) as (x, y) in [0, 1], attn (B, Q, M, L, P).
// kD > 0: the channel count as a compile-time constant (DINO's 32), so the channel loops vectorise fully.
template <typename T, int kD, typename ParallelFor>
void forward_rows(const Dims& d, const Level* levels, const T* value, const T* loc, const T* attn, T* out,
                  ParallelFor&& parallel_for) {
  const int64_t D = kD > 0 ? kD : d.D;
  const int64_t LP = d.L * d.P, row_stride = d.M * D;
  parallel_for(int64_t(0), d.B * d.Q * d.M, int64_t(16), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t m = g % d.M, b = g / (d.M * d.Q);
      const T* vbase = value + b * d.S * row_stride + m * D;
      const T* lp = loc + g * LP * 2;
      const T* ap = attn + g * LP;
      T* o = out + g * D;  // out is (B, Q, M, D)
      for (int64_t i = 0; i < D; ++i) o[i] = T(0);
      for (int64_t l = 0; l < d.L; ++l) {
        for (int64_t p = 0; p < d.P; ++p) {
          const int64_t k = l * d.P + p;
          const Corners<T> cr = make_corners<T>(lp[2 * k], lp[2 * k + 1], levels[l]);
          if (!cr.inside) continue;
          for (int j = 0; j < 4; ++j) {
            if (cr.idx[j] < 0) continue;
            const T* v = vbase + cr.idx[j] * row_stride;
            const T cw = ap[k] * cr.w[j];
            for (int64_t i = 0; i < D; ++i) o[i] += cw * v[i];
          }
        }
      }
    }
  });
}

// grad_value: `chunks` zeroed buffers of (B, S, M, D), summed by the caller; grad_loc, grad_attn: shaped as loc, attn.
template <typename T, int kD, typename ParallelFor>
void backward_rows(const Dims& d, const Level* levels, const T* value, const T* loc, const T* attn,
                   const T* grad_out, T* grad_value, int64_t chunks, T* grad_loc, T* grad_attn,
                   ParallelFor&& parallel_for) {
  const int64_t D = kD > 0 ? kD : d.D;
  const int64_t LP = d.L * d.P, row_stride = d.M * D, value_numel = d.B * d.S * row_stride;
  parallel_for(int64_t(0), d.B * d.M * chunks, int64_t(1), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks, bm = task / chunks;
      const int64_t b = bm / d.M, m = bm % d.M;
      const int64_t q_begin = d.Q * chunk / chunks, q_end = d.Q * (chunk + 1) / chunks;
      const T* vbase = value + b * d.S * row_stride + m * D;
      T* gvbase = grad_value + chunk * value_numel + b * d.S * row_stride + m * D;
      for (int64_t q = q_begin; q < q_end; ++q) {
        const int64_t g = (b * d.Q + q) * d.M + m;
        const T* lp = loc + g * LP * 2;
        const T* ap = attn + g * LP;
        const T* go = grad_out + g * D;
        T* glp = grad_loc + g * LP * 2;
        T* gap = grad_attn + g * LP;
        for (int64_t l = 0; l < d.L; ++l) {
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t k = l * d.P + p;
            const Corners<T> cr = make_corners<T>(lp[2 * k], lp[2 * k + 1], levels[l]);
            T g_attn = 0, g_x = 0, g_y = 0;
            if (cr.inside) {
              const T a = ap[k];
              const T hh = T(1) - cr.lh, hw = T(1) - cr.lw;
              // d(weight_j)/d(w_im) and d(weight_j)/d(h_im) for the corners (lo,lo) (lo,hi) (hi,lo) (hi,hi)
              const T dw[4] = {-hh, hh, -cr.lh, cr.lh};
              const T dh[4] = {-hw, -cr.lw, hw, cr.lw};
              for (int j = 0; j < 4; ++j) {
                if (cr.idx[j] < 0) continue;
                const T* v = vbase + cr.idx[j] * row_stride;
                T* gv = gvbase + cr.idx[j] * row_stride;
                const T cw = a * cr.w[j];
                T dot = 0;
                for (int64_t i = 0; i < D; ++i) {
                  dot += go[i] * v[i];
                  gv[i] += cw * go[i];
                }
                g_attn += cr.w[j] * dot;
                g_x += dw[j] * dot;
                g_y += dh[j] * dot;
              }
              g_x *= a * static_cast<T>(levels[l].w);
              g_y *= a * static_cast<T>(levels[l].h);
            }
            gap[k] = g_attn;
            glp[2 * k] = g_x;
            glp[2 * k + 1] = g_y;
          }
        }
      }
    }
  });
}

// Calls f(std::integral_constant<int, kD>) with kD = 32 (compiled-in channel count) or 0 (any D).
template <typename F>
void dispatch_channels(int64_t D, F&& f) {
  if (D == 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

}  // namespace dino_cpu
