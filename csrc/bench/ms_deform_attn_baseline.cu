// Benchmark baseline: the original Deformable-DETR decomposition (see ms_deform_attn_baseline.h).
#include "ms_deform_attn_baseline.h"

namespace {

constexpr int kThreads = 256;

struct Sample {
  bool inside;
  int64_t idx[4];
  float w[4], lh, lw;
};

__device__ Sample sample_at(float x, float y, int64_t h, int64_t w, int64_t start) {
  Sample s;
  const float h_im = y * h - 0.5f, w_im = x * w - 0.5f;
  s.inside = h_im > -1 && w_im > -1 && h_im < h && w_im < w;
  const int64_t hl = static_cast<int64_t>(floorf(h_im)), wl = static_cast<int64_t>(floorf(w_im));
  s.lh = h_im - hl;
  s.lw = w_im - wl;
  const float hh = 1 - s.lh, hw = 1 - s.lw;
  s.w[0] = hh * hw;
  s.w[1] = hh * s.lw;
  s.w[2] = s.lh * hw;
  s.w[3] = s.lh * s.lw;
  const int64_t rows[4] = {hl, hl, hl + 1, hl + 1}, cols[4] = {wl, wl + 1, wl, wl + 1};
  for (int j = 0; j < 4; ++j)
    s.idx[j] = (rows[j] >= 0 && rows[j] < h && cols[j] >= 0 && cols[j] < w) ? start + rows[j] * w + cols[j] : -1;
  return s;
}

__global__ void baseline_forward(DinoMsdaShape d, const float* value, const int64_t* shapes, const int64_t* starts,
                                 const float* loc, const float* attn, float* out) {
  const int64_t n = d.batch * d.num_queries * d.num_heads * d.channels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % d.channels, group = i / d.channels, m = group % d.num_heads;
    const int64_t b = group / (d.num_heads * d.num_queries);
    const int64_t stride = d.num_heads * d.channels;
    const float* vb = value + b * d.num_values * stride + m * d.channels + c;
    float acc = 0;
    for (int64_t l = 0; l < d.num_levels; ++l) {
      for (int64_t p = 0; p < d.num_points; ++p) {
        const int64_t k = (group * d.num_levels + l) * d.num_points + p;
        const Sample s = sample_at(loc[2 * k], loc[2 * k + 1], shapes[2 * l], shapes[2 * l + 1], starts[l]);
        if (!s.inside) continue;
        float v = 0;
        for (int j = 0; j < 4; ++j)
          if (s.idx[j] >= 0) v += s.w[j] * vb[s.idx[j] * stride];
        acc += attn[k] * v;
      }
    }
    out[i] = acc;
  }
}

__global__ void baseline_backward(DinoMsdaShape d, const float* value, const int64_t* shapes, const int64_t* starts,
                                  const float* loc, const float* attn, const float* grad_out, float* grad_value,
                                  float* grad_loc, float* grad_attn) {
  const int64_t n = d.batch * d.num_queries * d.num_heads * d.channels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % d.channels, group = i / d.channels, m = group % d.num_heads;
    const int64_t b = group / (d.num_heads * d.num_queries);
    const int64_t stride = d.num_heads * d.channels;
    const int64_t off = b * d.num_values * stride + m * d.channels + c;
    const float go = grad_out[i];
    for (int64_t l = 0; l < d.num_levels; ++l) {
      const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
      for (int64_t p = 0; p < d.num_points; ++p) {
        const int64_t k = (group * d.num_levels + l) * d.num_points + p;
        const Sample s = sample_at(loc[2 * k], loc[2 * k + 1], h, w, starts[l]);
        if (!s.inside) continue;
        const float a = attn[k], hh = 1 - s.lh, hw = 1 - s.lw;
        const float dw[4] = {-hh, hh, -s.lh, s.lh}, dh[4] = {-hw, -s.lw, hw, s.lw};
        float v = 0, gx = 0, gy = 0;
        for (int j = 0; j < 4; ++j) {
          if (s.idx[j] < 0) continue;
          const float vj = value[off + s.idx[j] * stride];
          v += s.w[j] * vj;
          gx += dw[j] * vj;
          gy += dh[j] * vj;
          atomicAdd(grad_value + off + s.idx[j] * stride, go * a * s.w[j]);
        }
        atomicAdd(grad_attn + k, go * v);
        atomicAdd(grad_loc + 2 * k, go * a * gx * w);
        atomicAdd(grad_loc + 2 * k + 1, go * a * gy * h);
      }
    }
  }
}

unsigned blocks(const DinoMsdaShape* s) {
  const int64_t n = s->batch * s->num_queries * s->num_heads * s->channels;
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 8 ? b : 65535 * 8);
}

}  // namespace

extern "C" cudaError_t dino_msda_baseline_forward_f32(const DinoMsdaShape* shape, const float* value,
                                                      const int64_t* spatial_shapes,
                                                      const int64_t* level_start_index,
                                                      const float* sampling_locations,
                                                      const float* attention_weights, float* output,
                                                      cudaStream_t stream) {
  baseline_forward<<<blocks(shape), kThreads, 0, stream>>>(*shape, value, spatial_shapes, level_start_index,
                                                          sampling_locations, attention_weights, output);
  return cudaGetLastError();
}

extern "C" cudaError_t dino_msda_baseline_backward_f32(const DinoMsdaShape* shape, const float* value,
                                                       const int64_t* spatial_shapes,
                                                       const int64_t* level_start_index,
                                                       const float* sampling_locations,
                                                       const float* attention_weights, const float* grad_output,
                                                       float* grad_value, float* grad_sampling_locations,
                                                       float* grad_attention_weights, cudaStream_t stream) {
  const DinoMsdaShape& s = *shape;
  const size_t nv = s.batch * s.num_values * s.num_heads * s.channels;
  const size_t na = s.batch * s.num_queries * s.num_heads * s.num_levels * s.num_points;
  cudaMemsetAsync(grad_value, 0, nv * sizeof(float), stream);
  cudaMemsetAsync(grad_sampling_locations, 0, 2 * na * sizeof(float), stream);
  cudaMemsetAsync(grad_attention_weights, 0, na * sizeof(float), stream);
  baseline_backward<<<blocks(shape), kThreads, 0, stream>>>(*shape, value, spatial_shapes, level_start_index,
                                                           sampling_locations, attention_weights, grad_output,
                                                           grad_value, grad_sampling_locations,
                                                           grad_attention_weights);
  return cudaGetLastError();
}
