#include "server/model/onnx_weights.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/repeated_field.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>
#include <limits>
#include <set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/model/onnx_weights.pb.h"
#include "server/model/safetensors.h"

// raw_data is little-endian and is copied into floats byte for byte.
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "this reader assumes a little-endian host"
#endif

namespace arcface::model {
namespace {

using onnx::AttributeProto;
using onnx::GraphProto;
using onnx::NodeProto;
using onnx::TensorProto;

constexpr float kBatchNormEpsilon = 1e-5f;

// Ops an IResNet export may contain besides the weighted ones. The last group only ever
// computes shapes (older exporters spell Flatten as Shape→Gather→Unsqueeze→Concat→Reshape).
// Anything else (an activation, a pooling, a preprocessing Sub/Mul) would change what the
// network computes, and the libtorch model would silently not match the file.
const std::set<std::string>& HarmlessOps() {
  static const std::set<std::string> kOps = {
      "Add",     "Flatten", "Identity", "Dropout", "Reshape",
      "Shape",   "Gather",  "Unsqueeze", "Squeeze", "Concat", "Constant"};
  return kOps;
}

absl::Status Invalid(absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("ONNX: ", message));
}

std::string NodeLabel(const NodeProto& node, int index) {
  if (node.name().empty()) return absl::StrCat(node.op_type(), " node #", index);
  return absl::StrCat(node.op_type(), " node '", node.name(), "' (#", index, ")");
}

std::string DataTypeName(int32_t type) {
  static const char* const kNames[] = {
      "UNDEFINED", "FLOAT",  "UINT8",  "INT8",   "UINT16",    "INT16",      "INT32",  "INT64",
      "STRING",    "BOOL",   "FLOAT16", "DOUBLE", "UINT32",   "UINT64",     "COMPLEX64",
      "COMPLEX128", "BFLOAT16"};
  if (type >= 0 && type < static_cast<int32_t>(sizeof(kNames) / sizeof(kNames[0]))) {
    return absl::StrCat(kNames[type], " (", type, ")");
  }
  return absl::StrCat("unknown (", type, ")");
}

bool IsFloatType(int32_t type) {
  return type == TensorProto::FLOAT || type == TensorProto::FLOAT16 ||
         type == TensorProto::BFLOAT16 || type == TensorProto::DOUBLE;
}

const AttributeProto* FindAttribute(const NodeProto& node, absl::string_view name) {
  for (const AttributeProto& a : node.attribute()) {
    if (a.name() == name) return &a;
  }
  return nullptr;
}

// AttributeProto.type values (onnx.proto AttributeType). IR version 1 files leave `type`
// unset, so 0 is accepted together with the matching field being present.
constexpr int32_t kAttrFloat = 1;
constexpr int32_t kAttrInt = 2;
constexpr int32_t kAttrInts = 7;

absl::StatusOr<int64_t> IntAttribute(const NodeProto& node, int index, absl::string_view name,
                                     int64_t fallback) {
  const AttributeProto* a = FindAttribute(node, name);
  if (a == nullptr) return fallback;
  if (a->type() != kAttrInt && !(a->type() == 0 && a->has_i())) {
    return Invalid(absl::StrCat(NodeLabel(node, index), ": attribute '", name,
                                "' is not an integer"));
  }
  return a->i();
}

absl::StatusOr<float> FloatAttribute(const NodeProto& node, int index, absl::string_view name,
                                     float fallback) {
  const AttributeProto* a = FindAttribute(node, name);
  if (a == nullptr) return fallback;
  if (a->type() != kAttrFloat && !(a->type() == 0 && a->has_f())) {
    return Invalid(absl::StrCat(NodeLabel(node, index), ": attribute '", name,
                                "' is not a float"));
  }
  return a->f();
}

absl::StatusOr<std::vector<int64_t>> IntsAttribute(const NodeProto& node, int index,
                                                   absl::string_view name,
                                                   std::vector<int64_t> fallback) {
  const AttributeProto* a = FindAttribute(node, name);
  if (a == nullptr) return fallback;
  if (a->type() != kAttrInts && a->type() != 0) {
    return Invalid(absl::StrCat(NodeLabel(node, index), ": attribute '", name,
                                "' is not a list of integers"));
  }
  return std::vector<int64_t>(a->ints().begin(), a->ints().end());
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

std::vector<int64_t> Dims(const TensorProto& t) {
  return std::vector<int64_t>(t.dims().begin(), t.dims().end());
}

// How an initializer becomes a checkpoint tensor.
enum class Transform {
  kNone,
  kPreluSlope,  // [C,1,1] or [C] → [C]
  kTranspose,   // Gemm with transB=0 stores fc.weight as [in, out]
};

struct Assignment {
  std::string key;
  TensorProto* tensor = nullptr;
  std::string origin;  // "initializer 'x' of Conv node 'y' (#3)", for messages
  Transform transform = Transform::kNone;
};

struct ConvRole {
  std::string prefix;  // checkpoint key prefix: "conv1", "layer2.0.downsample", ...
  int kernel = 3;
  int stride = 1;
};

absl::Status CheckConvAttributes(const NodeProto& node, int index, const ConvRole& role) {
  const std::string where =
      absl::StrCat(NodeLabel(node, index), " (mapped to '", role.prefix, "')");
  const int64_t k = role.kernel;
  const int64_t pad = role.kernel / 2;
  struct Expectation {
    const char* name;
    std::vector<int64_t> fallback;
    std::vector<int64_t> expected;
  };
  const Expectation expectations[] = {
      {"kernel_shape", {k, k}, {k, k}},
      {"strides", {1, 1}, {role.stride, role.stride}},
      {"pads", {0, 0, 0, 0}, {pad, pad, pad, pad}},
      {"dilations", {1, 1}, {1, 1}},
  };
  for (const Expectation& e : expectations) {
    absl::StatusOr<std::vector<int64_t>> value = IntsAttribute(node, index, e.name, e.fallback);
    if (!value.ok()) return value.status();
    if (*value != e.expected) {
      return Invalid(absl::StrCat(where, ": ", e.name, " ", ShapeString(*value), ", expected ",
                                  ShapeString(e.expected)));
    }
  }
  absl::StatusOr<int64_t> group = IntAttribute(node, index, "group", 1);
  if (!group.ok()) return group.status();
  if (*group != 1) {
    return Invalid(absl::StrCat(where, ": group ", *group, ", expected 1"));
  }
  if (const AttributeProto* a = FindAttribute(node, "auto_pad");
      a != nullptr && !(a->s().empty() || a->s() == "NOTSET")) {
    return Invalid(absl::StrCat(where, ": auto_pad '", a->s(), "', expected explicit pads"));
  }
  return absl::OkStatus();
}

// Converts one initializer to float32, then frees its bytes in the proto. Every size is
// checked against the data actually present before anything is allocated.
absl::StatusOr<HostTensor> ToHostTensor(TensorProto* t, const std::string& origin) {
  HostTensor out;
  uint64_t numel = 1;
  for (int64_t d : t->dims()) {
    if (d < 0) return Invalid(absl::StrCat(origin, ": negative dimension ", d));
    if (d != 0 && numel > (uint64_t{1} << 40) / static_cast<uint64_t>(d)) {
      return Invalid(absl::StrCat(origin, ": dims ", ShapeString(Dims(*t)), " are absurd"));
    }
    numel *= static_cast<uint64_t>(d);
    out.shape.push_back(d);
  }
  const int32_t type = t->data_type();
  size_t elem_size = 0;
  if (type == TensorProto::FLOAT) {
    elem_size = 4;
  } else if (type == TensorProto::FLOAT16 || type == TensorProto::BFLOAT16) {
    elem_size = 2;
  } else {
    return Invalid(absl::StrCat(origin, ": data type ", DataTypeName(type),
                                " is not supported (weights must be FLOAT, FLOAT16 or "
                                "BFLOAT16)"));
  }
  const bool has_typed = t->float_data_size() > 0 || t->int32_data_size() > 0 ||
                         t->int64_data_size() > 0;
  if (t->has_raw_data() && has_typed) {
    return Invalid(absl::StrCat(origin, ": holds both raw_data and typed data"));
  }
  auto to_float = [type](uint16_t bits) {
    return type == TensorProto::FLOAT16 ? HalfToFloat(bits) : BFloat16ToFloat(bits);
  };
  if (t->has_raw_data()) {
    const std::string& raw = t->raw_data();
    if (raw.size() != numel * elem_size) {
      return Invalid(absl::StrCat(origin, ": raw_data is ", raw.size(), " bytes but ",
                                  DataTypeName(type), " ", ShapeString(out.shape), " needs ",
                                  numel * elem_size));
    }
    out.values.resize(numel);
    if (type == TensorProto::FLOAT) {
      if (numel > 0) std::memcpy(out.values.data(), raw.data(), raw.size());
    } else {
      for (uint64_t i = 0; i < numel; ++i) {
        uint16_t bits;
        std::memcpy(&bits, raw.data() + 2 * i, 2);
        out.values[i] = to_float(bits);
      }
    }
  } else if (type == TensorProto::FLOAT) {
    if (static_cast<uint64_t>(t->float_data_size()) != numel ||
        t->int32_data_size() > 0 || t->int64_data_size() > 0) {
      return Invalid(absl::StrCat(origin, ": float_data holds ", t->float_data_size(),
                                  " values but dims ", ShapeString(out.shape), " need ", numel));
    }
    out.values.assign(t->float_data().begin(), t->float_data().end());
  } else {
    // onnx.proto: FLOAT16 (and likewise BFLOAT16) values sit in int32_data, one 16-bit
    // pattern per element.
    if (static_cast<uint64_t>(t->int32_data_size()) != numel || t->float_data_size() > 0 ||
        t->int64_data_size() > 0) {
      return Invalid(absl::StrCat(origin, ": int32_data holds ", t->int32_data_size(),
                                  " values but dims ", ShapeString(out.shape), " need ", numel));
    }
    out.values.resize(numel);
    for (uint64_t i = 0; i < numel; ++i) {
      const int32_t v = t->int32_data(static_cast<int>(i));
      if (v < 0 || v > 0xffff) {
        return Invalid(absl::StrCat(origin, ": int32_data[", i, "] = ", v,
                                    " is not a 16-bit pattern"));
      }
      out.values[i] = to_float(static_cast<uint16_t>(v));
    }
  }
  std::string().swap(*t->mutable_raw_data());
  t->clear_raw_data();
  google::protobuf::RepeatedField<float>().Swap(t->mutable_float_data());
  google::protobuf::RepeatedField<int32_t>().Swap(t->mutable_int32_data());
  return out;
}

absl::StatusOr<HostTensor> Transformed(HostTensor t, Transform transform,
                                       const std::string& origin) {
  switch (transform) {
    case Transform::kNone:
      return t;
    case Transform::kPreluSlope:
      if (t.shape.size() == 1 ||
          (t.shape.size() == 3 && t.shape[1] == 1 && t.shape[2] == 1)) {
        t.shape = {t.shape[0]};
        return t;
      }
      return Invalid(absl::StrCat(origin, ": PRelu slope has shape ", ShapeString(t.shape),
                                  ", expected [C,1,1] or [C]"));
    case Transform::kTranspose: {
      if (t.shape.size() != 2) {
        return Invalid(absl::StrCat(origin, ": Gemm weight has shape ", ShapeString(t.shape),
                                    ", expected a matrix"));
      }
      const int64_t rows = t.shape[0];
      const int64_t cols = t.shape[1];
      std::vector<float> transposed(t.values.size());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) transposed[c * rows + r] = t.values[r * cols + c];
      }
      t.values = std::move(transposed);
      t.shape = {cols, rows};
      return t;
    }
  }
  return t;
}

class Extractor {
 public:
  explicit Extractor(GraphProto* graph) : graph_(*graph) {}

  absl::StatusOr<std::map<std::string, HostTensor>> Run() {
    if (absl::Status s = IndexInitializers(); !s.ok()) return s;
    if (absl::Status s = ClassifyNodes(); !s.ok()) return s;
    if (absl::Status s = MapBatchNorms(); !s.ok()) return s;
    if (absl::Status s = InferAndCount(); !s.ok()) return s;
    if (absl::Status s = MapGemm(); !s.ok()) return s;
    if (absl::Status s = MapConvs(); !s.ok()) return s;
    if (absl::Status s = MapPrelus(); !s.ok()) return s;
    if (absl::Status s = CheckLeftovers(); !s.ok()) return s;
    return Convert();
  }

 private:
  struct IndexedNode {
    const NodeProto* node;
    int index;  // position in graph.node, for messages
  };

  absl::Status IndexInitializers() {
    if (graph_.sparse_initializer_size() > 0) {
      return Invalid("the graph has sparse initializers, which are not supported");
    }
    for (TensorProto& t : *graph_.mutable_initializer()) {
      if (t.name().empty()) return Invalid("an initializer has no name");
      if (!initializers_.emplace(t.name(), &t).second) {
        return Invalid(absl::StrCat("initializer '", t.name(), "' appears twice"));
      }
      // Refused up front, before any other check could blame something else: the weights of
      // such a file are not in it.
      if (t.data_location() == TensorProto::EXTERNAL || t.external_data_size() > 0) {
        return Invalid(absl::StrCat(
            "initializer '", t.name(),
            "' keeps its data in an external file, which is not supported; save the model "
            "with all tensors inside the .onnx file"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status ClassifyNodes() {
    for (int i = 0; i < graph_.node_size(); ++i) {
      const NodeProto& node = graph_.node(i);
      if (!node.domain().empty() && node.domain() != "ai.onnx") {
        return Invalid(absl::StrCat(NodeLabel(node, i), " is from operator domain '",
                                    node.domain(), "', which an IResNet export does not use"));
      }
      const std::string& op = node.op_type();
      if (op == "Conv") {
        convs_.push_back({&node, i});
      } else if (op == "PRelu") {
        prelus_.push_back({&node, i});
      } else if (op == "BatchNormalization") {
        batch_norms_.push_back({&node, i});
      } else if (op == "Gemm") {
        gemms_.push_back({&node, i});
      } else if (HarmlessOps().count(op) == 0) {
        return Invalid(absl::StrCat(NodeLabel(node, i), ": op type '", op,
                                    "' is not part of an ArcFace IResNet graph"));
      }
      if (op == "Add") ++adds_;
    }
    return absl::OkStatus();
  }

  // Claims the initializer feeding input `input` of `node` for checkpoint key `key`.
  absl::Status Assign(const IndexedNode& n, int input, const std::string& key,
                      Transform transform = Transform::kNone) {
    const NodeProto& node = *n.node;
    const std::string where = absl::StrCat(NodeLabel(node, n.index), " (mapped to '", key, "')");
    if (input >= node.input_size() || node.input(input).empty()) {
      return Invalid(absl::StrCat(where, ": input ", input, " is missing"));
    }
    const std::string& name = node.input(input);
    const auto it = initializers_.find(name);
    if (it == initializers_.end()) {
      return Invalid(absl::StrCat(where, ": input ", input, " '", name,
                                  "' is not an initializer (weights must be constant)"));
    }
    if (const auto used = used_by_.find(name); used != used_by_.end()) {
      return Invalid(absl::StrCat("initializer '", name, "' is used twice: for '", used->second,
                                  "' and by ", where));
    }
    if (assigned_keys_.count(key) != 0) {
      return Invalid(absl::StrCat(where, ": key '", key, "' is filled twice"));
    }
    used_by_.emplace(name, key);
    assigned_keys_.insert(key);
    assignments_.push_back(
        {key, it->second, absl::StrCat("key '", key, "' from initializer '", name, "' of ",
                                       NodeLabel(node, n.index)),
         transform});
    return absl::OkStatus();
  }

  absl::Status MapBatchNorms() {
    static const char* const kSuffixes[] = {".weight", ".bias", ".running_mean",
                                            ".running_var"};
    for (const IndexedNode& n : batch_norms_) {
      const NodeProto& node = *n.node;
      const std::string label = NodeLabel(node, n.index);
      if (node.input_size() != 5) {
        return Invalid(absl::StrCat(label, " has ", node.input_size(), " inputs, expected 5"));
      }
      // PyTorch keeps the module names of BNs it cannot fold, and they are the only way to
      // tell which block a BN belongs to.
      const std::string& scale = node.input(1);
      constexpr absl::string_view kWeight = ".weight";
      if (scale.size() <= kWeight.size() ||
          absl::string_view(scale).substr(scale.size() - kWeight.size()) != kWeight) {
        return Invalid(absl::StrCat(label, ": scale input '", scale,
                                    "' is not named '<module>.weight'; BatchNormalization "
                                    "initializers map by their PyTorch names"));
      }
      const std::string prefix = scale.substr(0, scale.size() - kWeight.size());
      for (int i = 1; i <= 4; ++i) {
        const std::string expected = prefix + kSuffixes[i - 1];
        if (node.input(i) != expected) {
          return Invalid(absl::StrCat(label, ": input ", i, " is '", node.input(i),
                                      "', expected '", expected, "'"));
        }
      }
      absl::StatusOr<float> epsilon = FloatAttribute(node, n.index, "epsilon", 1e-5f);
      if (!epsilon.ok()) return epsilon.status();
      if (*epsilon != kBatchNormEpsilon) {
        return Invalid(absl::StrCat(label, " ('", prefix, "'): epsilon ", *epsilon,
                                    ", expected 1e-05 (the model's BatchNorm epsilon)"));
      }
      absl::StatusOr<int64_t> training = IntAttribute(node, n.index, "training_mode", 0);
      if (!training.ok()) return training.status();
      absl::StatusOr<int64_t> spatial = IntAttribute(node, n.index, "spatial", 1);
      if (!spatial.ok()) return spatial.status();
      int outputs = 0;
      for (const std::string& o : node.output()) outputs += o.empty() ? 0 : 1;
      if (*training != 0 || outputs > 1) {
        return Invalid(absl::StrCat(label, " ('", prefix,
                                    "') is in training mode; export the model in eval mode"));
      }
      if (*spatial != 1) {
        return Invalid(absl::StrCat(label, " ('", prefix, "'): spatial=", *spatial,
                                    ", expected 1"));
      }
      for (int i = 1; i <= 4; ++i) {
        if (absl::Status s = Assign(n, i, node.input(i)); !s.ok()) return s;
      }
    }
    return absl::OkStatus();
  }

  absl::Status InferAndCount() {
    std::vector<std::string> keys(assigned_keys_.begin(), assigned_keys_.end());
    absl::StatusOr<std::array<int, 4>> blocks = InferBlocks(keys);
    if (!blocks.ok()) {
      return Invalid(absl::StrCat(
          "cannot read the blocks per stage off the BatchNormalization names (",
          blocks.status().message(), "); this is not an InsightFace IResNet export"));
    }
    blocks_ = *blocks;
    const int total = blocks_[0] + blocks_[1] + blocks_[2] + blocks_[3];
    const std::string arch = absl::StrCat("an IResNet with blocks {",
                                          absl::StrJoin(blocks_, ","),
                                          "} (read off the BatchNormalization names)");
    struct Count {
      const char* op;
      size_t found;
      size_t expected;
      const char* why;
    };
    const Count counts[] = {
        {"Conv", convs_.size(), static_cast<size_t>(1 + 2 * total + 4),
         "the stem, two per block and four downsamples"},
        {"PRelu", prelus_.size(), static_cast<size_t>(1 + total), "the stem and one per block"},
        {"BatchNormalization", batch_norms_.size(), static_cast<size_t>(total + 2),
         "one per block, bn2 and features"},
        {"Gemm", gemms_.size(), 1, "fc"},
        {"Add", adds_, static_cast<size_t>(total), "one per block"},
    };
    for (const Count& c : counts) {
      if (c.found != c.expected) {
        return Invalid(absl::StrCat("the graph has ", c.found, " ", c.op, " nodes; ", arch,
                                    " has ", c.expected, ": ", c.why));
      }
    }
    return absl::OkStatus();
  }

  absl::Status MapGemm() {
    const IndexedNode& n = gemms_.front();
    const NodeProto& node = *n.node;
    const std::string label = NodeLabel(node, n.index);
    absl::StatusOr<int64_t> trans_a = IntAttribute(node, n.index, "transA", 0);
    absl::StatusOr<int64_t> trans_b = IntAttribute(node, n.index, "transB", 0);
    absl::StatusOr<float> alpha = FloatAttribute(node, n.index, "alpha", 1.0f);
    absl::StatusOr<float> beta = FloatAttribute(node, n.index, "beta", 1.0f);
    for (const absl::Status& s :
         {trans_a.status(), trans_b.status(), alpha.status(), beta.status()}) {
      if (!s.ok()) return s;
    }
    if (*trans_a != 0 || (*trans_b != 0 && *trans_b != 1) || *alpha != 1.0f || *beta != 1.0f) {
      return Invalid(absl::StrCat(label, " (fc): transA=", *trans_a, " transB=", *trans_b,
                                  " alpha=", *alpha, " beta=", *beta,
                                  "; expected a plain y = x·Wᵀ + b"));
    }
    if (node.input_size() != 3) {
      return Invalid(absl::StrCat(label, " (fc) has no bias input"));
    }
    if (absl::Status s = Assign(n, 1, "fc.weight",
                                *trans_b == 1 ? Transform::kNone : Transform::kTranspose);
        !s.ok()) {
      return s;
    }
    return Assign(n, 2, "fc.bias");
  }

  // Peeks at a Conv's weight to tell a 1×1 downsample from a 3×3 conv before claiming it.
  absl::StatusOr<bool> IsPointwise(const IndexedNode& n) const {
    const NodeProto& node = *n.node;
    if (node.input_size() < 2) {
      return Invalid(absl::StrCat(NodeLabel(node, n.index), " has no weight input"));
    }
    const auto it = initializers_.find(node.input(1));
    if (it == initializers_.end()) {
      return Invalid(absl::StrCat(NodeLabel(node, n.index), ": weight '", node.input(1),
                                  "' is not an initializer (weights must be constant)"));
    }
    const TensorProto& w = *it->second;
    return w.dims_size() == 4 && w.dims(2) == 1 && w.dims(3) == 1;
  }

  absl::Status MapConv(const IndexedNode& n, const ConvRole& role) {
    const NodeProto& node = *n.node;
    if (node.input_size() != 3 || node.input(2).empty()) {
      return Invalid(absl::StrCat(NodeLabel(node, n.index), " (mapped to '", role.prefix,
                                  "') has no bias; every Conv of a BN-folded export has one"));
    }
    if (absl::Status s = CheckConvAttributes(node, n.index, role); !s.ok()) return s;
    if (absl::Status s = Assign(n, 1, role.prefix + ".weight"); !s.ok()) return s;
    return Assign(n, 2, role.prefix + ".bias");
  }

  absl::Status MapConvs() {
    if (absl::Status s = MapConv(convs_[0], {"conv1", 3, 1}); !s.ok()) return s;
    size_t next = 1;
    for (int stage = 0; stage < 4; ++stage) {
      for (int block = 0; block < blocks_[stage]; ++block) {
        const std::string prefix = absl::StrCat("layer", stage + 1, ".", block, ".");
        // Block 0 owns three convs; the exporter may emit its downsample before, between or
        // after conv1 and conv2, so the group is sorted by kernel, not by position.
        const size_t group = block == 0 ? 3 : 2;
        std::vector<const IndexedNode*> three_by_three;
        std::vector<const IndexedNode*> pointwise;
        for (size_t k = next; k < next + group; ++k) {
          absl::StatusOr<bool> is_pointwise = IsPointwise(convs_[k]);
          if (!is_pointwise.ok()) return is_pointwise.status();
          (*is_pointwise ? pointwise : three_by_three).push_back(&convs_[k]);
        }
        const size_t expected_pointwise = block == 0 ? 1 : 0;
        if (pointwise.size() != expected_pointwise) {
          std::vector<std::string> labels;
          for (size_t k = next; k < next + group; ++k) {
            labels.push_back(NodeLabel(*convs_[k].node, convs_[k].index));
          }
          return Invalid(absl::StrCat(
              "block '", prefix, "' should own ", group, " Conv nodes with ",
              expected_pointwise, " 1x1 kernel(s) (the downsample), but the Conv nodes at its "
              "position (", absl::StrJoin(labels, ", "), ") have ", pointwise.size()));
        }
        const int stride = block == 0 ? 2 : 1;
        if (absl::Status s = MapConv(*three_by_three[0], {prefix + "conv1", 3, 1}); !s.ok()) {
          return s;
        }
        if (absl::Status s = MapConv(*three_by_three[1], {prefix + "conv2", 3, stride});
            !s.ok()) {
          return s;
        }
        if (!pointwise.empty()) {
          if (absl::Status s = MapConv(*pointwise[0], {prefix + "downsample", 1, stride});
              !s.ok()) {
            return s;
          }
        }
        next += group;
      }
    }
    return absl::OkStatus();
  }

  absl::Status MapPrelus() {
    std::vector<std::string> keys = {"prelu.weight"};
    for (int stage = 0; stage < 4; ++stage) {
      for (int block = 0; block < blocks_[stage]; ++block) {
        keys.push_back(absl::StrCat("layer", stage + 1, ".", block, ".prelu.weight"));
      }
    }
    for (size_t k = 0; k < prelus_.size(); ++k) {
      if (prelus_[k].node->input_size() != 2) {
        return Invalid(absl::StrCat(NodeLabel(*prelus_[k].node, prelus_[k].index), " has ",
                                    prelus_[k].node->input_size(), " inputs, expected 2"));
      }
      if (absl::Status s = Assign(prelus_[k], 1, keys[k], Transform::kPreluSlope); !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }

  // Weights that no mapped node consumed would be silently dropped; shape constants of
  // Reshape and friends are integers and may stay.
  absl::Status CheckLeftovers() const {
    for (const TensorProto& t : graph_.initializer()) {
      if (used_by_.count(t.name()) == 0 && IsFloatType(t.data_type())) {
        return Invalid(absl::StrCat("unexpected initializer '", t.name(), "' (",
                                    DataTypeName(t.data_type()), " ", ShapeString(Dims(t)),
                                    "): no Conv, PRelu, BatchNormalization or Gemm uses it"));
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::map<std::string, HostTensor>> Convert() {
    const std::map<std::string, std::vector<int64_t>> expected = ExpectedShapes(blocks_);
    std::map<std::string, HostTensor> tensors;
    for (Assignment& a : assignments_) {
      const auto want = expected.find(a.key);
      if (want == expected.end()) {
        return Invalid(absl::StrCat(a.origin, ": '", a.key, "' is not a key of an IResNet with "
                                    "blocks {", absl::StrJoin(blocks_, ","), "}"));
      }
      // Shapes are checked before the bytes are touched, so a wrong file fails fast.
      std::vector<int64_t> stored = Dims(*a.tensor);
      std::vector<int64_t> as_key = stored;
      if (a.transform == Transform::kPreluSlope && stored.size() == 3 && stored[1] == 1 &&
          stored[2] == 1) {
        as_key = {stored[0]};
      } else if (a.transform == Transform::kTranspose && stored.size() == 2) {
        as_key = {stored[1], stored[0]};
      }
      if (as_key != want->second) {
        return Invalid(absl::StrCat(a.origin, ": shape ", ShapeString(stored), ", expected ",
                                    ShapeString(want->second),
                                    a.transform == Transform::kPreluSlope ? " (or [C,1,1])"
                                                                          : ""));
      }
      absl::StatusOr<HostTensor> t = ToHostTensor(a.tensor, a.origin);
      if (!t.ok()) return t.status();
      absl::StatusOr<HostTensor> shaped = Transformed(*std::move(t), a.transform, a.origin);
      if (!shaped.ok()) return shaped.status();
      tensors.emplace(a.key, *std::move(shaped));
    }
    for (const auto& [key, shape] : expected) {
      if (tensors.count(key) == 0) {
        return Invalid(absl::StrCat("no initializer maps to key '", key, "' ",
                                    ShapeString(shape)));
      }
    }
    return tensors;
  }

  GraphProto& graph_;
  std::map<std::string, TensorProto*> initializers_;
  std::vector<IndexedNode> convs_, prelus_, batch_norms_, gemms_;
  size_t adds_ = 0;
  std::array<int, 4> blocks_{};
  std::map<std::string, std::string> used_by_;  // initializer name → key
  std::set<std::string> assigned_keys_;
  std::vector<Assignment> assignments_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<onnx::ModelProto>> ParseOnnxModel(absl::string_view bytes) {
  if (bytes.size() > static_cast<size_t>(INT_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "file is ", bytes.size(), " bytes; protobuf cannot parse ONNX models over 2 GiB"));
  }
  auto model = std::make_unique<onnx::ModelProto>();
  // An explicit stream, so that the total-bytes limit is INT_MAX whatever the protobuf
  // version's default (older ones stopped at 64 MB; a w600k_r50.onnx is 174 MB).
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(bytes.data()),
                                            static_cast<int>(bytes.size()));
  in.SetTotalBytesLimit(INT_MAX);
  if (!model->MergePartialFromCodedStream(&in) || !in.ConsumedEntireMessage() ||
      in.CurrentPosition() != static_cast<int>(bytes.size())) {
    return absl::InvalidArgumentError("not a parseable ONNX ModelProto");
  }
  if (!model->has_graph() || model->graph().node_size() == 0) {
    return absl::InvalidArgumentError("an ONNX ModelProto without graph nodes");
  }
  return model;
}

absl::StatusOr<std::map<std::string, HostTensor>> ExtractOnnxWeights(onnx::ModelProto* model) {
  return Extractor(model->mutable_graph()).Run();
}

}  // namespace arcface::model
