// See fake_tensorrt.h.
#include "fake_tensorrt.h"

#include <cstring>

namespace dino_driver {

DimExpr::DimExpr(bool constant, int64_t value, std::string symbol) {
  mImplObj.constant = constant;
  mImplObj.value = value;
  mImplObj.symbol = std::move(symbol);
  mImpl = &mImplObj;
}

ExprBuilder::ExprBuilder() { mImpl = &mImplObj; }

DimExpr const* ExprBuilder::make(int64_t value) {
  return static_cast<DimExpr const*>(mImplObj.constant(value));
}

DimExpr const* ExprBuilder::make(std::string const& name) {
  mImplObj.exprs.push_back(std::make_unique<DimExpr>(false, -1, name));
  return mImplObj.exprs.back().get();
}

nvinfer1::IDimensionExpr const* ExprBuilder::Impl::constant(int64_t value) {
  exprs.push_back(std::make_unique<DimExpr>(true, value, ""));
  return exprs.back().get();
}

nvinfer1::IDimensionExpr const* ExprBuilder::Impl::operation(nvinfer1::DimensionOperation op,
                                                             nvinfer1::IDimensionExpr const& a,
                                                             nvinfer1::IDimensionExpr const& b) {
  if (a.isConstant() && b.isConstant()) {
    int64_t x = a.getConstantValue(), y = b.getConstantValue(), r = 0;
    switch (op) {
      case nvinfer1::DimensionOperation::kSUM: r = x + y; break;
      case nvinfer1::DimensionOperation::kPROD: r = x * y; break;
      case nvinfer1::DimensionOperation::kMAX: r = x > y ? x : y; break;
      case nvinfer1::DimensionOperation::kMIN: r = x < y ? x : y; break;
      case nvinfer1::DimensionOperation::kSUB: r = x - y; break;
      default: return nullptr;
    }
    return constant(r);
  }
  auto const* da = static_cast<DimExpr const*>(&a);
  auto const* db = static_cast<DimExpr const*>(&b);
  std::string name = "(" + (a.isConstant() ? std::to_string(a.getConstantValue()) : da->symbol()) + " op" +
                     std::to_string(static_cast<int>(op)) + " " +
                     (b.isConstant() ? std::to_string(b.getConstantValue()) : db->symbol()) + ")";
  exprs.push_back(std::make_unique<DimExpr>(false, -1, name));
  return exprs.back().get();
}

bool Registry::registerCreator(nvinfer1::IPluginCreatorInterface& creator,
                               nvinfer1::AsciiChar const* const pluginNamespace) noexcept {
  entries.push_back({&creator, pluginNamespace != nullptr ? pluginNamespace : ""});
  return true;
}

nvinfer1::IPluginCreatorInterface* Registry::getCreator(nvinfer1::AsciiChar const* const pluginName,
                                                        nvinfer1::AsciiChar const* const pluginVersion,
                                                        nvinfer1::AsciiChar const* const pluginNamespace) noexcept {
  for (Entry const& e : entries) {
    auto* c = static_cast<nvinfer1::IPluginCreatorV3One*>(e.creator);
    if (std::strcmp(c->getPluginName(), pluginName) == 0 && std::strcmp(c->getPluginVersion(), pluginVersion) == 0 &&
        e.pluginNamespace == (pluginNamespace != nullptr ? pluginNamespace : "")) {
      return e.creator;
    }
  }
  return nullptr;
}

nvinfer1::IPluginCreatorInterface* const* Registry::getAllCreators(int32_t* const n) const noexcept {
  mList.clear();
  for (Entry const& e : entries) mList.push_back(e.creator);
  *n = static_cast<int32_t>(mList.size());
  return mList.data();
}

Registry& registry() {
  static Registry instance;  // function-local: ready when the plugin library's initializer runs, before ours
  return instance;
}

}  // namespace dino_driver

extern "C" nvinfer1::IPluginRegistry* getPluginRegistry() noexcept { return &dino_driver::registry(); }
