#include "server/model/tfjs_weights.h"

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/files.h"
#include "server/model/sha256.h"

namespace arcface::model {
namespace {

// The shards are read by memcpy into host integers and floats.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "TF.js shards are little-endian");

using json = nlohmann::json;

// How a tensor's elements are stored in its shard.
enum class Stored { kFloat32, kInt32, kUint8, kUint16, kFloat16 };

size_t StoredSize(Stored s) {
  switch (s) {
    case Stored::kUint8:
      return 1;
    case Stored::kUint16:
    case Stored::kFloat16:
      return 2;
    case Stored::kFloat32:
    case Stored::kInt32:
      return 4;
  }
  return 4;
}

struct Spec {
  std::string name;
  std::vector<int64_t> shape;
  uint64_t numel = 1;
  bool is_int = false;
  Stored stored = Stored::kFloat32;
  double scale = 1.0;
  double min = 0.0;
  uint64_t offset = 0;  // in its group's bytes
  uint64_t bytes = 0;
};

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// The most elements a tensor, and bytes a group, may claim: far beyond any real file, and small
// enough that byte sizes (4 per element at most) and their sums cannot overflow.
constexpr uint64_t kMaxTensorBytes = uint64_t{1} << 40;

class ManifestParser {
 public:
  explicit ManifestParser(const std::string& source) : source_(source) {}

  absl::Status Bad(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", what));
  }
  absl::Status BadTensor(absl::string_view name, absl::string_view what) const {
    return Bad(absl::StrCat("tensor '", name, "': ", what));
  }

  absl::StatusOr<Spec> ParseSpec(const json& w, size_t group, size_t index) const {
    const std::string where = absl::StrCat("group ", group, " weight ", index);
    if (!w.is_object()) return Bad(absl::StrCat(where, " is not a JSON object"));
    Spec spec;
    const auto name = w.find("name");
    if (name == w.end() || !name->is_string() || name->get<std::string>().empty()) {
      return Bad(absl::StrCat(where, " has no \"name\" (a non-empty string)"));
    }
    spec.name = name->get<std::string>();

    const auto shape = w.find("shape");
    if (shape == w.end() || !shape->is_array()) {
      return BadTensor(spec.name, "no \"shape\" (a list of sizes)");
    }
    for (const json& d : *shape) {
      if (!d.is_number_integer()) {
        return BadTensor(spec.name, absl::StrCat("shape ", shape->dump(),
                                                 " holds a non-integer size ", d.dump()));
      }
      if (d.is_number_unsigned() && d.get<uint64_t>() > uint64_t{INT64_MAX}) {
        return BadTensor(spec.name, absl::StrCat("shape ", shape->dump(), " overflows"));
      }
      const int64_t dim = d.get<int64_t>();
      if (dim < 0) {
        return BadTensor(spec.name,
                         absl::StrCat("shape ", shape->dump(), " has a negative size ", dim));
      }
      spec.shape.push_back(dim);
    }
    // numel and byte size with overflow checks: a zero anywhere makes the tensor empty, but
    // the sizes before it must not have overflowed either.
    for (int64_t dim : spec.shape) {
      uint64_t next = 0;
      if (__builtin_mul_overflow(spec.numel, static_cast<uint64_t>(dim), &next) ||
          next > kMaxTensorBytes) {
        return BadTensor(spec.name,
                         absl::StrCat("shape ", ShapeString(spec.shape), " overflows"));
      }
      spec.numel = next;
    }

    const auto dtype = w.find("dtype");
    if (dtype == w.end() || !dtype->is_string()) {
      return BadTensor(spec.name, "no \"dtype\" (a string)");
    }
    const std::string dt = dtype->get<std::string>();
    if (dt == "float32") {
      spec.stored = Stored::kFloat32;
    } else if (dt == "int32") {
      spec.stored = Stored::kInt32;
      spec.is_int = true;
    } else {
      return BadTensor(spec.name, absl::StrCat("unknown dtype ", dtype->dump(),
                                               " (float32 or int32)"));
    }

    const auto quant = w.find("quantization");
    if (quant != w.end()) {
      if (!quant->is_object()) return BadTensor(spec.name, "\"quantization\" is not an object");
      const auto qdtype = quant->find("dtype");
      if (qdtype == quant->end() || !qdtype->is_string()) {
        return BadTensor(spec.name, "\"quantization\" has no \"dtype\" (a string)");
      }
      const std::string q = qdtype->get<std::string>();
      if (q == "uint8" || q == "uint16") {
        spec.stored = q == "uint8" ? Stored::kUint8 : Stored::kUint16;
        for (auto [key, out] : {std::pair{"scale", &spec.scale}, std::pair{"min", &spec.min}}) {
          const auto v = quant->find(key);
          if (v == quant->end() || !v->is_number() || !std::isfinite(v->get<double>())) {
            return BadTensor(spec.name, absl::StrCat(q, " quantisation without a finite \"",
                                                     key, "\""));
          }
          *out = v->get<double>();
        }
      } else if (q == "float16") {
        if (spec.is_int) {
          return BadTensor(spec.name, "float16 quantisation of an int32 tensor");
        }
        spec.stored = Stored::kFloat16;
      } else {
        return BadTensor(spec.name, absl::StrCat("unknown quantisation dtype ", qdtype->dump(),
                                                 " (uint8, uint16 or float16)"));
      }
    }
    spec.bytes = spec.numel * StoredSize(spec.stored);
    return spec;
  }

 private:
  const std::string& source_;
};

// A shard path must stay in the manifest's folder.
bool SafeShardPath(const std::string& path) {
  if (path.empty() || path[0] == '/') return false;
  for (absl::string_view part : absl::StrSplit(path, '/')) {
    if (part == "..") return false;
  }
  return true;
}

float HalfToFloat(uint16_t h) {
  const int sign = (h >> 15) & 1;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
  } else if (exponent == 0x1f) {
    magnitude = mantissa == 0 ? std::numeric_limits<float>::infinity()
                              : std::numeric_limits<float>::quiet_NaN();
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

template <typename T>
T ReadAt(const char* base, uint64_t index) {
  T value;
  std::memcpy(&value, base + index * sizeof(T), sizeof(T));
  return value;
}

// The quantised element `i` of `spec` as stored (q).
double Quantised(const Spec& spec, const char* data, uint64_t i) {
  return spec.stored == Stored::kUint8 ? static_cast<double>(ReadAt<uint8_t>(data, i))
                                       : static_cast<double>(ReadAt<uint16_t>(data, i));
}

std::string NonFinite(uint64_t index, double value) {
  return absl::StrCat("value ", index, " is ", std::isnan(value) ? "NaN" : "infinite",
                      " (corrupt shard or quantisation)");
}

}  // namespace

absl::StatusOr<TfjsWeights> TfjsWeights::Parse(absl::string_view manifest_json,
                                               const ShardReader& read_shard,
                                               const std::string& source) {
  const ManifestParser parser(source);
  json manifest;
  try {
    manifest = json::parse(manifest_json);
  } catch (const json::exception& e) {
    // parse_error for bad syntax, out_of_range for a number beyond double's range.
    return parser.Bad(absl::StrCat("not JSON: ", e.what()));
  }
  const json* groups = &manifest;
  if (manifest.is_object()) {
    const auto it = manifest.find("weightsManifest");
    if (it == manifest.end()) {
      return parser.Bad("a JSON object without \"weightsManifest\" (neither a face-api "
                        "manifest nor a TF.js graph model)");
    }
    groups = &*it;
  }
  if (!groups->is_array()) {
    return parser.Bad("the weights manifest is not a list of groups {\"paths\", \"weights\"}");
  }

  TfjsWeights out;
  out.source_ = source;
  // The manifest, then every shard: hashed in one piece; each group's bytes lie within it.
  std::string all(manifest_json);
  std::set<std::string> names;
  for (size_t g = 0; g < groups->size(); ++g) {
    const json& group = (*groups)[g];
    if (!group.is_object()) return parser.Bad(absl::StrCat("group ", g, " is not an object"));
    const auto paths = group.find("paths");
    if (paths == group.end() || !paths->is_array()) {
      return parser.Bad(absl::StrCat("group ", g, " has no \"paths\" (a list of shard files)"));
    }
    const auto weights = group.find("weights");
    if (weights == group.end() || !weights->is_array()) {
      return parser.Bad(absl::StrCat("group ", g, " has no \"weights\" (a list of tensors)"));
    }

    std::vector<Spec> specs;
    uint64_t needed = 0;
    for (size_t i = 0; i < weights->size(); ++i) {
      absl::StatusOr<Spec> spec = parser.ParseSpec((*weights)[i], g, i);
      if (!spec.ok()) return spec.status();
      if (!names.insert(spec->name).second) {
        return parser.BadTensor(spec->name, "the name appears twice in the manifest");
      }
      spec->offset = needed;
      needed += spec->bytes;  // both at most 2^42 here: no overflow
      if (needed > kMaxTensorBytes) {
        return parser.BadTensor(spec->name, "the group's tensors need over 1 TiB");
      }
      specs.push_back(std::move(*spec));
    }

    std::vector<std::string> files;
    const size_t start = all.size();
    for (const json& p : *paths) {
      if (!p.is_string() || !SafeShardPath(p.get<std::string>())) {
        return parser.Bad(absl::StrCat("group ", g, " shard path ", p.dump(),
                                       " is not a relative path inside the manifest's folder"));
      }
      files.push_back(p.get<std::string>());
      absl::StatusOr<std::string> shard = read_shard(files.back());
      if (!shard.ok()) {
        return absl::Status(shard.status().code(),
                            absl::StrCat(source, ": shard ", files.back(), ": ",
                                         shard.status().message()));
      }
      all += *shard;
    }
    const uint64_t have = all.size() - start;
    const std::string shard_names = absl::StrJoin(files, ", ");
    if (have < needed) {
      for (const Spec& spec : specs) {
        if (spec.offset + spec.bytes > have) {
          return parser.BadTensor(
              spec.name,
              absl::StrCat("needs bytes [", spec.offset, ", ", spec.offset + spec.bytes,
                           ") of group ", g, "'s shards (", shard_names, "), which hold only ",
                           have, " bytes of the ", needed,
                           " the manifest describes: truncated shard"));
        }
      }
    }
    if (have > needed) {
      return parser.Bad(absl::StrCat(
          "group ", g, "'s shards (", shard_names, ") hold ", have, " bytes, ", have - needed,
          " more than the ", needed, " its tensors need",
          specs.empty() ? std::string() : absl::StrCat(" (the last, '", specs.back().name,
                                                       "', ends at ", needed, ")"),
          ": padded shard, or a manifest that misses tensors"));
    }

    const char* group_bytes = all.data() + start;
    for (Spec& spec : specs) {
      const char* data = group_bytes + spec.offset;
      TfjsTensor tensor;
      tensor.shape = std::move(spec.shape);
      tensor.is_int = spec.is_int;
      if (spec.is_int) tensor.ints.resize(spec.numel);
      else tensor.values.resize(spec.numel);
      for (uint64_t i = 0; i < spec.numel; ++i) {
        double value = 0;
        switch (spec.stored) {
          case Stored::kFloat32:
            value = ReadAt<float>(data, i);
            break;
          case Stored::kInt32:
            tensor.ints[i] = ReadAt<int32_t>(data, i);
            continue;
          case Stored::kFloat16:
            value = HalfToFloat(ReadAt<uint16_t>(data, i));
            break;
          case Stored::kUint8:
          case Stored::kUint16:
            value = Quantised(spec, data, i) * spec.scale + spec.min;
            break;
        }
        if (spec.is_int) {
          // TF.js: Math.round, i.e. halves up.
          const double rounded = std::floor(value + 0.5);
          if (!(rounded >= INT32_MIN && rounded <= INT32_MAX)) {
            return parser.BadTensor(spec.name, absl::StrCat("value ", i, " (", value,
                                                            ") is out of int32's range"));
          }
          tensor.ints[i] = static_cast<int32_t>(rounded);
          continue;
        }
        // Out of float's range counts as infinite (and would be undefined to convert).
        if (!std::isfinite(value) || std::fabs(value) > FLT_MAX) {
          return parser.BadTensor(spec.name, NonFinite(i, value));
        }
        tensor.values[i] = static_cast<float>(value);
      }
      out.tensors_.emplace(spec.name, std::move(tensor));
    }
  }
  if (out.tensors_.empty()) return parser.Bad("the manifest names no tensors");

  absl::StatusOr<std::string> digest = model::Sha256Hex(all);
  if (!digest.ok()) return digest.status();
  out.sha256_ = std::move(*digest);
  return out;
}

absl::StatusOr<TfjsWeights> TfjsWeights::Load(const std::string& manifest_path) {
  absl::StatusOr<std::string> manifest = common::ReadFile(manifest_path);
  if (!manifest.ok()) return manifest.status();
  const size_t slash = manifest_path.rfind('/');
  const std::string dir = slash == std::string::npos ? "" : manifest_path.substr(0, slash + 1);
  return Parse(
      *manifest,
      [&dir](const std::string& path) { return common::ReadFile(dir + path); },
      manifest_path);
}

bool TfjsWeights::Has(const std::string& name) const { return tensors_.count(name) > 0; }

absl::StatusOr<const TfjsTensor*> TfjsWeights::Get(const std::string& name,
                                                   absl::Span<const int64_t> shape) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": no tensor '", name,
                                                   "' (expected shape ", ShapeString(shape),
                                                   ")"));
  }
  const TfjsTensor& t = it->second;
  if (t.is_int) {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ": tensor '", name, "' is int32, expected float32 of shape ",
                     ShapeString(shape)));
  }
  if (absl::Span<const int64_t>(t.shape) != shape) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": tensor '", name,
                                                   "' has shape ", ShapeString(t.shape),
                                                   ", expected ", ShapeString(shape)));
  }
  return &t;
}

}  // namespace arcface::model
