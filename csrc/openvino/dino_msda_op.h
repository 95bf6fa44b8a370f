// DinoMSDeformAttn: multi-scale deformable attention as an OpenVINO operation, computed by the project's CPU kernels
// (csrc/cpu/ms_deform_attn_cpu.h). Built and loaded by dino/ops/openvino_build.py.
//
// Inputs (the layout of the ONNX node trt.plugins::DinoMSDeformAttn, export/plugin_node.py):
//   0 value (B, S, M, D), 1 spatial_shapes (L, 2) integer (h, w), 2 level_start_index (L,) integer,
//   3 sampling_locations (B, Q, M, L, P, 2) as (x, y) in [0, 1], 4 attention_weights (B, Q, M, L, P).
// Output: (B, Q, M, D) in value's element type. Always computed in float32: f16/bf16 inputs are widened and the
// result narrowed, so the op's arithmetic does not follow the inference precision hint.
#pragma once

#include <openvino/op/op.hpp>

namespace dino_ov {

class DinoMSDeformAttn : public ov::op::Op {
 public:
  OPENVINO_OP("DinoMSDeformAttn", "dino_extension");

  DinoMSDeformAttn() = default;
  explicit DinoMSDeformAttn(const ov::OutputVector& args);

  void validate_and_infer_types() override;
  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override;
  bool visit_attributes(ov::AttributeVisitor& visitor) override;
  bool has_evaluate() const override;
  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;
};

}  // namespace dino_ov
