/*
 * Benchmark baseline only (not used by the model or the TensorRT plugin): the work decomposition of the original
 * Deformable-DETR kernel, one thread per output element (b, q, m, d), scalar loads, and atomicAdd for every gradient
 * (its global-memory variant). float32, int64 shape tables; same layouts as ms_deform_attn.h.
 */
#ifndef DINO_MS_DEFORM_ATTN_BASELINE_H_
#define DINO_MS_DEFORM_ATTN_BASELINE_H_

#include "ms_deform_attn.h"

#ifdef __cplusplus
extern "C" {
#endif

cudaError_t dino_msda_baseline_forward_f32(const DinoMsdaShape* shape, const float* value,
                                           const int64_t* spatial_shapes, const int64_t* level_start_index,
                                           const float* sampling_locations, const float* attention_weights,
                                           float* output, cudaStream_t stream);

/* All three gradients are accumulated with atomics into buffers this function zeroes first. */
cudaError_t dino_msda_baseline_backward_f32(const DinoMsdaShape* shape, const float* value,
                                            const int64_t* spatial_shapes, const int64_t* level_start_index,
                                            const float* sampling_locations, const float* attention_weights,
                                            const float* grad_output, float* grad_value,
                                            float* grad_sampling_locations, float* grad_attention_weights,
                                            cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* DINO_MS_DEFORM_ATTN_BASELINE_H_ */
