// TensorRT IPluginV3 wrapper of the framework-free deformable-attention kernels; see dino_msda_plugin.h.
#include "dino_msda_plugin.h"

#include <cstdio>
#include <new>

#include "ms_deform_attn.h"

namespace dino_trt {
namespace {

constexpr int32_t kNbInputs = 5;
enum Input : int32_t { kValue = 0, kShapes = 1, kStarts = 2, kLocations = 3, kWeights = 4, kOutput = 5 };

bool isFloatType(nvinfer1::DataType t) {
  return t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF || t == nvinfer1::DataType::kBF16;
}

bool toKernelType(nvinfer1::DataType t, DinoMsdaDType* out) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: *out = DINO_MSDA_FLOAT32; return true;
    case nvinfer1::DataType::kHALF: *out = DINO_MSDA_FLOAT16; return true;
    case nvinfer1::DataType::kBF16: *out = DINO_MSDA_BFLOAT16; return true;
    default: return false;
  }
}

void logError(char const* what) { std::fprintf(stderr, "[DinoMSDeformAttn] %s\n", what); }

}  // namespace

MSDeformAttnPlugin::MSDeformAttnPlugin(std::string pluginNamespace) : mNamespace(std::move(pluginNamespace)) {}

nvinfer1::IPluginCapability* MSDeformAttnPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* MSDeformAttnPlugin::clone() noexcept {
  return new (std::nothrow) MSDeformAttnPlugin(mNamespace);
}

int32_t MSDeformAttnPlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                                               nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept {
  if (nbOutputs != 1 || nbInputs != kNbInputs) return -1;
  outputTypes[0] = inputTypes[kValue];
  return 0;
}

int32_t MSDeformAttnPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                            nvinfer1::DimsExprs const*, int32_t, nvinfer1::DimsExprs* outputs,
                                            int32_t nbOutputs, nvinfer1::IExprBuilder&) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != 1 || inputs[kValue].nbDims != 4 || inputs[kLocations].nbDims != 6 ||
      inputs[kWeights].nbDims != 5) {
    logError("expects value (B,S,M,D), sampling_locations (B,Q,M,L,P,2), attention_weights (B,Q,M,L,P)");
    return -1;
  }
  // (B, Q, M, D): batch and heads/channels from value, queries from the locations.
  outputs[0].nbDims = 4;
  outputs[0].d[0] = inputs[kValue].d[0];
  outputs[0].d[1] = inputs[kLocations].d[1];
  outputs[0].d[2] = inputs[kValue].d[2];
  outputs[0].d[3] = inputs[kValue].d[3];
  return 0;
}

bool MSDeformAttnPlugin::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                                   int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos > kOutput) return false;
  nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
  if (desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
  if (pos == kShapes || pos == kStarts) return desc.type == nvinfer1::DataType::kINT32;
  // Locations, weights and output follow the value's type (TensorRT asks in position order, so inOut[kValue] is
  // already one this function accepted; checked again for callers that ask out of order).
  return isFloatType(desc.type) && (pos == kValue || desc.type == inOut[kValue].desc.type);
}

int32_t MSDeformAttnPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const*, int32_t nbInputs,
                                            nvinfer1::DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
  return (nbInputs == kNbInputs && nbOutputs == 1) ? 0 : -1;
}

int32_t MSDeformAttnPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                                          nvinfer1::PluginTensorDesc const*, int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != 1) return -1;
  if (in[kShapes].dims.d[0] > DINO_MSDA_MAX_LEVELS) {
    logError("more feature levels than DINO_MSDA_MAX_LEVELS");
    return -1;
  }
  return 0;
}

int32_t MSDeformAttnPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
                                    void const* const* inputs, void* const* outputs, void*,
                                    cudaStream_t stream) noexcept {
  DinoMsdaDType dtype;
  if (!toKernelType(inputDesc[kValue].type, &dtype)) {
    logError("unsupported data type");
    return -1;
  }
  nvinfer1::Dims const& v = inputDesc[kValue].dims;
  nvinfer1::Dims const& loc = inputDesc[kLocations].dims;
  DinoMsdaShape shape;
  shape.batch = v.d[0];
  shape.num_values = v.d[1];
  shape.num_heads = v.d[2];
  shape.channels = v.d[3];
  shape.num_queries = loc.d[1];
  shape.num_levels = loc.d[3];
  shape.num_points = loc.d[4];
  if (shape.batch == 0 || shape.num_queries == 0) return 0;  // empty batch: nothing to write
  // (B, Q, M*D) written by the kernel has the same memory layout as the plugin's (B, Q, M, D) output.
  cudaError_t err = dino_msda_forward_i32(dtype, &shape, inputs[kValue], static_cast<int32_t const*>(inputs[kShapes]),
                                          static_cast<int32_t const*>(inputs[kStarts]), inputs[kLocations],
                                          inputs[kWeights], outputs[0], stream);
  if (err != cudaSuccess) {
    logError(cudaGetErrorString(err));
    return -1;
  }
  return 0;
}

nvinfer1::IPluginV3* MSDeformAttnPlugin::attachToContext(nvinfer1::IPluginResourceContext*) noexcept {
  return clone();
}

nvinfer1::PluginFieldCollection const* MSDeformAttnPlugin::getFieldsToSerialize() noexcept { return &mSerialized; }

MSDeformAttnPluginCreator::MSDeformAttnPluginCreator(std::string pluginNamespace)
    : mNamespace(std::move(pluginNamespace)) {}

nvinfer1::IPluginV3* MSDeformAttnPluginCreator::createPlugin(char const* name,
                                                             nvinfer1::PluginFieldCollection const* fc,
                                                             nvinfer1::TensorRTPhase) noexcept {
  // The plugin has no fields: a field here is a typo or an exporter of another version, never silently ignored.
  // (The ONNX parser passes only the fields getFieldNames() lists, i.e. none.)
  if (fc != nullptr && fc->nbFields > 0) {
    for (int32_t i = 0; i < fc->nbFields; ++i) {
      char const* field = fc->fields != nullptr && fc->fields[i].name != nullptr ? fc->fields[i].name : "(null)";
      std::fprintf(stderr, "[DinoMSDeformAttn] %s: unknown field \"%s\" (plugin version %s has no fields)\n",
                   name != nullptr ? name : "", field, kPluginVersion);
    }
    return nullptr;
  }
  return new (std::nothrow) MSDeformAttnPlugin(mNamespace);
}

namespace {

// One creator per namespace: "" for parsers that read the plugin_namespace attribute (default ""), "trt.plugins"
// for parsers that take the node's domain as the namespace.
struct Registrar {
  MSDeformAttnPluginCreator plain{""};
  MSDeformAttnPluginCreator domain{"trt.plugins"};
  Registrar() {
    nvinfer1::IPluginRegistry* registry = getPluginRegistry();
    if (registry == nullptr) return;
    registry->registerCreator(plain, "");
    registry->registerCreator(domain, "trt.plugins");
  }
};

Registrar const gRegistrar;

}  // namespace
}  // namespace dino_trt
