// PyTorch binding of the CPU kernels of multi-scale deformable attention (csrc/cpu/ms_deform_attn_cpu.h), float32
// and float64; see dino/ops/kernel.py for the build. The kernels run under at::parallel_for (OpenMP, torch's threads).
// Narrow includes instead of <torch/extension.h>: the build takes about a third of the time on a 2-core CI box.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "ms_deform_attn_cpu.h"

namespace {

using dino_cpu::Dims;
using dino_cpu::Level;

// at::parallel_for in the kernels' ParallelFor shape.
struct AtenParallelFor {
  template <typename Body>
  void operator()(int64_t begin, int64_t end, int64_t grain, const Body& body) const {
    at::parallel_for(begin, end, grain, body);
  }
};

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
  }
  const std::string bad = dino_cpu::check_levels(d, levels.data());
  TORCH_CHECK(bad.empty(), bad);
  return {d, levels};
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
    dino_cpu::dispatch_channels(d.D, [&](auto kD) {
      dino_cpu::forward_rows<scalar_t, decltype(kD)::value>(d, levels.data(), v.data_ptr<scalar_t>(),
                                                            loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
                                                            out.data_ptr<scalar_t>(), AtenParallelFor{});
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
      dino_cpu::dispatch_channels(d.D, [&](auto kD) {
        dino_cpu::backward_rows<scalar_t, decltype(kD)::value>(
            d, levels.data(), v.data_ptr<scalar_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
            go.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), chunks, grad_loc.data_ptr<scalar_t>(),
            grad_attn.data_ptr<scalar_t>(), AtenParallelFor{});
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
