// PyTorch binding of the benchmark-only baseline (ms_deform_attn_baseline.cu). Built by `python -m dino.ops.bench`
// alone, never by the extension every user compiles (dino/ops/kernel.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>

#include "ms_deform_attn_baseline.h"

namespace {

// The bench builds its inputs itself; this only guards the baseline's narrower contract.
DinoMsdaShape check_baseline(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& loc,
                             const at::Tensor& attn) {
  TORCH_CHECK(value.dim() == 4 && loc.dim() == 6 && attn.dim() == 5 && value.is_cuda(),
              "ms_deform_attn baseline: value (B, S, M, D), locations (B, Q, M, L, P, 2), weights (B, Q, M, L, P) "
              "on a CUDA device");
  TORCH_CHECK(value.scalar_type() == at::kFloat && spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn baseline: float32 value and int64 shape tables only");
  return DinoMsdaShape{value.size(0), value.size(1), value.size(2), value.size(3),
                       loc.size(3),   loc.size(1),   loc.size(4)};
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ms_deform_attn baseline ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor baseline_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const DinoMsdaShape s = check_baseline(value, spatial_shapes, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor v = value.contiguous(), loc = sampling_locations.to(at::kFloat).contiguous();
  const at::Tensor attn = attention_weights.to(at::kFloat).contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  at::Tensor out = at::empty({s.batch, s.num_queries, s.num_heads * s.channels}, value.options());
  check_cuda(dino_msda_baseline_forward_f32(&s, v.data_ptr<float>(), shapes.data_ptr<int64_t>(),
                                            starts.data_ptr<int64_t>(), loc.data_ptr<float>(),
                                            attn.data_ptr<float>(), out.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream()),
             "forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> baseline_backward(const at::Tensor& grad_output,
                                                                 const at::Tensor& value,
                                                                 const at::Tensor& spatial_shapes,
                                                                 const at::Tensor& level_start_index,
                                                                 const at::Tensor& sampling_locations,
                                                                 const at::Tensor& attention_weights) {
  const DinoMsdaShape s = check_baseline(value, spatial_shapes, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor v = value.contiguous(), loc = sampling_locations.to(at::kFloat).contiguous();
  const at::Tensor attn = attention_weights.to(at::kFloat).contiguous(), go = grad_output.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  at::Tensor gv = at::empty_like(v), gl = at::empty_like(loc), ga = at::empty_like(attn);
  check_cuda(dino_msda_baseline_backward_f32(&s, v.data_ptr<float>(), shapes.data_ptr<int64_t>(),
                                             starts.data_ptr<int64_t>(), loc.data_ptr<float>(),
                                             attn.data_ptr<float>(), go.data_ptr<float>(), gv.data_ptr<float>(),
                                             gl.data_ptr<float>(), ga.data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream()),
             "backward");
  return {gv, gl, ga};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "original-style ms_deform_attn baseline (benchmarks only)";
  m.def("baseline_forward", &baseline_forward, "original-style baseline forward");
  m.def("baseline_backward", &baseline_backward, "original-style baseline backward");
}
