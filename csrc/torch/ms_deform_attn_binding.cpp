// PyTorch binding of the framework-free kernels (csrc/ms_deform_attn). Python registers these functions as the CUDA
// implementation of the custom ops dino::ms_deform_attn and dino::ms_deform_attn_backward (dino/ops/custom_op.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <string>
#include <tuple>

#include "ms_deform_attn.h"

namespace {

// Sizes formatted by hand: with torch 2.11 on the H100 machine, error messages that streamed IntArrayRef crashed
// the process (segfault) instead of raising; messages made of ints and ScalarTypes raised normally.
std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

DinoMsdaDType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DINO_MSDA_FLOAT32;
    case at::kHalf: return DINO_MSDA_FLOAT16;
    case at::kBFloat16: return DINO_MSDA_BFLOAT16;
    case at::kDouble: return DINO_MSDA_FLOAT64;
    default: TORCH_CHECK(false, "ms_deform_attn: value dtype must be float32/float16/bfloat16/float64, got ", t);
  }
}

// Checks ranks, sizes, devices and dtypes (no device->host copies: the shape tables stay on the GPU).
DinoMsdaShape check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                           const at::Tensor& level_start_index, const at::Tensor& loc, const at::Tensor& attn) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (B, S, M, D), got shape ", shape_str(value));
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (B, Q, M, L, P, 2), got shape ", shape_str(loc));
  const int64_t B = value.size(0), M = value.size(2), L = loc.size(3), P = loc.size(4);
  TORCH_CHECK(loc.size(0) == B && loc.size(2) == M, "ms_deform_attn: sampling_locations ", shape_str(loc),
              " does not match value ", shape_str(value), " in B or M");
  TORCH_CHECK(attn.dim() == 5 && attn.size(0) == B && attn.size(1) == loc.size(1) && attn.size(2) == M &&
                  attn.size(3) == L && attn.size(4) == P,
              "ms_deform_attn: attention_weights must be (B, Q, M, L, P) = (", B, ", ", loc.size(1), ", ", M, ", ", L,
              ", ", P, "), got ", shape_str(attn));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) with L = ", L, ", got ", shape_str(spatial_shapes));
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn: level_start_index must be (L,) with L = ", L, ", got ", shape_str(level_start_index));
  TORCH_CHECK(L <= DINO_MSDA_MAX_LEVELS, "ms_deform_attn: at most ", DINO_MSDA_MAX_LEVELS, " levels, got ", L);
  const auto idx_t = spatial_shapes.scalar_type();
  TORCH_CHECK((idx_t == at::kLong || idx_t == at::kInt) && level_start_index.scalar_type() == idx_t,
              "ms_deform_attn: spatial_shapes and level_start_index must both be int64 or both int32, got ", idx_t,
              " and ", level_start_index.scalar_type());
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &loc, &attn}) {
    TORCH_CHECK(t->is_cuda() && t->device() == value.device(),
                "ms_deform_attn: all inputs must be on the same CUDA device as value (", value.device().str(), ")");
  }
  dtype_of(value.scalar_type());
  return DinoMsdaShape{B, value.size(1), M, value.size(3), L, loc.size(1), P};
}

bool empty_problem(const DinoMsdaShape& s) {
  return s.batch == 0 || s.num_values == 0 || s.num_heads == 0 || s.channels == 0 || s.num_queries == 0 ||
         s.num_points == 0 || s.num_levels == 0;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ms_deform_attn ", what, " kernel failed: ", cudaGetErrorString(err));
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const DinoMsdaShape s =
      check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto dt = value.scalar_type();
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.to(dt).contiguous();
  const at::Tensor attn = attention_weights.to(dt).contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  if (empty_problem(s)) return at::zeros({s.batch, s.num_queries, s.num_heads * s.channels}, value.options());
  at::Tensor out = at::empty({s.batch, s.num_queries, s.num_heads * s.channels}, value.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (shapes.scalar_type() == at::kLong) {
    err = dino_msda_forward_i64(dtype_of(dt), &s, v.data_ptr(), shapes.data_ptr<int64_t>(),
                                starts.data_ptr<int64_t>(), loc.data_ptr(), attn.data_ptr(), out.data_ptr(), stream);
  } else {
    err = dino_msda_forward_i32(dtype_of(dt), &s, v.data_ptr(), shapes.data_ptr<int32_t>(),
                                starts.data_ptr<int32_t>(), loc.data_ptr(), attn.data_ptr(), out.data_ptr(), stream);
  }
  check_cuda(err, "forward");
  return out;
}

// Returns (grad_value, grad_sampling_locations, grad_attention_weights) in the dtypes of the corresponding inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights) {
  const DinoMsdaShape s =
      check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.batch && grad_output.size(1) == s.num_queries &&
                  grad_output.size(2) == s.num_heads * s.channels,
              "ms_deform_attn backward: grad_output must be (B, Q, M*D), got ", shape_str(grad_output));
  const c10::cuda::CUDAGuard guard(value.device());
  const auto dt = value.scalar_type();
  if (empty_problem(s)) {
    return {at::zeros_like(value), at::zeros_like(sampling_locations), at::zeros_like(attention_weights)};
  }
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.to(dt).contiguous();
  const at::Tensor attn = attention_weights.to(dt).contiguous();
  const at::Tensor go = grad_output.to(dt).contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const auto acc_t = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_value = at::empty(v.sizes(), v.options().dtype(acc_t));
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (shapes.scalar_type() == at::kLong) {
    err = dino_msda_backward_i64(dtype_of(dt), &s, v.data_ptr(), shapes.data_ptr<int64_t>(),
                                 starts.data_ptr<int64_t>(), loc.data_ptr(), attn.data_ptr(), go.data_ptr(),
                                 grad_value.data_ptr(), grad_loc.data_ptr(), grad_attn.data_ptr(), stream);
  } else {
    err = dino_msda_backward_i32(dtype_of(dt), &s, v.data_ptr(), shapes.data_ptr<int32_t>(),
                                 starts.data_ptr<int32_t>(), loc.data_ptr(), attn.data_ptr(), go.data_ptr(),
                                 grad_value.data_ptr(), grad_loc.data_ptr(), grad_attn.data_ptr(), stream);
  }
  check_cuda(err, "backward");
  return {grad_value.to(dt), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dino multi-scale deformable attention CUDA kernels";
  m.def("forward", &forward, "ms_deform_attn forward -> (B, Q, M*D)");
  m.def("backward", &backward, "ms_deform_attn backward -> (grad_value, grad_sampling_locations, grad_attention_weights)");
}
