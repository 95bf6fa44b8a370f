// Launchers for the multi-scale deformable attention kernels: argument checks, dtype / vector-width / group-size
// dispatch. Framework-free: compiled unchanged into the PyTorch extension and the TensorRT plugin.
#include "ms_deform_attn.h"

#include "ms_deform_attn_kernels.cuh"

namespace dino_msda {
namespace {

constexpr int kThreads = 256;

// Each lane moves 8 bytes of channels per load: float2, 4 x half / bf16, 1 x double.
template <typename T>
constexpr int vec_width() {
  return 8 / static_cast<int>(sizeof(T)) > 0 ? 8 / static_cast<int>(sizeof(T)) : 1;
}

bool aligned(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int group_size(int64_t chunks) {
  int g = 4;  // below 4 lanes the group would underuse the warp for no gain
  while (g < 32 && g < chunks) g <<= 1;
  return g;
}

cudaError_t check_shape(const DinoMsdaShape* s) {
  if (s == nullptr) return cudaErrorInvalidValue;
  if (s->batch <= 0 || s->num_values <= 0 || s->num_heads <= 0 || s->channels <= 0 || s->num_queries <= 0 ||
      s->num_points <= 0 || s->num_levels <= 0 || s->num_levels > DINO_MSDA_MAX_LEVELS)
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

Dims dims_of(const DinoMsdaShape* s) {
  return Dims{s->batch, s->num_values, s->num_heads, s->channels, s->num_levels, s->num_queries, s->num_points};
}

unsigned blocks_for(const Dims& d, int G) {
  const int64_t threads = d.B * d.Q * d.M * G;
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

template <typename T, int kVec, int G, typename index_t>
cudaError_t launch_forward_g(const Dims& d, const void* value, const index_t* shapes, const index_t* starts,
                             const void* loc, const void* attn, void* out, cudaStream_t stream) {
  forward_kernel<T, kVec, G, index_t><<<blocks_for(d, G), kThreads, 0, stream>>>(
      d, static_cast<const T*>(value), shapes, starts, static_cast<const T*>(loc), static_cast<const T*>(attn),
      static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T, int kVec, typename index_t>
cudaError_t launch_forward_v(const Dims& d, const void* value, const index_t* shapes, const index_t* starts,
                             const void* loc, const void* attn, void* out, cudaStream_t stream) {
  switch (group_size(d.D / kVec)) {
    case 4: return launch_forward_g<T, kVec, 4>(d, value, shapes, starts, loc, attn, out, stream);
    case 8: return launch_forward_g<T, kVec, 8>(d, value, shapes, starts, loc, attn, out, stream);
    case 16: return launch_forward_g<T, kVec, 16>(d, value, shapes, starts, loc, attn, out, stream);
    default: return launch_forward_g<T, kVec, 32>(d, value, shapes, starts, loc, attn, out, stream);
  }
}

template <typename T, typename index_t>
cudaError_t launch_forward_t(const Dims& d, const void* value, const index_t* shapes, const index_t* starts,
                             const void* loc, const void* attn, void* out, cudaStream_t stream) {
  constexpr int kVec = vec_width<T>();
  const size_t bytes = sizeof(T) * kVec;
  if (kVec > 1 && d.D % kVec == 0 && aligned(value, bytes) && aligned(out, bytes))
    return launch_forward_v<T, kVec>(d, value, shapes, starts, loc, attn, out, stream);
  return launch_forward_v<T, 1>(d, value, shapes, starts, loc, attn, out, stream);
}

template <typename T, int kVec, int G, typename index_t>
cudaError_t launch_backward_g(const Dims& d, const void* value, const index_t* shapes, const index_t* starts,
                              const void* loc, const void* attn, const void* grad_out, void* grad_value,
                              void* grad_loc, void* grad_attn, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  backward_kernel<T, kVec, G, index_t><<<blocks_for(d, G), kThreads, 0, stream>>>(
      d, static_cast<const T*>(value), shapes, starts, static_cast<const T*>(loc), static_cast<const T*>(attn),
      static_cast<const T*>(grad_out), static_cast<A*>(grad_value), static_cast<T*>(grad_loc),
      static_cast<T*>(grad_attn));
  return cudaGetLastError();
}

template <typename T, int kVec, typename index_t>
cudaError_t launch_backward_v(const Dims& d, const void* value, const index_t* shapes, const index_t* starts,
                              const void* loc, const void* attn, const void* grad_out, void* grad_value,
                              void* grad_loc, void* grad_attn, cudaStream_t stream) {
  switch (group_size(d.D / kVec)) {
    case 4:
      return launch_backward_g<T, kVec, 4>(d, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                           grad_attn, stream);
    case 8:
      return launch_backward_g<T, kVec, 8>(d, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                           grad_attn, stream);
    case 16:
      return launch_backward_g<T, kVec, 16>(d, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                            grad_attn, stream);
    default:
      return launch_backward_g<T, kVec, 32>(d, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                            grad_attn, stream);
  }
}

template <typename T, typename index_t>
cudaError_t launch_backward_t(const Dims& d, const void* value, const index_t* shapes, const index_t* starts,
                              const void* loc, const void* attn, const void* grad_out, void* grad_value,
                              void* grad_loc, void* grad_attn, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const cudaError_t err =
      cudaMemsetAsync(grad_value, 0, static_cast<size_t>(d.B * d.S * d.M * d.D) * sizeof(A), stream);
  if (err != cudaSuccess) return err;
  constexpr int kVec = vec_width<T>();
  const size_t bytes = sizeof(T) * kVec;
  // The accumulator is float: vector atomics on it need sizeof(A) * kVec alignment.
  if (kVec > 1 && d.D % kVec == 0 && aligned(value, bytes) && aligned(grad_out, bytes) &&
      aligned(grad_value, sizeof(A) * kVec))
    return launch_backward_v<T, kVec>(d, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
                                      stream);
  return launch_backward_v<T, 1>(d, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
                                 stream);
}

template <typename index_t>
cudaError_t forward(DinoMsdaDType dtype, const DinoMsdaShape* shape, const void* value, const index_t* shapes,
                    const index_t* starts, const void* loc, const void* attn, void* out, cudaStream_t stream) {
  cudaError_t err = check_shape(shape);
  if (err != cudaSuccess) return err;
  if (!value || !shapes || !starts || !loc || !attn || !out) return cudaErrorInvalidValue;
  const Dims d = dims_of(shape);
  switch (dtype) {
    case DINO_MSDA_FLOAT32: return launch_forward_t<float>(d, value, shapes, starts, loc, attn, out, stream);
    case DINO_MSDA_FLOAT16: return launch_forward_t<__half>(d, value, shapes, starts, loc, attn, out, stream);
    case DINO_MSDA_BFLOAT16:
      return launch_forward_t<__nv_bfloat16>(d, value, shapes, starts, loc, attn, out, stream);
    case DINO_MSDA_FLOAT64: return launch_forward_t<double>(d, value, shapes, starts, loc, attn, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename index_t>
cudaError_t backward(DinoMsdaDType dtype, const DinoMsdaShape* shape, const void* value, const index_t* shapes,
                     const index_t* starts, const void* loc, const void* attn, const void* grad_out,
                     void* grad_value, void* grad_loc, void* grad_attn, cudaStream_t stream) {
  cudaError_t err = check_shape(shape);
  if (err != cudaSuccess) return err;
  if (!value || !shapes || !starts || !loc || !attn || !grad_out || !grad_value || !grad_loc || !grad_attn)
    return cudaErrorInvalidValue;
  const Dims d = dims_of(shape);
  switch (dtype) {
    case DINO_MSDA_FLOAT32:
      return launch_backward_t<float>(d, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                      grad_attn, stream);
    case DINO_MSDA_FLOAT16:
      return launch_backward_t<__half>(d, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                       grad_attn, stream);
    case DINO_MSDA_BFLOAT16:
      return launch_backward_t<__nv_bfloat16>(d, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                              grad_attn, stream);
    case DINO_MSDA_FLOAT64:
      return launch_backward_t<double>(d, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                       grad_attn, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace dino_msda

extern "C" {

cudaError_t dino_msda_forward_i64(DinoMsdaDType dtype, const DinoMsdaShape* shape, const void* value,
                                  const int64_t* spatial_shapes, const int64_t* level_start_index,
                                  const void* sampling_locations, const void* attention_weights, void* output,
                                  cudaStream_t stream) {
  return dino_msda::forward(dtype, shape, value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, output, stream);
}

cudaError_t dino_msda_forward_i32(DinoMsdaDType dtype, const DinoMsdaShape* shape, const void* value,
                                  const int32_t* spatial_shapes, const int32_t* level_start_index,
                                  const void* sampling_locations, const void* attention_weights, void* output,
                                  cudaStream_t stream) {
  return dino_msda::forward(dtype, shape, value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, output, stream);
}

cudaError_t dino_msda_backward_i64(DinoMsdaDType dtype, const DinoMsdaShape* shape, const void* value,
                                   const int64_t* spatial_shapes, const int64_t* level_start_index,
                                   const void* sampling_locations, const void* attention_weights,
                                   const void* grad_output, void* grad_value_accum, void* grad_sampling_locations,
                                   void* grad_attention_weights, cudaStream_t stream) {
  return dino_msda::backward(dtype, shape, value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, grad_output, grad_value_accum, grad_sampling_locations,
                             grad_attention_weights, stream);
}

cudaError_t dino_msda_backward_i32(DinoMsdaDType dtype, const DinoMsdaShape* shape, const void* value,
                                   const int32_t* spatial_shapes, const int32_t* level_start_index,
                                   const void* sampling_locations, const void* attention_weights,
                                   const void* grad_output, void* grad_value_accum, void* grad_sampling_locations,
                                   void* grad_attention_weights, cudaStream_t stream) {
  return dino_msda::backward(dtype, shape, value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, grad_output, grad_value_accum, grad_sampling_locations,
                             grad_attention_weights, stream);
}

}  // extern "C"
