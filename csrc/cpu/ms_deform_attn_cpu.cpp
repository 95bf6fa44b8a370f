// CPU kernels of multi-scale deformable attention, float32 and float64 (see dino/ops/kernel.py for the build).
//
// value is (B, S, M, D): the D channels of one head at one position are contiguous, so each bilinear corner is one
// contiguous row of D values (grid_sample's (B*M, D, H, W) layout reads them with a stride of H*W).
// Forward: parallel over (b, q, m) groups; each group accumulates its output row of D channels in place.
// Backward: the location and attention-weight gradients belong to one (b, q, m) group, but many queries add to the
// same grad_value rows. Work is split by (b, m) first (distinct (b, m) never share a grad_value row, so no atomics),
// then, when there are more threads than (b, m) pairs, by chunks of queries, each chunk with its own grad_value
// buffer summed at the end. The summation order is fixed by the sizes and thread count: results are reproducible.
// Narrow includes instead of <torch/extension.h>: the build takes about a third of the time on a 2-core CI box.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace {

struct Level {
  int64_t h, w, start;
};

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

// kD > 0: the channel count as a compile-time constant (DINO's 32), so the channel loops vectorise fully.
template <typename T, int kD>
void forward_rows(const Dims& d, const std::vector<Level>& levels, const T* value, const T* loc, const T* attn,
                  T* out) {
  const int64_t D = kD > 0 ? kD : d.D;
  const int64_t LP = d.L * d.P, row_stride = d.M * D;
  at::parallel_for(0, d.B * d.Q * d.M, 16, [&](int64_t begin, int64_t end) {
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

template <typename T, int kD>
void backward_rows(const Dims& d, const std::vector<Level>& levels, const T* value, const T* loc, const T* attn,
                   const T* grad_out, T* grad_value, int64_t chunks, T* grad_loc, T* grad_attn) {
  const int64_t D = kD > 0 ? kD : d.D;
  const int64_t LP = d.L * d.P, row_stride = d.M * D, value_numel = d.B * d.S * row_stride;
  at::parallel_for(0, d.B * d.M * chunks, 1, [&](int64_t begin, int64_t end) {
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

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// Checks what the Python side (dino.ops.custom_op.check_kernel_inputs) does not: dtypes, devices, and that every
// level lies inside value (the kernel reads the shape tables without further bounds checks).
std::pair<Dims, std::vector<Level>> check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                 const at::Tensor& level_start_index, const at::Tensor& loc,
                                                 const at::Tensor& attn) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (B, S, M, D), got shape ", shape_str(value));
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2 && loc.size(0) == value.size(0) && loc.size(2) == value.size(2),
              "ms_deform_attn: sampling_locations must be (B, Q, M, L, P, 2), got shape ", shape_str(loc));
  const Dims d{value.size(0), value.size(1), value.size(2), value.size(3), loc.size(3), loc.size(1), loc.size(4)};
  TORCH_CHECK(attn.dim() == 5 && attn.size(0) == d.B && attn.size(1) == d.Q && attn.size(2) == d.M &&
                  attn.size(3) == d.L && attn.size(4) == d.P,
              "ms_deform_attn: attention_weights must be (B, Q, M, L, P), got ", shape_str(attn));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == d.L && spatial_shapes.size(1) == 2 &&
                  level_start_index.dim() == 1 && level_start_index.size(0) == d.L,
              "ms_deform_attn: spatial_shapes must be (L, 2) and level_start_index (L,)");
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &loc, &attn}) {
    TORCH_CHECK(t->device().is_cpu(), "ms_deform_attn CPU kernel: all inputs must be CPU tensors");
  }
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "ms_deform_attn CPU kernel: value must be float32 or float64, got ", value.scalar_type());
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  std::vector<Level> levels(d.L);
  for (int64_t l = 0; l < d.L; ++l) {
    levels[l] = Level{shapes.data_ptr<int64_t>()[2 * l], shapes.data_ptr<int64_t>()[2 * l + 1],
                      starts.data_ptr<int64_t>()[l]};
    const Level& lv = levels[l];
    TORCH_CHECK(lv.h >= 0 && lv.w >= 0 && lv.start >= 0 && lv.start + lv.h * lv.w <= d.S, "ms_deform_attn: level ",
                l, " (", lv.h, " x ", lv.w, " from ", lv.start, ") does not fit in value's ", d.S, " positions");
  }
  return {d, levels};
}

template <typename F>
void dispatch_channels(int64_t D, F&& f) {
  if (D == 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const auto [d, levels] = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights);
  const auto dt = value.scalar_type();
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.to(dt).contiguous();
  const at::Tensor attn = attention_weights.to(dt).contiguous();
  at::Tensor out = at::zeros({d.B, d.Q, d.M * d.D}, value.options());
  if (out.numel() == 0 || d.S == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(dt, "ms_deform_attn_forward_cpu", [&] {
    dispatch_channels(d.D, [&](auto kD) {
      forward_rows<scalar_t, decltype(kD)::value>(d, levels, v.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(),
                                                  attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    });
  });
  return out;
}

// Returns (grad_value, grad_sampling_locations, grad_attention_weights) in the dtypes of the corresponding inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights) {
  const auto [d, levels] = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == d.B && grad_output.size(1) == d.Q &&
                  grad_output.size(2) == d.M * d.D,
              "ms_deform_attn backward: grad_output must be (B, Q, M*D), got ", shape_str(grad_output));
  const auto dt = value.scalar_type();
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.to(dt).contiguous();
  const at::Tensor attn = attention_weights.to(dt).contiguous();
  const at::Tensor go = grad_output.to(dt).contiguous();
  // Query chunks per (b, m): enough tasks for every thread, each chunk at least 64 queries.
  const int64_t pairs = std::max<int64_t>(d.B * d.M, 1);
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min((threads + pairs - 1) / pairs, d.Q / 64));
  at::Tensor grad_value = at::zeros({chunks, d.B, d.S, d.M, d.D}, value.options());
  at::Tensor grad_loc = at::zeros_like(loc);
  at::Tensor grad_attn = at::zeros_like(attn);
  if (v.numel() > 0 && loc.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(dt, "ms_deform_attn_backward_cpu", [&] {
      dispatch_channels(d.D, [&](auto kD) {
        backward_rows<scalar_t, decltype(kD)::value>(
            d, levels, v.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
            go.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), chunks, grad_loc.data_ptr<scalar_t>(),
            grad_attn.data_ptr<scalar_t>());
      });
    });
  }
  at::Tensor gv = chunks == 1 ? grad_value.select(0, 0) : grad_value.sum(0);
  return {gv, grad_loc.to(sampling_locations.scalar_type()), grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dino multi-scale deformable attention CPU kernels";
  m.def("forward", &forward, "ms_deform_attn forward -> (B, Q, M*D)");
  m.def("backward", &backward, "ms_deform_attn backward -> (grad_value, grad_sampling_locations, grad_attention_weights)");
}
