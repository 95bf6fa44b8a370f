/*
 * TensorRT IPluginV3 plugin "DinoMSDeformAttn" (version "1"): multi-scale deformable attention with the kernels of
 * csrc/ms_deform_attn/ (fp32 accumulation for fp32, fp16 and bf16 inputs).
 *
 * ONNX node (written by `dino export onnx --deform-op plugin`, see export/plugin_node.py):
 *   domain trt.plugins, op_type DinoMSDeformAttn, attributes plugin_version="1", plugin_namespace="".
 *   inputs  0 value               (B, S, M, D)        float32 | float16 | bfloat16
 *           1 spatial_shapes      (L, 2) int32        (H_l, W_l)
 *           2 level_start_index   (L,)   int32
 *           3 sampling_locations  (B, Q, M, L, P, 2)  same type as value
 *           4 attention_weights   (B, Q, M, L, P)     same type as value
 *   output  0                     (B, Q, M, D)        same type as value
 * The plugin has no fields; createPlugin with any field fails (returns nullptr, naming the field on stderr).
 *
 * Loading the shared library registers the creator (static initializer) under the namespace "" and under
 * "trt.plugins" (parsers from TensorRT 10.10 on may read the node's domain as the namespace).
 */
#ifndef DINO_TRT_MSDA_PLUGIN_H_
#define DINO_TRT_MSDA_PLUGIN_H_

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace dino_trt {

constexpr char const* kPluginName = "DinoMSDeformAttn";
constexpr char const* kPluginVersion = "1";

class MSDeformAttnPlugin : public nvinfer1::IPluginV3,
                           public nvinfer1::IPluginV3OneCore,
                           public nvinfer1::IPluginV3OneBuild,
                           public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit MSDeformAttnPlugin(std::string pluginNamespace);
  ~MSDeformAttnPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return mNamespace.c_str(); }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  // The kernels need no scratch memory.
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
                          nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
                          int32_t /*nbOutputs*/) const noexcept override {
    return 0;
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  std::string mNamespace;
  nvinfer1::PluginFieldCollection mSerialized{0, nullptr};
};

class MSDeformAttnPluginCreator : public nvinfer1::IPluginCreatorV3One {
 public:
  explicit MSDeformAttnPluginCreator(std::string pluginNamespace);
  ~MSDeformAttnPluginCreator() override = default;

  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return mNamespace.c_str(); }
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFields; }
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;

 private:
  std::string mNamespace;
  nvinfer1::PluginFieldCollection mFields{0, nullptr};
};

}  // namespace dino_trt

#endif  // DINO_TRT_MSDA_PLUGIN_H_
