/*
 * Multi-scale deformable attention: framework-free CUDA launch API.
 *
 * This header includes no PyTorch or TensorRT header, so the PyTorch binding (csrc/torch/) and the TensorRT plugin
 * (csrc/tensorrt/) compile the same kernels (ms_deform_attn.cu). Plain C linkage keeps the ABI trivial for both.
 *
 * Semantics (identical to dino.ops.ms_deform_attn_pytorch): for every (b, q, m), the output channels m*D..m*D+D-1 are
 *   sum over l < L, p < P of  attention_weights[b,q,m,l,p] * bilinear(value level l, head m, loc[b,q,m,l,p])
 * where loc = (x, y) in [0, 1] over the level's map, sampled with align_corners=False (pixel centre of column j is
 * x = (j + 0.5) / W_l) and zero padding outside the map.
 *
 * Layouts (all contiguous, row-major; every pointer is DEVICE memory, including the shape tables):
 *   value               (B, S, M, D)         S = sum_l H_l * W_l, levels stored one after another
 *   spatial_shapes      (L, 2)               (H_l, W_l), int64 or int32 (TensorRT casts shape inputs to int32)
 *   level_start_index   (L,)                 offset of level l in S
 *   sampling_locations  (B, Q, M, L, P, 2)   (x, y), same dtype as value
 *   attention_weights   (B, Q, M, L, P)      same dtype as value
 *   output              (B, Q, M * D)        same dtype as value
 *
 * Precision: float32/float16/bfloat16 inputs accumulate in float32; float64 in float64.
 *
 * Every function is asynchronous on `stream`, returns cudaSuccess or the launch error, and returns
 * cudaErrorInvalidValue for bad arguments (null pointers, non-positive sizes, L > DINO_MSDA_MAX_LEVELS, unknown dtype)
 * without launching anything. Sizes are int64 so that B*S*M*D may exceed 2^31.
 */
#ifndef DINO_MS_DEFORM_ATTN_H_
#define DINO_MS_DEFORM_ATTN_H_

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Levels are staged in shared memory; DINO uses 4 (5 for the 5-scale variant). */
#define DINO_MSDA_MAX_LEVELS 16

typedef enum DinoMsdaDType {
  DINO_MSDA_FLOAT32 = 0,
  DINO_MSDA_FLOAT16 = 1,
  DINO_MSDA_BFLOAT16 = 2,
  DINO_MSDA_FLOAT64 = 3
} DinoMsdaDType;

typedef struct DinoMsdaShape {
  int64_t batch;       /* B */
  int64_t num_values;  /* S = sum_l H_l * W_l */
  int64_t num_heads;   /* M */
  int64_t channels;    /* D, channels per head */
  int64_t num_levels;  /* L, 1..DINO_MSDA_MAX_LEVELS */
  int64_t num_queries; /* Q */
  int64_t num_points;  /* P, points per level */
} DinoMsdaShape;

/* Forward: writes every element of `output` (B, Q, M*D). */
cudaError_t dino_msda_forward_i64(DinoMsdaDType dtype, const DinoMsdaShape* shape, const void* value,
                                  const int64_t* spatial_shapes, const int64_t* level_start_index,
                                  const void* sampling_locations, const void* attention_weights, void* output,
                                  cudaStream_t stream);

cudaError_t dino_msda_forward_i32(DinoMsdaDType dtype, const DinoMsdaShape* shape, const void* value,
                                  const int32_t* spatial_shapes, const int32_t* level_start_index,
                                  const void* sampling_locations, const void* attention_weights, void* output,
                                  cudaStream_t stream);

/*
 * Backward, given grad_output (B, Q, M*D) in the input dtype:
 *   grad_value_accum        (B, S, M, D) in the ACCUMULATION type: float for float32/float16/bfloat16, double for
 *                           float64. It is zeroed here (cudaMemsetAsync) and then accumulated with atomics; for
 *                           float32 it can be the final gradient tensor itself, for float16/bfloat16 the caller
 *                           converts it.
 *   grad_sampling_locations (B, Q, M, L, P, 2) in the input dtype, every element written.
 *   grad_attention_weights  (B, Q, M, L, P)    in the input dtype, every element written.
 */
cudaError_t dino_msda_backward_i64(DinoMsdaDType dtype, const DinoMsdaShape* shape, const void* value,
                                   const int64_t* spatial_shapes, const int64_t* level_start_index,
                                   const void* sampling_locations, const void* attention_weights,
                                   const void* grad_output, void* grad_value_accum, void* grad_sampling_locations,
                                   void* grad_attention_weights, cudaStream_t stream);

cudaError_t dino_msda_backward_i32(DinoMsdaDType dtype, const DinoMsdaShape* shape, const void* value,
                                   const int32_t* spatial_shapes, const int32_t* level_start_index,
                                   const void* sampling_locations, const void* attention_weights,
                                   const void* grad_output, void* grad_value_accum, void* grad_sampling_locations,
                                   void* grad_attention_weights, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DINO_MS_DEFORM_ATTN_H_ */
