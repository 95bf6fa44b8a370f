// Drives libdino_trt_plugin.so through the calls TensorRT makes, in TensorRT's order, without TensorRT:
// registration at load, the creator, createPlugin, the build-phase queries (output count, types, shapes, every
// type/format combination), configurePlugin, workspace size, serialization round trip, clone, attachToContext,
// onShapeChange and destruction. Built and run (under AddressSanitizer/LeakSanitizer) by tests/test_plugin.py.
//
// Prints "ok <check>" or "FAIL <check>: <detail>" per check; exit code 1 when any failed. No GPU needed: enqueue is
// exercised by plugin_enqueue.cpp.
#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "fake_tensorrt.h"

using namespace nvinfer1;

namespace {

int gFailures = 0;

void check(bool ok, char const* name, std::string const& detail = "") {
  if (ok) {
    std::printf("ok %s\n", name);
  } else {
    ++gFailures;
    std::printf("FAIL %s: %s\n", name, detail.c_str());
  }
}

constexpr int32_t kIn = 5;
constexpr int32_t kAll = 6;

bool isFloat(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }

// What the plugin documents as supported, position by position (value, shapes, starts, locations, weights, output).
bool expectedSupport(int32_t pos, DataType type, TensorFormat format, DataType valueType) {
  if (format != TensorFormat::kLINEAR) return false;
  if (pos == 1 || pos == 2) return type == DataType::kINT32;
  if (pos == 0) return isFloat(type);
  return isFloat(type) && type == valueType;
}

PluginTensorDesc tensorDesc(std::vector<int64_t> const& dims, DataType type) {
  PluginTensorDesc d{};
  d.dims.nbDims = static_cast<int32_t>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) d.dims.d[i] = dims[i];
  d.type = type;
  d.format = TensorFormat::kLINEAR;
  d.scale = 1.0F;
  return d;
}

DynamicPluginTensorDesc dynamicDesc(std::vector<int64_t> const& dims, DataType type, int64_t maxBatch) {
  DynamicPluginTensorDesc d{};
  d.desc = tensorDesc(dims, type);
  d.min = d.desc.dims;
  d.max = d.desc.dims;
  d.opt = d.desc.dims;
  if (dims.size() >= 4) {  // the float tensors have a batch axis
    d.desc.dims.d[0] = -1;
    d.min.d[0] = 1;
    d.max.d[0] = maxBatch;
  }
  return d;
}

// B=2, S=4*6+2*3=30, M=2, D=8, Q=5, L=2, P=3.
std::vector<std::vector<int64_t>> ioDims(int64_t b) {
  return {{b, 30, 2, 8}, {2, 2}, {2}, {b, 5, 2, 2, 3, 2}, {b, 5, 2, 2, 3}, {b, 5, 2, 8}};
}

std::vector<DataType> ioTypes(DataType t) { return {t, DataType::kINT32, DataType::kINT32, t, t, t}; }

void checkCreator(IPluginCreatorV3One* creator, char const* ns) {
  check(std::strcmp(creator->getPluginName(), "DinoMSDeformAttn") == 0, "creator name",
        creator->getPluginName());
  check(std::strcmp(creator->getPluginVersion(), "1") == 0, "creator version", creator->getPluginVersion());
  check(std::strcmp(creator->getPluginNamespace(), ns) == 0, "creator namespace", creator->getPluginNamespace());
  PluginFieldCollection const* names = creator->getFieldNames();
  check(names != nullptr && names->nbFields == 0, "creator field names (none)",
        names == nullptr ? "null" : std::to_string(names->nbFields) + " fields");
}

void checkOutputShapes(IPluginV3OneBuild* build) {
  dino_driver::ExprBuilder exprs;
  auto const* batch = exprs.make(std::string("batch"));
  auto const* queries = exprs.make(std::string("queries"));
  auto c = [&](int64_t v) { return exprs.make(v); };
  DimsExprs in[kIn]{};
  auto set = [](DimsExprs& e, std::vector<IDimensionExpr const*> d) {
    e.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i) e.d[i] = d[i];
  };
  set(in[0], {batch, c(30), c(2), c(8)});
  set(in[1], {c(2), c(2)});
  set(in[2], {c(2)});
  set(in[3], {batch, queries, c(2), c(2), c(3), c(2)});
  set(in[4], {batch, queries, c(2), c(2), c(3)});
  DimsExprs out[1]{};
  int32_t rc = build->getOutputShapes(in, kIn, nullptr, 0, out, 1, exprs);
  bool ok = rc == 0 && out[0].nbDims == 4 && !out[0].d[0]->isConstant() &&
            static_cast<dino_driver::DimExpr const*>(out[0].d[0])->symbol() == "batch" &&
            !out[0].d[1]->isConstant() &&
            static_cast<dino_driver::DimExpr const*>(out[0].d[1])->symbol() == "queries" &&
            out[0].d[2]->isConstant() && out[0].d[2]->getConstantValue() == 2 && out[0].d[3]->isConstant() &&
            out[0].d[3]->getConstantValue() == 8;
  check(ok, "getOutputShapes symbolic batch and queries -> (batch, queries, 2, 8)", "rc " + std::to_string(rc));

  set(in[0], {c(3), c(30), c(2), c(8)});
  set(in[3], {c(3), c(7), c(2), c(2), c(3), c(2)});
  set(in[4], {c(3), c(7), c(2), c(2), c(3)});
  rc = build->getOutputShapes(in, kIn, nullptr, 0, out, 1, exprs);
  ok = rc == 0 && out[0].nbDims == 4;
  for (int i = 0; ok && i < 4; ++i) ok = out[0].d[i]->isConstant();
  ok = ok && out[0].d[0]->getConstantValue() == 3 && out[0].d[1]->getConstantValue() == 7 &&
       out[0].d[2]->getConstantValue() == 2 && out[0].d[3]->getConstantValue() == 8;
  check(ok, "getOutputShapes constant dims -> (3, 7, 2, 8)", "rc " + std::to_string(rc));

  set(in[3], {c(3), c(7), c(2), c(2), c(3)});  // locations without the trailing 2
  set(in[4], {c(3), c(7), c(2), c(2)});
  check(build->getOutputShapes(in, kIn, nullptr, 0, out, 1, exprs) != 0, "getOutputShapes rejects wrong ranks");
  check(build->getOutputShapes(in, 4, nullptr, 0, out, 1, exprs) != 0, "getOutputShapes rejects 4 inputs");
}

void checkFormats(IPluginV3OneBuild* build) {
  int32_t const nbTypes = EnumMax<DataType>(), nbFormats = EnumMax<TensorFormat>();
  long calls = 0, mismatches = 0;
  std::string first;
  std::vector<DataType> accepted;
  for (int32_t vt = 0; vt < nbTypes; ++vt) {
    for (int32_t vf = 0; vf < nbFormats; ++vf) {
      auto const valueType = static_cast<DataType>(vt);
      auto const valueFormat = static_cast<TensorFormat>(vf);
      for (int32_t pos = 0; pos < kAll; ++pos) {
        for (int32_t t = 0; t < nbTypes; ++t) {
          for (int32_t f = 0; f < nbFormats; ++f) {
            // Positions before `pos` hold what TensorRT would have fixed: the value's candidate, then supported ones.
            std::vector<DynamicPluginTensorDesc> io;
            auto const dims = ioDims(2);
            auto const types = ioTypes(valueType);
            for (int32_t i = 0; i < kAll; ++i) io.push_back(dynamicDesc(dims[i], types[i], 4));
            io[0].desc.format = valueFormat;
            io[pos].desc.type = static_cast<DataType>(t);
            io[pos].desc.format = static_cast<TensorFormat>(f);
            if (pos > 0 && !expectedSupport(0, valueType, valueFormat, valueType)) continue;  // never asked
            bool const got = build->supportsFormatCombination(pos, io.data(), kIn, 1);
            bool const want = pos == 0 ? expectedSupport(0, static_cast<DataType>(t), static_cast<TensorFormat>(f),
                                                         static_cast<DataType>(t))
                                       : expectedSupport(pos, static_cast<DataType>(t),
                                                         static_cast<TensorFormat>(f), valueType);
            ++calls;
            if (got != want && ++mismatches == 1) {
              first = "pos " + std::to_string(pos) + " type " + std::to_string(t) + " format " + std::to_string(f) +
                      " with value type " + std::to_string(vt) + ": got " + (got ? "true" : "false");
            }
            if (got && pos == 0 && f == 0 && vf == 0 && vt == 0) accepted.push_back(static_cast<DataType>(t));
          }
        }
      }
    }
  }
  std::printf("supportsFormatCombination: %ld calls over %d types x %d formats\n", calls, nbTypes, nbFormats);
  check(mismatches == 0, "supportsFormatCombination: exactly fp32/fp16/bf16 linear + int32 shape tables",
        std::to_string(mismatches) + " mismatches, first " + first);
  check(accepted.size() == 3, "supportsFormatCombination: 3 value types accepted",
        std::to_string(accepted.size()));
  std::vector<DynamicPluginTensorDesc> io;
  for (int32_t i = 0; i < kAll; ++i) io.push_back(dynamicDesc(ioDims(2)[i], ioTypes(DataType::kHALF)[i], 4));
  check(!build->supportsFormatCombination(6, io.data(), kIn, 1) && !build->supportsFormatCombination(-1, io.data(), kIn, 1),
        "supportsFormatCombination rejects positions outside 0..5");
}

void checkTypes(IPluginV3OneBuild* build) {
  for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16}) {
    auto const in = ioTypes(t);
    DataType out = DataType::kINT8;
    int32_t rc = build->getOutputDataTypes(&out, 1, in.data(), kIn);
    check(rc == 0 && out == t, "getOutputDataTypes follows value's type",
          "type " + std::to_string(static_cast<int>(t)));
  }
  DataType out{};
  auto const in = ioTypes(DataType::kFLOAT);
  check(build->getOutputDataTypes(&out, 1, in.data(), 4) != 0, "getOutputDataTypes rejects 4 inputs");
}

// Build-phase calls after the format choice, as the builder makes them.
void checkConfigure(IPluginV3OneBuild* build) {
  std::vector<DynamicPluginTensorDesc> io;
  for (int32_t i = 0; i < kAll; ++i) io.push_back(dynamicDesc(ioDims(2)[i], ioTypes(DataType::kFLOAT)[i], 8));
  check(build->configurePlugin(io.data(), kIn, io.data() + kIn, 1) == 0, "configurePlugin");
  check(build->getWorkspaceSize(io.data(), kIn, io.data() + kIn, 1) == 0, "getWorkspaceSize is 0");
  check(build->configurePlugin(io.data(), 4, io.data() + 4, 1) != 0, "configurePlugin rejects 4 inputs");
}

void checkRuntime(IPluginV3* plugin) {
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  check(runtime != nullptr, "runtime capability");
  if (runtime == nullptr) return;
  std::vector<PluginTensorDesc> io;
  for (int32_t i = 0; i < kAll; ++i) io.push_back(tensorDesc(ioDims(3)[i], ioTypes(DataType::kBF16)[i]));
  check(runtime->onShapeChange(io.data(), kIn, io.data() + kIn, 1) == 0, "onShapeChange");
  io[1].dims.d[0] = 17;  // more levels than the kernels stage
  io[2].dims.d[0] = 17;
  check(runtime->onShapeChange(io.data(), kIn, io.data() + kIn, 1) != 0, "onShapeChange rejects 17 levels");
}

IPluginCreatorV3One* findCreator(char const* ns) {
  for (auto const& e : dino_driver::registry().entries) {
    if (e.pluginNamespace == ns) return static_cast<IPluginCreatorV3One*>(e.creator);
  }
  return nullptr;
}

std::string pluginIdentity(IPluginV3* p) {
  auto* core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
  if (core == nullptr) return "(no core)";
  return std::string(core->getPluginName()) + "/" + core->getPluginVersion() + "/" + core->getPluginNamespace();
}

bool sameFields(PluginFieldCollection const* a, PluginFieldCollection const* b) {
  if (a == nullptr || b == nullptr || a->nbFields != b->nbFields) return false;
  for (int32_t i = 0; i < a->nbFields; ++i) {
    PluginField const &x = a->fields[i], &y = b->fields[i];
    if (std::strcmp(x.name, y.name) != 0 || x.type != y.type || x.length != y.length) return false;
  }
  return true;
}

}  // namespace

int main() {
  std::printf("TensorRT headers %d.%d\n", NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR);
  auto const& entries = dino_driver::registry().entries;
  check(entries.size() == 2, "library load registers 2 creators", std::to_string(entries.size()));
  IPluginCreatorV3One* plain = findCreator("");
  IPluginCreatorV3One* domain = findCreator("trt.plugins");
  check(plain != nullptr && domain != nullptr, "creators under namespaces \"\" and \"trt.plugins\"");
  if (plain == nullptr || domain == nullptr) return 1;
  check(dino_driver::registry().getCreator("DinoMSDeformAttn", "1", "trt.plugins") == domain,
        "registry lookup by name, version, namespace");
  checkCreator(plain, "");
  checkCreator(domain, "trt.plugins");

  // createPlugin from a field collection: the plugin has none; any field is refused.
  PluginFieldCollection empty{0, nullptr};
  IPluginV3* plugin = domain->createPlugin("msda_0", &empty, TensorRTPhase::kBUILD);
  check(plugin != nullptr, "createPlugin (build phase, no fields)");
  if (plugin == nullptr) return 1;
  int32_t const one = 1;
  PluginField bad{"im2col_step", &one, PluginFieldType::kINT32, 1};
  PluginFieldCollection badFields{1, &bad};
  IPluginV3* refused = domain->createPlugin("msda_bad", &badFields, TensorRTPhase::kBUILD);
  check(refused == nullptr, "createPlugin refuses an unknown field");
  delete refused;
  check(pluginIdentity(plugin) == "DinoMSDeformAttn/1/trt.plugins", "plugin name/version/namespace",
        pluginIdentity(plugin));

  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  check(build != nullptr, "build capability");
  if (build == nullptr) return 1;
  check(build->getNbOutputs() == 1, "getNbOutputs is 1");
  checkTypes(build);
  checkOutputShapes(build);
  checkFormats(build);
  checkConfigure(build);

  // Serialization: the engine stores getFieldsToSerialize(); deserialization calls createPlugin(kRUNTIME) with it.
  auto* runtimeOfBuilt =
      static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  PluginFieldCollection const* fields = runtimeOfBuilt->getFieldsToSerialize();
  IPluginV3* restored = domain->createPlugin("msda_0", fields, TensorRTPhase::kRUNTIME);
  check(restored != nullptr, "createPlugin from getFieldsToSerialize (runtime phase)");
  if (restored != nullptr) {
    auto* rt = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(pluginIdentity(restored) == pluginIdentity(plugin) && sameFields(rt->getFieldsToSerialize(), fields),
          "serialization round trip keeps identity and fields", pluginIdentity(restored));
  }

  IPluginV3* cloned = plugin->clone();
  check(cloned != nullptr && cloned != plugin && pluginIdentity(cloned) == pluginIdentity(plugin), "clone");
  // The execution context clones the deserialized plugin through attachToContext (no resources are used).
  IPluginV3* attached = nullptr;
  if (restored != nullptr) {
    auto* rt = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    attached = rt->attachToContext(nullptr);
    check(attached != nullptr && attached != restored && pluginIdentity(attached) == pluginIdentity(plugin),
          "attachToContext");
    if (attached != nullptr) checkRuntime(attached);
  }
  // TensorRT destroys plugins with delete (IPluginV3 has a virtual destructor); LeakSanitizer checks none is left.
  delete attached;
  delete cloned;
  delete restored;
  delete plugin;
  std::printf("%s\n", gFailures == 0 ? "ALL OK" : "FAILURES");
  return gFailures == 0 ? 0 : 1;
}
