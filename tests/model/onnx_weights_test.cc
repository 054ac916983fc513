// LoadCheckpoint on InsightFace-style ONNX exports: a valid mini export in several encodings,
// and malformed variants, each asserting the message names the node/initializer/key and the
// reason. The ModelProtos are built in C++ with the loader's own generated classes, laid out
// as torch.onnx exports InsightFace's IResNet (see BuildOnnx).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "server/model/checkpoint.h"
#include "server/model/onnx_weights.pb.h"
#include "tests/model/test_checkpoints.h"

namespace arcface::model {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
using test_util::BuildOnnx;
using test_util::MakeTensors;
using test_util::OnnxOptions;
using test_util::TempPath;
using test_util::Values;
using test_util::WriteFile;

constexpr std::array<int, 4> kSmall = {1, 1, 1, 1};

const std::map<std::string, HostTensor>& Tensors() {
  static const auto* tensors =
      new std::map<std::string, HostTensor>(MakeTensors(kSmall, Values::kExact16));
  return *tensors;
}

struct Loaded {
  std::string path;
  absl::StatusOr<Checkpoint> checkpoint;
};

Loaded LoadModel(const onnx::ModelProto& model) {
  Loaded out{TempPath("model.onnx"), absl::UnknownError("not loaded")};
  std::string bytes;
  EXPECT_TRUE(model.SerializeToString(&bytes));
  WriteFile(out.path, bytes);
  out.checkpoint = LoadCheckpoint(out.path);
  std::filesystem::remove(out.path);
  return out;
}

std::string LoadError(const onnx::ModelProto& model) {
  Loaded loaded = LoadModel(model);
  EXPECT_FALSE(loaded.checkpoint.ok()) << "unexpectedly loaded";
  if (loaded.checkpoint.ok()) return "";
  EXPECT_EQ(loaded.checkpoint.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(loaded.checkpoint.status().message());
  EXPECT_THAT(message, StartsWith(loaded.path + ": "));
  return message;
}

// The k-th node (0-based) of type `op`, in graph order.
onnx::NodeProto* NthNode(onnx::ModelProto& model, const std::string& op, int k) {
  for (onnx::NodeProto& node : *model.mutable_graph()->mutable_node()) {
    if (node.op_type() == op && k-- == 0) return &node;
  }
  ADD_FAILURE() << "no such " << op << " node";
  return model.mutable_graph()->mutable_node(0);
}

onnx::TensorProto* Initializer(onnx::ModelProto& model, const std::string& name) {
  for (onnx::TensorProto& t : *model.mutable_graph()->mutable_initializer()) {
    if (t.name() == name) return &t;
  }
  ADD_FAILURE() << "no initializer " << name;
  return model.mutable_graph()->mutable_initializer(0);
}

void RemoveInitializer(onnx::ModelProto& model, const std::string& name) {
  auto* inits = model.mutable_graph()->mutable_initializer();
  for (int i = 0; i < inits->size(); ++i) {
    if (inits->Get(i).name() == name) {
      inits->DeleteSubrange(i, 1);
      return;
    }
  }
  ADD_FAILURE() << "no initializer " << name;
}

void RemoveNode(onnx::ModelProto& model, const onnx::NodeProto* node) {
  auto* nodes = model.mutable_graph()->mutable_node();
  for (int i = 0; i < nodes->size(); ++i) {
    if (&nodes->Get(i) == node) {
      nodes->DeleteSubrange(i, 1);
      return;
    }
  }
  ADD_FAILURE() << "node not in graph";
}

// Conv nodes of BuildOnnx's default order: stem, then per stage block 0's conv1, conv2,
// downsample.
constexpr int kLayer2Conv2 = 5;
constexpr int kLayer3Conv2 = 8;

void ExpectSameTensors(const std::map<std::string, HostTensor>& actual,
                       const std::map<std::string, HostTensor>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (const auto& [key, t] : expected) {
    const auto it = actual.find(key);
    ASSERT_NE(it, actual.end()) << key;
    EXPECT_EQ(it->second.shape, t.shape) << key;
    ASSERT_EQ(it->second.values.size(), t.values.size()) << key;
    EXPECT_EQ(std::memcmp(it->second.values.data(), t.values.data(), t.values.size() * 4), 0)
        << key;
  }
}

// ---------------------------------------------------------------- valid exports

TEST(OnnxLoad, TorchStyleExportLoads) {
  Loaded loaded = LoadModel(BuildOnnx(Tensors(), kSmall));
  ASSERT_TRUE(loaded.checkpoint.ok()) << loaded.checkpoint.status();
  const Checkpoint& c = *loaded.checkpoint;
  EXPECT_EQ(c.format, "onnx");
  EXPECT_EQ(c.arch, "r10");
  EXPECT_EQ(c.blocks, kSmall);
  EXPECT_EQ(c.tensors.at("layer3.0.prelu.weight").shape, (std::vector<int64_t>{256}));
  EXPECT_EQ(c.sha256.size(), 64u);
  ExpectSameTensors(c.tensors, Tensors());
}

struct VariantCase {
  const char* label;
  OnnxOptions options;
};

class OnnxVariant : public ::testing::TestWithParam<VariantCase> {};

TEST_P(OnnxVariant, LoadsTheSameTensors) {
  Loaded loaded = LoadModel(BuildOnnx(Tensors(), kSmall, GetParam().options));
  ASSERT_TRUE(loaded.checkpoint.ok()) << loaded.checkpoint.status();
  ExpectSameTensors(loaded.checkpoint->tensors, Tensors());
}

OnnxOptions Opts(bool downsample_first, bool float_data, bool float16, bool flat_prelu,
                 bool transpose_fc) {
  OnnxOptions o;
  o.downsample_before_conv1 = downsample_first;
  o.float_data = float_data;
  o.float16 = float16;
  o.flat_prelu = flat_prelu;
  o.transpose_fc = transpose_fc;
  return o;
}

INSTANTIATE_TEST_SUITE_P(
    OnnxLoad, OnnxVariant,
    ::testing::Values(VariantCase{"DownsampleBeforeConv1", Opts(true, false, false, false, false)},
                      VariantCase{"FloatData", Opts(false, true, false, false, false)},
                      VariantCase{"Float16Raw", Opts(false, false, true, false, false)},
                      VariantCase{"Float16Int32Data", Opts(false, true, true, false, false)},
                      VariantCase{"FlatPreluSlopes", Opts(false, false, false, true, false)},
                      VariantCase{"GemmTransB0", Opts(false, false, false, false, true)}),
    [](const ::testing::TestParamInfo<VariantCase>& info) { return info.param.label; });

// onnx.proto declares float_data [packed=true] and dims unpacked; writers differ, and a proto2
// parser must take both encodings of every repeated scalar.
TEST(OnnxProto, PackedAndUnpackedEncodingsParse) {
  auto varint = [](uint64_t v) {
    std::string out;
    do {
      out += static_cast<char>((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
      v >>= 7;
    } while (v != 0);
    return out;
  };
  auto f32 = [](float f) { return std::string(reinterpret_cast<const char*>(&f), 4); };
  std::string packed;
  packed += '\x0a' + varint(2) + varint(2) + varint(3);               // dims packed [2,3]
  packed += '\x10' + varint(1);                                        // data_type FLOAT
  std::string floats;
  for (int i = 0; i < 6; ++i) floats += f32(0.5f * i);
  packed += '\x22' + varint(floats.size()) + floats;                   // float_data packed
  std::string unpacked;
  unpacked += '\x08' + varint(2) + '\x08' + varint(3);                 // dims unpacked
  unpacked += '\x10' + varint(1);
  for (int i = 0; i < 6; ++i) unpacked += '\x25' + f32(0.5f * i);      // float_data unpacked
  for (const std::string& bytes : {packed, unpacked}) {
    onnx::TensorProto t;
    ASSERT_TRUE(t.ParseFromString(bytes));
    ASSERT_EQ(t.dims_size(), 2);
    EXPECT_EQ(t.dims(0), 2);
    EXPECT_EQ(t.dims(1), 3);
    ASSERT_EQ(t.float_data_size(), 6);
    EXPECT_EQ(t.float_data(5), 2.5f);
  }
}

// ---------------------------------------------------------------- malformed exports

TEST(OnnxLoad, MissingBatchNormInitializer) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  RemoveInitializer(model, "layer1.0.bn1.running_var");
  const std::string message = LoadError(model);
  EXPECT_THAT(message, HasSubstr("'layer1.0.bn1.running_var' is not an initializer"));
  EXPECT_THAT(message, HasSubstr("/layer1/layer1.0/bn1/BatchNormalization"));
}

TEST(OnnxLoad, MissingConvInitializer) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  const std::string weight = NthNode(model, "Conv", kLayer2Conv2)->input(1);
  RemoveInitializer(model, weight);
  const std::string message = LoadError(model);
  EXPECT_THAT(message, HasSubstr(absl::StrCat("weight '", weight, "' is not an initializer")));
}

TEST(OnnxLoad, MissingBiasInitializerNamesTheKey) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  const std::string bias = NthNode(model, "Conv", kLayer2Conv2)->input(2);
  RemoveInitializer(model, bias);
  const std::string message = LoadError(model);
  EXPECT_THAT(message, HasSubstr("mapped to 'layer2.0.conv2.bias'"));
  EXPECT_THAT(message, HasSubstr(absl::StrCat("'", bias, "' is not an initializer")));
}

TEST(OnnxLoad, WrongShape) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::NodeProto* conv = NthNode(model, "Conv", kLayer3Conv2);
  onnx::TensorProto* w = Initializer(model, conv->input(1));
  w->set_dims(2, 1);
  w->set_dims(3, 9);  // same byte size, wrong layout
  const std::string message = LoadError(model);
  EXPECT_THAT(message, HasSubstr(absl::StrCat("key 'layer3.0.conv2.weight' from initializer '",
                                              w->name(), "'")));
  EXPECT_THAT(message, HasSubstr("shape [256,256,1,9], expected [256,256,3,3]"));
}

TEST(OnnxLoad, WrongPreluShape) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::TensorProto* slope = Initializer(model, NthNode(model, "PRelu", 2)->input(1));
  slope->set_dims(0, 64);
  slope->set_dims(1, 2);  // [64,2,1]: same count as [128,1,1]
  const std::string message = LoadError(model);
  EXPECT_THAT(message, HasSubstr("key 'layer2.0.prelu.weight'"));
  EXPECT_THAT(message, HasSubstr("shape [64,2,1], expected [128] (or [C,1,1])"));
}

TEST(OnnxLoad, RawDataSizeMismatch) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::TensorProto* bias = Initializer(model, "fc.bias");
  bias->mutable_raw_data()->resize(100);
  const std::string message = LoadError(model);
  EXPECT_THAT(message, HasSubstr("initializer 'fc.bias'"));
  EXPECT_THAT(message, HasSubstr("raw_data is 100 bytes but FLOAT (1) [512] needs 2048"));
}

TEST(OnnxLoad, ExternalDataIsRefused) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::TensorProto* w = Initializer(model, "fc.weight");
  w->clear_raw_data();
  w->set_data_location(1);  // EXTERNAL
  onnx::StringStringEntryProto* location = w->add_external_data();
  location->set_key("location");
  location->set_value("model.onnx.data");
  const std::string message = LoadError(model);
  EXPECT_THAT(message, HasSubstr("initializer 'fc.weight' keeps its data in an external file"));
}

TEST(OnnxLoad, MissingPreluNode) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  RemoveNode(model, NthNode(model, "PRelu", 3));
  EXPECT_THAT(LoadError(model),
              HasSubstr("the graph has 4 PRelu nodes; an IResNet with blocks {1,1,1,1}"));
}

TEST(OnnxLoad, ExtraConvNode) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  *model.mutable_graph()->add_node() = *NthNode(model, "Conv", 1);
  EXPECT_THAT(LoadError(model), HasSubstr("the graph has 14 Conv nodes"));
}

TEST(OnnxLoad, MissingBatchNormNode) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  RemoveNode(model, NthNode(model, "BatchNormalization", 4));  // bn2
  EXPECT_THAT(LoadError(model), HasSubstr("the graph has 5 BatchNormalization nodes"));
}

TEST(OnnxLoad, DownsampleMissingFromBlock) {
  // A 3×3 conv where block 0's 1×1 downsample should be.
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::TensorProto* w = Initializer(model, NthNode(model, "Conv", 3)->input(1));
  w->set_dims(1, 64 / 9);  // keeps rank 4, any size: the kernel is what is read
  w->set_dims(2, 3);
  w->set_dims(3, 3);
  EXPECT_THAT(LoadError(model), HasSubstr("block 'layer1.0.' should own 3 Conv nodes with 1 1x1"));
}

TEST(OnnxLoad, UnexpectedInitializer) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::TensorProto* extra = model.mutable_graph()->add_initializer();
  extra->set_name("layer1.0.bn3.weight");
  extra->set_data_type(1);
  extra->add_dims(64);
  extra->mutable_raw_data()->assign(256, '\0');
  EXPECT_THAT(LoadError(model), HasSubstr("unexpected initializer 'layer1.0.bn3.weight'"));
}

TEST(OnnxLoad, IntegerShapeConstantsAreAllowed) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::TensorProto* shape = model.mutable_graph()->add_initializer();
  shape->set_name("onnx::Reshape_999");
  shape->set_data_type(7);  // INT64
  shape->add_dims(2);
  shape->add_int64_data(1);
  shape->add_int64_data(-1);
  Loaded loaded = LoadModel(model);
  EXPECT_TRUE(loaded.checkpoint.ok()) << loaded.checkpoint.status();
}

TEST(OnnxLoad, UnsupportedOp) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::NodeProto* relu = model.mutable_graph()->add_node();
  relu->set_op_type("Relu");
  relu->set_name("/extra/Relu");
  relu->add_input("embedding");
  relu->add_output("relu_out");
  EXPECT_THAT(LoadError(model), HasSubstr("Relu node '/extra/Relu'"));
}

TEST(OnnxLoad, WrongEpsilon) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::NodeProto* bn = NthNode(model, "BatchNormalization", 2);
  bn->mutable_attribute(0)->set_f(1e-3f);
  const std::string message = LoadError(model);
  EXPECT_THAT(message, HasSubstr("('layer3.0.bn1'): epsilon 0.001, expected 1e-05"));
}

TEST(OnnxLoad, WrongStride) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::NodeProto* conv = NthNode(model, "Conv", kLayer2Conv2);
  for (onnx::AttributeProto& a : *conv->mutable_attribute()) {
    if (a.name() == "strides") {
      a.set_ints(0, 1);
      a.set_ints(1, 1);
    }
  }
  EXPECT_THAT(LoadError(model),
              HasSubstr("(mapped to 'layer2.0.conv2'): strides [1,1], expected [2,2]"));
}

TEST(OnnxLoad, ConvWithoutBias) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::NodeProto* conv = NthNode(model, "Conv", 0);
  const std::string bias = conv->input(2);
  conv->mutable_input()->RemoveLast();
  RemoveInitializer(model, bias);
  EXPECT_THAT(LoadError(model), HasSubstr("(mapped to 'conv1') has no bias"));
}

TEST(OnnxLoad, NonFloatWeight) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::TensorProto* bias = Initializer(model, NthNode(model, "Conv", 0)->input(2));
  bias->clear_raw_data();
  bias->set_data_type(7);  // INT64
  for (int i = 0; i < 64; ++i) bias->add_int64_data(i);
  const std::string message = LoadError(model);
  EXPECT_THAT(message, HasSubstr("key 'conv1.bias'"));
  EXPECT_THAT(message, HasSubstr("data type INT64 (7) is not supported"));
}

TEST(OnnxLoad, BatchNormNotNamedLikePyTorch) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::NodeProto* bn = NthNode(model, "BatchNormalization", 0);
  Initializer(model, bn->input(1))->set_name("onnx::BatchNormalization_7");
  bn->set_input(1, "onnx::BatchNormalization_7");
  EXPECT_THAT(LoadError(model),
              HasSubstr("scale input 'onnx::BatchNormalization_7' is not named "
                        "'<module>.weight'"));
}

TEST(OnnxLoad, NaNWeight) {
  onnx::ModelProto model = BuildOnnx(Tensors(), kSmall);
  onnx::TensorProto* slope = Initializer(model, NthNode(model, "PRelu", 0)->input(1));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(slope->mutable_raw_data()->data() + 4 * 10, &nan, 4);
  EXPECT_THAT(LoadError(model),
              HasSubstr("tensor 'prelu.weight' holds a non-finite value (NaN) at flat index 10"));
}

TEST(OnnxLoad, WrongArchitecture) {
  // A valid ONNX model that is not an IResNet: one Conv, no BatchNormalization names.
  onnx::ModelProto model;
  model.set_ir_version(7);
  onnx::GraphProto* graph = model.mutable_graph();
  onnx::NodeProto* conv = graph->add_node();
  conv->set_op_type("Conv");
  conv->add_input("x");
  conv->add_input("w");
  conv->add_output("y");
  onnx::TensorProto* w = graph->add_initializer();
  w->set_name("w");
  w->set_data_type(1);
  for (int d : {8, 3, 3, 3}) w->add_dims(d);
  w->mutable_raw_data()->assign(8 * 27 * 4, '\0');
  const std::string message = LoadError(model);
  EXPECT_THAT(message, HasSubstr("cannot read the blocks per stage off the BatchNormalization "
                                 "names"));
  EXPECT_THAT(message, HasSubstr("not an InsightFace IResNet export"));
}

TEST(OnnxLoad, TruncatedFile) {
  std::string bytes;
  ASSERT_TRUE(BuildOnnx(Tensors(), kSmall).SerializeToString(&bytes));
  bytes.resize(bytes.size() / 2);
  const std::string path = TempPath("truncated.onnx");
  WriteFile(path, bytes);
  absl::StatusOr<Checkpoint> c = LoadCheckpoint(path);
  std::filesystem::remove(path);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("not a safetensors or ONNX file"));
  EXPECT_THAT(c.status().message(), HasSubstr("as ONNX: not a parseable ONNX ModelProto"));
}

// A real torch.onnx export, produced by tests/model/export_iresnet_onnx.py: set
// ARCFACE_TEST_TORCH_EXPORT=<prefix> to check <prefix>.onnx against the BN-folded weights the
// script computed itself in <prefix>.safetensors (catches a wrong positional mapping, which
// shapes alone would not).
TEST(OnnxLoad, RealTorchExportMatchesFoldedWeights) {
  const char* prefix = std::getenv("ARCFACE_TEST_TORCH_EXPORT");
  if (prefix == nullptr) GTEST_SKIP() << "ARCFACE_TEST_TORCH_EXPORT is not set";
  absl::StatusOr<Checkpoint> onnx_ckpt = LoadCheckpoint(absl::StrCat(prefix, ".onnx"));
  ASSERT_TRUE(onnx_ckpt.ok()) << onnx_ckpt.status();
  absl::StatusOr<Checkpoint> folded = LoadCheckpoint(absl::StrCat(prefix, ".safetensors"));
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(onnx_ckpt->format, "onnx");
  EXPECT_EQ(onnx_ckpt->blocks, folded->blocks);
  ASSERT_EQ(onnx_ckpt->tensors.size(), folded->tensors.size());
  for (const auto& [key, want] : folded->tensors) {
    const HostTensor& got = onnx_ckpt->tensors.at(key);
    ASSERT_EQ(got.shape, want.shape) << key;
    double max_err = 0, max_ref = 0;
    for (size_t i = 0; i < want.values.size(); ++i) {
      max_err = std::max(max_err, std::fabs(double{got.values[i]} - want.values[i]));
      max_ref = std::max(max_ref, std::fabs(double{want.values[i]}));
    }
    EXPECT_LE(max_err, 1e-5 * std::max(1.0, max_ref)) << key;
  }
}

}  // namespace
}  // namespace arcface::model
