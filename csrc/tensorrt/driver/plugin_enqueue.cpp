// C entry point for tests/test_plugin.py (ctypes): runs the plugin on device tensors the test made, through the
// calls TensorRT makes before an enqueue, in its order: creator lookup, createPlugin (build phase), output types and
// shapes, format check, configurePlugin, workspace size, serialization to createPlugin (runtime phase),
// attachToContext, onShapeChange, enqueue; then destroys every plugin. Links libdino_trt_plugin.so.
#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fake_tensorrt.h"

using namespace nvinfer1;

namespace {

struct Deleter {
  void operator()(IPluginV3* p) const { delete p; }
};
using PluginPtr = std::unique_ptr<IPluginV3, Deleter>;

int fail(char* err, int errLen, std::string const& what) {
  std::snprintf(err, static_cast<size_t>(errLen), "%s", what.c_str());
  return 1;
}

PluginTensorDesc desc(std::vector<int64_t> const& dims, DataType type) {
  PluginTensorDesc d{};
  d.dims.nbDims = static_cast<int32_t>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) d.dims.d[i] = dims[i];
  d.type = type;
  d.format = TensorFormat::kLINEAR;
  d.scale = 1.0F;
  return d;
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16. sizes: B, S, M, D, L, Q, P. Every pointer is device memory; shapes and
// starts are int32 (L, 2) and (L,); out is (B, Q, M, D). stream: a cudaStream_t (0 = default stream). Returns 0, or
// 1 with a message in err. Synchronous: waits for the stream.
extern "C" int dino_driver_enqueue(int dtype, int64_t const* sizes, void const* value, void const* shapes,
                                   void const* starts, void const* locations, void const* weights, void* out,
                                   void* stream, char* err, int errLen) {
  DataType const types[] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16};
  if (dtype < 0 || dtype > 2) return fail(err, errLen, "dtype must be 0, 1 or 2");
  DataType const t = types[dtype];
  int64_t const B = sizes[0], S = sizes[1], M = sizes[2], D = sizes[3], L = sizes[4], Q = sizes[5], P = sizes[6];

  auto* creator = static_cast<IPluginCreatorV3One*>(
      dino_driver::registry().getCreator("DinoMSDeformAttn", "1", "trt.plugins"));
  if (creator == nullptr) return fail(err, errLen, "no DinoMSDeformAttn/1 creator registered under trt.plugins");
  PluginFieldCollection none{0, nullptr};
  PluginPtr built(creator->createPlugin("msda", &none, TensorRTPhase::kBUILD));
  if (!built) return fail(err, errLen, "createPlugin (build) returned null");
  auto* build = static_cast<IPluginV3OneBuild*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));

  std::vector<PluginTensorDesc> io = {desc({B, S, M, D}, t),          desc({L, 2}, DataType::kINT32),
                                      desc({L}, DataType::kINT32),    desc({B, Q, M, L, P, 2}, t),
                                      desc({B, Q, M, L, P}, t),       desc({B, Q, M, D}, t)};
  DataType inTypes[5], outType{};
  for (int i = 0; i < 5; ++i) inTypes[i] = io[i].type;
  if (build->getOutputDataTypes(&outType, 1, inTypes, 5) != 0 || outType != t) {
    return fail(err, errLen, "getOutputDataTypes");
  }
  dino_driver::ExprBuilder exprs;
  DimsExprs inExprs[5]{}, outExprs[1]{};
  for (int i = 0; i < 5; ++i) {
    inExprs[i].nbDims = io[i].dims.nbDims;
    for (int j = 0; j < io[i].dims.nbDims; ++j) inExprs[i].d[j] = exprs.make(io[i].dims.d[j]);
  }
  if (build->getOutputShapes(inExprs, 5, nullptr, 0, outExprs, 1, exprs) != 0 || outExprs[0].nbDims != 4) {
    return fail(err, errLen, "getOutputShapes");
  }
  for (int j = 0; j < 4; ++j) {
    if (!outExprs[0].d[j]->isConstant() || outExprs[0].d[j]->getConstantValue() != io[5].dims.d[j]) {
      return fail(err, errLen, "getOutputShapes: output dim " + std::to_string(j) + " differs from (B, Q, M, D)");
    }
  }
  std::vector<DynamicPluginTensorDesc> dyn(6);
  for (int i = 0; i < 6; ++i) dyn[i] = DynamicPluginTensorDesc{io[i], io[i].dims, io[i].dims, io[i].dims};
  for (int pos = 0; pos < 6; ++pos) {
    if (!build->supportsFormatCombination(pos, dyn.data(), 5, 1)) {
      return fail(err, errLen, "supportsFormatCombination refused position " + std::to_string(pos));
    }
  }
  if (build->configurePlugin(dyn.data(), 5, dyn.data() + 5, 1) != 0) return fail(err, errLen, "configurePlugin");
  if (build->getWorkspaceSize(dyn.data(), 5, dyn.data() + 5, 1) != 0) return fail(err, errLen, "workspace != 0");

  auto* builtRuntime =
      static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  PluginPtr restored(creator->createPlugin("msda", builtRuntime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
  if (!restored) return fail(err, errLen, "createPlugin (runtime) returned null");
  auto* restoredRuntime =
      static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  PluginPtr context(restoredRuntime->attachToContext(nullptr));
  if (!context) return fail(err, errLen, "attachToContext returned null");
  auto* runtime = static_cast<IPluginV3OneRuntime*>(context->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  if (runtime->onShapeChange(io.data(), 5, io.data() + 5, 1) != 0) return fail(err, errLen, "onShapeChange");
  void const* inputs[] = {value, shapes, starts, locations, weights};
  void* outputs[] = {out};
  auto s = static_cast<cudaStream_t>(stream);
  if (runtime->enqueue(io.data(), io.data() + 5, inputs, outputs, nullptr, s) != 0) {
    return fail(err, errLen, "enqueue returned an error");
  }
  cudaError_t e = cudaStreamSynchronize(s);
  if (e != cudaSuccess) return fail(err, errLen, std::string("after enqueue: ") + cudaGetErrorString(e));
  return 0;
}
