// The library's extensions: the op itself (so that a saved IR with DinoMSDeformAttn reads back) and the ONNX
// frontend's mapping of the plugin graph's node trt.plugins::DinoMSDeformAttn to it (its attributes plugin_version
// and plugin_namespace name a TensorRT plugin and carry nothing the op needs).
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/op.hpp>

#include "dino_msda_op.h"

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<dino_ov::DinoMSDeformAttn>>(),
    std::make_shared<ov::frontend::onnx::OpExtension<dino_ov::DinoMSDeformAttn>>("DinoMSDeformAttn", "trt.plugins"),
}));
