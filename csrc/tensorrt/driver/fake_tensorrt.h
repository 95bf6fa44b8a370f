// The few TensorRT objects a plugin receives, made by the test instead of libnvinfer: a plugin registry (which the
// plugin library's static registrar fills through getPluginRegistry(), defined in fake_tensorrt.cpp), dimension
// expressions and an expression builder. Lets tests/test_plugin.py drive the plugin exactly as TensorRT would,
// without TensorRT. Compiles against the public headers of TensorRT 10 and 11.
#ifndef DINO_TRT_DRIVER_FAKE_TENSORRT_H_
#define DINO_TRT_DRIVER_FAKE_TENSORRT_H_

#include <NvInferRuntime.h>

#include <memory>
#include <string>
#include <vector>

namespace dino_driver {

// A dimension: a constant or a named symbol (a dynamic axis).
class DimExpr : public nvinfer1::IDimensionExpr {
 public:
  DimExpr(bool constant, int64_t value, std::string symbol);
  ~DimExpr() noexcept override = default;
  std::string const& symbol() const { return mImplObj.symbol; }

 private:
  struct Impl : nvinfer1::apiv::VDimensionExpr {
    bool constant;
    int64_t value;
    std::string symbol;
    bool isConstant() const override { return constant; }
    int64_t getConstantValue() const override { return constant ? value : -1; }
    bool isSizeTensor() const override { return false; }
  } mImplObj;
};

class ExprBuilder : public nvinfer1::IExprBuilder {
 public:
  ExprBuilder();
  ~ExprBuilder() noexcept override = default;
  DimExpr const* make(int64_t value);            // constant
  DimExpr const* make(std::string const& name);  // symbol
  size_t size() const { return mImplObj.exprs.size(); }

 private:
  struct Impl : nvinfer1::apiv::VExprBuilder {
    std::vector<std::unique_ptr<DimExpr>> exprs;
    nvinfer1::IDimensionExpr const* constant(int64_t value) override;
    nvinfer1::IDimensionExpr const* operation(nvinfer1::DimensionOperation op, nvinfer1::IDimensionExpr const& a,
                                              nvinfer1::IDimensionExpr const& b) override;
    nvinfer1::IDimensionExpr const* declareSizeTensor(int32_t, nvinfer1::IDimensionExpr const&,
                                                      nvinfer1::IDimensionExpr const&) override {
      return nullptr;
    }
  } mImplObj;
};

// Records registerCreator calls; the rest of the interface answers "nothing here".
class Registry : public nvinfer1::IPluginRegistry {
 public:
  struct Entry {
    nvinfer1::IPluginCreatorInterface* creator;
    std::string pluginNamespace;
  };
  std::vector<Entry> entries;

  ~Registry() noexcept override = default;
  bool registerCreator(nvinfer1::IPluginCreatorInterface& creator,
                       nvinfer1::AsciiChar const* const pluginNamespace) noexcept override;
  nvinfer1::IPluginCreatorInterface* getCreator(nvinfer1::AsciiChar const* const pluginName,
                                                nvinfer1::AsciiChar const* const pluginVersion,
                                                nvinfer1::AsciiChar const* const pluginNamespace) noexcept override;
  void setErrorRecorder(nvinfer1::IErrorRecorder* const) noexcept override {}
  nvinfer1::IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
  bool isParentSearchEnabled() const override { return false; }
  void setParentSearchEnabled(bool const) override {}
  PluginLibraryHandle loadLibrary(nvinfer1::AsciiChar const*) noexcept override { return nullptr; }
  void deregisterLibrary(PluginLibraryHandle) noexcept override {}
  nvinfer1::IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override;
  bool deregisterCreator(nvinfer1::IPluginCreatorInterface const&) noexcept override { return false; }
  nvinfer1::IPluginResource* acquirePluginResource(nvinfer1::AsciiChar const*,
                                                   nvinfer1::IPluginResource*) noexcept override {
    return nullptr;
  }
  int32_t releasePluginResource(nvinfer1::AsciiChar const*) noexcept override { return -1; }
  nvinfer1::IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override {
    return getAllCreators(n);
  }
#if NV_TENSORRT_MAJOR < 11
  // TensorRT 10 still declares the deprecated IPluginCreator (V2) registry methods; they must be overridden.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  bool registerCreator(nvinfer1::IPluginCreator&, nvinfer1::AsciiChar const* const) noexcept override {
    return false;
  }
  nvinfer1::IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override {
    *n = 0;
    return nullptr;
  }
  nvinfer1::IPluginCreator* getPluginCreator(nvinfer1::AsciiChar const* const, nvinfer1::AsciiChar const* const,
                                             nvinfer1::AsciiChar const* const) noexcept override {
    return nullptr;
  }
  bool deregisterCreator(nvinfer1::IPluginCreator const&) noexcept override { return false; }
#pragma GCC diagnostic pop
#endif

 private:
  mutable std::vector<nvinfer1::IPluginCreatorInterface*> mList;
};

// The registry the plugin library registered into (getPluginRegistry()).
Registry& registry();

}  // namespace dino_driver

#endif  // DINO_TRT_DRIVER_FAKE_TENSORRT_H_
