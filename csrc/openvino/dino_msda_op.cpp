// See dino_msda_op.h. Parallel over the kernels' (b, q, m) rows with tbb::parallel_for: inside OpenVINO's CPU
// plugin it runs in the stream's task arena, so it uses INFERENCE_NUM_THREADS threads and no other thread pool.
#include "dino_msda_op.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn_cpu.h"

namespace dino_ov {

namespace {

// tbb::parallel_for in the kernels' ParallelFor shape, with TBB's default (auto) partitioner: on R50 800x1333
// encoder sizes (S = Q = 22223, M = 8, D = 32, L = P = 4), 2 threads on a loaded 2-core Xeon, alternated 6x: median
// 589 ms against 722 ms with the static partitioner (one even piece per thread, as at::parallel_for under OpenMP)
// and 615 ms for the PyTorch binding.
struct TbbParallelFor {
  template <typename Body>
  void operator()(int64_t begin, int64_t end, int64_t grain, const Body& body) const {
    if (begin >= end) return;
    tbb::parallel_for(tbb::blocked_range<int64_t>(begin, end, static_cast<size_t>(grain)),
                      [&](const tbb::blocked_range<int64_t>& r) { body(r.begin(), r.end()); });
  }
};

bool is_float(const ov::element::Type& t) {
  return t == ov::element::f32 || t == ov::element::f16 || t == ov::element::bf16;
}

// The tensor as float32: its own data when it is f32, else a widened copy kept in `storage`.
const float* as_f32(const ov::Tensor& t, std::vector<float>& storage) {
  const auto type = t.get_element_type();
  if (type == ov::element::f32) return t.data<const float>();
  storage.resize(t.get_size());
  if (type == ov::element::f16) {
    const ov::float16* p = t.data<const ov::float16>();
    for (size_t i = 0; i < storage.size(); ++i) storage[i] = static_cast<float>(p[i]);
  } else {
    const ov::bfloat16* p = t.data<const ov::bfloat16>();
    for (size_t i = 0; i < storage.size(); ++i) storage[i] = static_cast<float>(p[i]);
  }
  return storage.data();
}

int64_t int_at(const ov::Tensor& t, size_t i) {
  const auto type = t.get_element_type();
  if (type == ov::element::i32) return t.data<const int32_t>()[i];
  if (type == ov::element::i64) return t.data<const int64_t>()[i];
  OPENVINO_THROW("DinoMSDeformAttn: spatial_shapes and level_start_index must be i32 or i64, got ", type);
}

}  // namespace

DinoMSDeformAttn::DinoMSDeformAttn(const ov::OutputVector& args) : Op(args) { constructor_validate_and_infer_types(); }

void DinoMSDeformAttn::validate_and_infer_types() {
  NODE_VALIDATION_CHECK(this, get_input_size() == 5, "expects 5 inputs, got ", get_input_size());
  const auto type = get_input_element_type(0);
  NODE_VALIDATION_CHECK(this, type.is_dynamic() || is_float(type), "value must be f32, f16 or bf16, got ", type);
  for (size_t i : {size_t(1), size_t(2)}) {
    const auto t = get_input_element_type(i);
    NODE_VALIDATION_CHECK(this, t.is_dynamic() || t == ov::element::i32 || t == ov::element::i64, "input ", i,
                          " must be i32 or i64, got ", t);
  }
  const auto& value = get_input_partial_shape(0);
  const auto& loc = get_input_partial_shape(3);
  const auto& attn = get_input_partial_shape(4);
  NODE_VALIDATION_CHECK(this, value.rank().compatible(4), "value must be (B, S, M, D), got ", value);
  NODE_VALIDATION_CHECK(this, loc.rank().compatible(6), "sampling_locations must be (B, Q, M, L, P, 2), got ", loc);
  NODE_VALIDATION_CHECK(this, attn.rank().compatible(5), "attention_weights must be (B, Q, M, L, P), got ", attn);
  ov::PartialShape out = ov::PartialShape::dynamic(4);
  if (value.rank().is_static()) {
    out[0] = value[0];
    out[2] = value[2];
    out[3] = value[3];
  }
  if (loc.rank().is_static()) {
    NODE_VALIDATION_CHECK(this, loc[5].compatible(2), "sampling_locations must end in 2 (x, y), got ", loc);
    NODE_VALIDATION_CHECK(this, ov::Dimension::merge(out[0], out[0], loc[0]) &&
                                    ov::Dimension::merge(out[2], out[2], loc[2]),
                          "sampling_locations ", loc, " does not match value ", value, " in B or M");
    out[1] = loc[1];
  }
  set_output_type(0, type, out);
}

std::shared_ptr<ov::Node> DinoMSDeformAttn::clone_with_new_inputs(const ov::OutputVector& new_args) const {
  check_new_args_count(this, new_args);
  return std::make_shared<DinoMSDeformAttn>(new_args);
}

bool DinoMSDeformAttn::visit_attributes(ov::AttributeVisitor&) { return true; }

bool DinoMSDeformAttn::has_evaluate() const { return is_float(get_input_element_type(0)); }

bool DinoMSDeformAttn::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
  const ov::Shape vs = inputs[0].get_shape(), ls = inputs[3].get_shape(), as = inputs[4].get_shape();
  OPENVINO_ASSERT(vs.size() == 4 && ls.size() == 6 && ls[5] == 2 && as.size() == 5,
                  "DinoMSDeformAttn: value ", vs, ", sampling_locations ", ls, ", attention_weights ", as,
                  " are not (B, S, M, D), (B, Q, M, L, P, 2), (B, Q, M, L, P)");
  const dino_cpu::Dims d{int64_t(vs[0]), int64_t(vs[1]), int64_t(vs[2]), int64_t(vs[3]),
                         int64_t(ls[3]), int64_t(ls[1]), int64_t(ls[4])};
  const ov::Shape weights_shape{ls[0], ls[1], ls[2], ls[3], ls[4]};
  OPENVINO_ASSERT(ls[0] == vs[0] && ls[2] == vs[2] && as == weights_shape,
                  "DinoMSDeformAttn: value ", vs, ", sampling_locations ", ls, ", attention_weights ", as,
                  " disagree in B, Q, M, L or P");
  OPENVINO_ASSERT(inputs[1].get_size() == size_t(2 * d.L) && inputs[2].get_size() == size_t(d.L),
                  "DinoMSDeformAttn: spatial_shapes must be (L, 2) and level_start_index (L,) with L = ", d.L);
  std::vector<dino_cpu::Level> levels(d.L);
  for (int64_t l = 0; l < d.L; ++l) {
    levels[l] = {int_at(inputs[1], 2 * l), int_at(inputs[1], 2 * l + 1), int_at(inputs[2], l)};
  }
  const std::string bad = dino_cpu::check_levels(d, levels.data());
  OPENVINO_ASSERT(bad.empty(), bad);

  ov::Tensor& out = outputs[0];
  out.set_shape(ov::Shape{vs[0], ls[1], vs[2], vs[3]});
  const bool f32_out = out.get_element_type() == ov::element::f32;
  std::vector<float> value_f32, loc_f32, attn_f32, out_f32(f32_out ? 0 : out.get_size());
  const float* value = as_f32(inputs[0], value_f32);
  const float* loc = as_f32(inputs[3], loc_f32);
  const float* attn = as_f32(inputs[4], attn_f32);
  float* result = f32_out ? out.data<float>() : out_f32.data();
  if (out.get_size() == 0) return true;
  if (d.S == 0) {
    std::fill(result, result + out.get_size(), 0.0f);
  } else {
    dino_cpu::dispatch_channels(d.D, [&](auto kD) {
      dino_cpu::forward_rows<float, decltype(kD)::value>(d, levels.data(), value, loc, attn, result,
                                                         TbbParallelFor{});
    });
  }
  if (!f32_out) {
    const auto type = out.get_element_type();
    for (size_t i = 0; i < out_f32.size(); ++i) {
      if (type == ov::element::f16) {
        out.data<ov::float16>()[i] = ov::float16(out_f32[i]);
      } else {
        out.data<ov::bfloat16>()[i] = ov::bfloat16(out_f32[i]);
      }
    }
  }
  return true;
}

}  // namespace dino_ov
