#include "tests/model/test_checkpoints.h"

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"

namespace arcface::model::test_util {
namespace {

// splitmix64: cheap, deterministic and well mixed, so neighbouring weights differ.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t HashKey(const std::string& key) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : key) h = (h ^ c) * 1099511628211ull;
  return h;
}

float MakeValue(Values kind, uint64_t bits, bool positive) {
  float v = 0.0f;
  switch (kind) {
    case Values::kAnyFloat:
      v = std::ldexp(static_cast<float>(bits & 0xffffff), -24) - 0.5f;  // 24-bit mantissa
      break;
    case Values::kExact16:
      v = static_cast<float>(static_cast<int>(bits % 255) - 127) / 128.0f;
      break;
    case Values::kZero:
      return positive ? 1.0f : 0.0f;
  }
  return positive ? std::fabs(v) + 0.5f : v;
}

std::string Bytes(const void* p, size_t n) { return std::string(static_cast<const char*>(p), n); }

// A numeric initializer name in torch's style ("onnx::Conv_165").
class Namer {
 public:
  std::string Next(const std::string& op) { return absl::StrCat("onnx::", op, "_", ++id_); }

 private:
  int id_ = 100;
};

}  // namespace

std::map<std::string, HostTensor> MakeTensors(const std::array<int, 4>& blocks, Values values) {
  std::map<std::string, HostTensor> tensors;
  for (const auto& [key, shape] : ExpectedShapes(blocks)) {
    HostTensor t;
    t.shape = shape;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    t.values.resize(static_cast<size_t>(n));
    const bool positive = key.size() > 12 && key.substr(key.size() - 12) == ".running_var";
    const uint64_t seed = HashKey(key);
    for (int64_t i = 0; i < n; ++i) {
      t.values[static_cast<size_t>(i)] = MakeValue(values, Mix(seed + static_cast<uint64_t>(i)),
                                                   positive);
    }
    tensors.emplace(key, std::move(t));
  }
  return tensors;
}

uint16_t FloatToHalfExact(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  if ((bits & 0x7fffffffu) == 0) return sign;
  const int exponent = static_cast<int>((bits >> 23) & 0xff) - 127;
  const uint32_t mantissa = bits & 0x7fffffu;
  // Only normal half values are needed by the tests.
  EXPECT_TRUE(exponent >= -14 && exponent <= 15 && (mantissa & 0x1fffu) == 0)
      << value << " is not exactly a normal float16";
  return static_cast<uint16_t>(sign | ((exponent + 15) << 10) | (mantissa >> 13));
}

uint16_t FloatToBFloat16Exact(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  EXPECT_EQ(bits & 0xffffu, 0u) << value << " is not exactly a bfloat16";
  return static_cast<uint16_t>(bits >> 16);
}

std::vector<RawEntry> ToEntries(const std::map<std::string, HostTensor>& tensors,
                                const std::string& dtype) {
  std::vector<RawEntry> entries;
  for (const auto& [name, t] : tensors) {
    RawEntry e{name, dtype, t.shape, {}};
    if (dtype == "F32") {
      e.data = Bytes(t.values.data(), t.values.size() * sizeof(float));
    } else {
      std::vector<uint16_t> half(t.values.size());
      for (size_t i = 0; i < half.size(); ++i) {
        half[i] = dtype == "F16" ? FloatToHalfExact(t.values[i])
                                 : FloatToBFloat16Exact(t.values[i]);
      }
      e.data = Bytes(half.data(), half.size() * 2);
    }
    entries.push_back(std::move(e));
  }
  return entries;
}

std::string EncodeRaw(const std::string& header, const std::string& data) {
  const uint64_t n = header.size();
  std::string out = Bytes(&n, 8);  // little-endian host
  out += header;
  out += data;
  return out;
}

std::string EncodeSafetensors(const std::vector<RawEntry>& entries,
                              const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string data;
  for (const RawEntry& e : entries) {
    header[e.name] = {{"dtype", e.dtype},
                      {"shape", e.shape},
                      {"data_offsets", {data.size(), data.size() + e.data.size()}}};
    data += e.data;
  }
  return EncodeRaw(header.dump(), data);
}

onnx::ModelProto BuildOnnx(const std::map<std::string, HostTensor>& tensors,
                           const std::array<int, 4>& blocks, const OnnxOptions& options) {
  onnx::ModelProto model;
  model.set_ir_version(6);
  model.set_producer_name("pytorch");
  model.set_producer_version("1.13.0");
  onnx::OperatorSetIdProto* opset = model.add_opset_import();
  opset->set_version(11);
  onnx::GraphProto* graph = model.mutable_graph();
  graph->set_name("torch_jit");
  graph->add_input()->set_name("input.1");
  graph->add_output()->set_name("embedding");
  Namer namer;
  int node_id = 0;

  auto add_initializer = [&](const std::string& name, const std::string& key,
                             std::vector<int64_t> dims, bool transpose = false) {
    const HostTensor& t = tensors.at(key);
    std::vector<float> values = t.values;
    if (transpose) {  // [out, in] → [in, out]
      const int64_t rows = t.shape[0], cols = t.shape[1];
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) values[c * rows + r] = t.values[r * cols + c];
      }
    }
    onnx::TensorProto* init = graph->add_initializer();
    init->set_name(name);
    for (int64_t d : dims) init->add_dims(d);
    if (options.float16) {
      init->set_data_type(onnx::TensorProto::FLOAT16);
      std::vector<uint16_t> half(values.size());
      for (size_t i = 0; i < half.size(); ++i) half[i] = FloatToHalfExact(values[i]);
      if (options.float_data) {
        for (uint16_t h : half) init->add_int32_data(h);
      } else {
        init->set_raw_data(Bytes(half.data(), half.size() * 2));
      }
    } else {
      init->set_data_type(onnx::TensorProto::FLOAT);
      if (options.float_data) {
        for (float v : values) init->add_float_data(v);
      } else {
        init->set_raw_data(Bytes(values.data(), values.size() * sizeof(float)));
      }
    }
    return name;
  };
  auto add_node = [&](const std::string& op, const std::string& scope,
                      std::vector<std::string> inputs) {
    onnx::NodeProto* node = graph->add_node();
    node->set_op_type(op);
    node->set_name(absl::StrCat(scope, "/", op));
    for (const std::string& in : inputs) node->add_input(in);
    const std::string out = absl::StrCat(scope, "/", op, "_output_", node_id++);
    node->add_output(out);
    return node;
  };
  auto ints = [](onnx::NodeProto* node, const std::string& name, std::vector<int64_t> v) {
    onnx::AttributeProto* a = node->add_attribute();
    a->set_name(name);
    a->set_type(7);
    for (int64_t x : v) a->add_ints(x);
  };
  auto add_conv = [&](const std::string& scope, const std::string& input,
                      const std::string& key, int kernel, int stride) {
    const HostTensor& w = tensors.at(key + ".weight");
    const std::string wname = add_initializer(namer.Next("Conv"), key + ".weight", w.shape);
    const std::string bname =
        add_initializer(namer.Next("Conv"), key + ".bias", tensors.at(key + ".bias").shape);
    onnx::NodeProto* node = add_node("Conv", scope, {input, wname, bname});
    ints(node, "dilations", {1, 1});
    onnx::AttributeProto* group = node->add_attribute();
    group->set_name("group");
    group->set_type(2);
    group->set_i(1);
    ints(node, "kernel_shape", {kernel, kernel});
    const int64_t pad = kernel / 2;
    ints(node, "pads", {pad, pad, pad, pad});
    ints(node, "strides", {stride, stride});
    return node->output(0);
  };
  auto add_prelu = [&](const std::string& scope, const std::string& input,
                       const std::string& key) {
    const int64_t c = tensors.at(key).shape[0];
    std::vector<int64_t> dims = options.flat_prelu ? std::vector<int64_t>{c}
                                                   : std::vector<int64_t>{c, 1, 1};
    const std::string slope = add_initializer(namer.Next("PRelu"), key, dims);
    return add_node("PRelu", scope, {input, slope})->output(0);
  };
  auto add_bn = [&](const std::string& scope, const std::string& input,
                    const std::string& prefix) {
    std::vector<std::string> inputs = {input};
    for (const char* stat : {".weight", ".bias", ".running_mean", ".running_var"}) {
      const std::string key = prefix + stat;
      inputs.push_back(add_initializer(key, key, tensors.at(key).shape));
    }
    onnx::NodeProto* node = add_node("BatchNormalization", scope, inputs);
    onnx::AttributeProto* eps = node->add_attribute();
    eps->set_name("epsilon");
    eps->set_type(1);
    eps->set_f(1e-5f);
    onnx::AttributeProto* momentum = node->add_attribute();
    momentum->set_name("momentum");
    momentum->set_type(1);
    momentum->set_f(0.9f);
    return node->output(0);
  };

  std::string x = add_conv("/conv1", "input.1", "conv1", 3, 1);
  x = add_prelu("/prelu", x, "prelu.weight");
  for (int stage = 0; stage < 4; ++stage) {
    for (int block = 0; block < blocks[stage]; ++block) {
      const std::string p = absl::StrCat("layer", stage + 1, ".", block);
      const std::string scope = absl::StrCat("/layer", stage + 1, "/", p);
      const int stride = block == 0 ? 2 : 1;
      std::string shortcut = x;
      if (block == 0 && options.downsample_before_conv1) {
        shortcut = add_conv(scope + "/downsample", x, p + ".downsample", 1, 2);
      }
      std::string y = add_bn(scope + "/bn1", x, p + ".bn1");
      y = add_conv(scope + "/conv1", y, p + ".conv1", 3, 1);
      y = add_prelu(scope + "/prelu", y, p + ".prelu.weight");
      y = add_conv(scope + "/conv2", y, p + ".conv2", 3, stride);
      if (block == 0 && !options.downsample_before_conv1) {
        shortcut = add_conv(scope + "/downsample", x, p + ".downsample", 1, 2);
      }
      x = add_node("Add", scope, {y, shortcut})->output(0);
    }
  }
  x = add_bn("/bn2", x, "bn2");
  onnx::NodeProto* flatten = add_node("Flatten", "", {x});
  onnx::AttributeProto* axis = flatten->add_attribute();
  axis->set_name("axis");
  axis->set_type(2);
  axis->set_i(1);
  x = flatten->output(0);
  const HostTensor& fc = tensors.at("fc.weight");
  const std::vector<int64_t> fc_dims = options.transpose_fc
                                           ? std::vector<int64_t>{fc.shape[1], fc.shape[0]}
                                           : fc.shape;
  const std::string w = add_initializer("fc.weight", "fc.weight", fc_dims, options.transpose_fc);
  const std::string b = add_initializer("fc.bias", "fc.bias", tensors.at("fc.bias").shape);
  onnx::NodeProto* gemm = add_node("Gemm", "/fc", {x, w, b});
  for (const char* name : {"alpha", "beta"}) {
    onnx::AttributeProto* a = gemm->add_attribute();
    a->set_name(name);
    a->set_type(1);
    a->set_f(1.0f);
  }
  onnx::AttributeProto* trans_b = gemm->add_attribute();
  trans_b->set_name("transB");
  trans_b->set_type(2);
  trans_b->set_i(options.transpose_fc ? 0 : 1);
  x = gemm->output(0);
  x = add_bn("/features", x, "features");
  graph->mutable_node(graph->node_size() - 1)->set_output(0, "embedding");
  return model;
}

std::string TempPath(const std::string& name) {
  static std::atomic<int> counter{0};
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / absl::StrCat("checkpoint_test_", getpid());
  std::filesystem::create_directories(dir);
  return (dir / absl::StrCat(counter++, "_", name)).string();
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

}  // namespace arcface::model::test_util
