#include "server/model/safetensors.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

// safetensors data is little-endian and is copied into floats byte for byte.
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "this reader assumes a little-endian host"
#endif

namespace arcface::model {
namespace {

using Json = nlohmann::json;

constexpr size_t kLengthPrefixBytes = 8;
// The reference implementation's cap; a real r50 header is ≈30 kB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

enum class DType { kF32, kF16, kBF16, kI64 };

struct Entry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t numel = 0;
  uint64_t begin = 0;
  uint64_t end = 0;
  bool ignored = false;  // num_batches_tracked: checked, then dropped
};

absl::Status Invalid(absl::string_view tensor, absl::string_view reason) {
  return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor, "': ", reason));
}

// A JSON value for an error message. Arrays and objects are only described, never dumped:
// dump() recurses, and a hostile header can nest millions of levels deep.
std::string Brief(const Json& v) {
  if (v.is_array()) {
    bool flat = true;
    for (const Json& e : v) flat = flat && !e.is_structured();
    if (!flat || v.size() > 8) return absl::StrCat("a JSON array of ", v.size(), " elements");
  } else if (v.is_object()) {
    return absl::StrCat("a JSON object of ", v.size(), " fields");
  }
  std::string text = v.dump();  // a scalar or a short flat array
  constexpr size_t kMax = 64;
  if (text.size() > kMax) text = text.substr(0, kMax) + "...";
  return text;
}

bool IsBatchCounter(absl::string_view name) {
  constexpr absl::string_view kSuffix = "num_batches_tracked";
  if (name.size() < kSuffix.size() || name.substr(name.size() - kSuffix.size()) != kSuffix) {
    return false;
  }
  return name.size() == kSuffix.size() || name[name.size() - kSuffix.size() - 1] == '.';
}

// Reads a JSON value that must be a non-negative integer that fits int64. Floats (even 3.0),
// booleans and strings are refused: a writer that emits them is not trustworthy.
bool AsNonNegativeInt(const Json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    *out = u;
    return true;
  }
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    if (i < 0) return false;
    *out = static_cast<uint64_t>(i);
    return true;
  }
  return false;
}

absl::Status ParseDType(const std::string& name, const std::string& dtype, DType* out,
                        uint64_t* size) {
  if (dtype == "F32") {
    *out = DType::kF32;
    *size = 4;
  } else if (dtype == "F16") {
    *out = DType::kF16;
    *size = 2;
  } else if (dtype == "BF16") {
    *out = DType::kBF16;
    *size = 2;
  } else if (dtype == "I64") {
    if (!IsBatchCounter(name)) {
      return Invalid(name, "dtype I64 is accepted only for *.num_batches_tracked counters; "
                           "weights must be F32, F16 or BF16");
    }
    *out = DType::kI64;
    *size = 8;
  } else {
    static const std::set<std::string> kKnownUnsupported = {
        "F64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2"};
    if (kKnownUnsupported.count(dtype) != 0) {
      return Invalid(name, absl::StrCat("unsupported dtype '", dtype,
                                        "' (weights must be F32, F16 or BF16)"));
    }
    return Invalid(name, absl::StrCat("unknown dtype '", dtype, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Entry> ParseEntry(const std::string& name, const Json& value,
                                 uint64_t data_size) {
  Entry e;
  e.name = name;
  if (!value.is_object()) {
    return Invalid(name, absl::StrCat("header entry is a JSON ", value.type_name(),
                                      ", not an object"));
  }
  for (const auto& [field, unused] : value.items()) {
    if (field != "dtype" && field != "shape" && field != "data_offsets") {
      return Invalid(name, absl::StrCat("unexpected field \"", field, "\" in header entry"));
    }
  }
  const auto dtype_it = value.find("dtype");
  if (dtype_it == value.end()) return Invalid(name, "header entry has no \"dtype\"");
  if (!dtype_it->is_string()) return Invalid(name, "\"dtype\" is not a string");
  uint64_t elem_size = 0;
  if (absl::Status s = ParseDType(name, dtype_it->get<std::string>(), &e.dtype, &elem_size);
      !s.ok()) {
    return s;
  }
  e.ignored = IsBatchCounter(name);

  const auto shape_it = value.find("shape");
  if (shape_it == value.end()) return Invalid(name, "header entry has no \"shape\"");
  if (!shape_it->is_array()) return Invalid(name, "\"shape\" is not an array");
  e.numel = 1;
  for (const Json& dim_json : *shape_it) {
    uint64_t dim = 0;
    if (!AsNonNegativeInt(dim_json, &dim)) {
      return Invalid(name, absl::StrCat("\"shape\" holds ", Brief(dim_json),
                                        ", not a non-negative integer"));
    }
    if (dim != 0 && e.numel > std::numeric_limits<uint64_t>::max() / dim) {
      return Invalid(name, "\"shape\" has more elements than can exist");
    }
    e.numel *= dim;
    e.shape.push_back(static_cast<int64_t>(dim));
  }
  if (e.numel > std::numeric_limits<uint64_t>::max() / elem_size) {
    return Invalid(name, "\"shape\" has more elements than can exist");
  }
  const uint64_t byte_size = e.numel * elem_size;

  const auto offsets_it = value.find("data_offsets");
  if (offsets_it == value.end()) return Invalid(name, "header entry has no \"data_offsets\"");
  if (!offsets_it->is_array() || offsets_it->size() != 2 ||
      !AsNonNegativeInt((*offsets_it)[0], &e.begin) ||
      !AsNonNegativeInt((*offsets_it)[1], &e.end)) {
    return Invalid(name, absl::StrCat("\"data_offsets\" is ", Brief(*offsets_it),
                                      ", not [begin, end] with non-negative integers"));
  }
  if (e.begin > e.end) {
    return Invalid(name, absl::StrCat("data_offsets [", e.begin, ", ", e.end,
                                      "] end before they begin"));
  }
  if (e.end > data_size) {
    return Invalid(name, absl::StrCat("data_offsets [", e.begin, ", ", e.end,
                                      "] reach past the end of the data region (", data_size,
                                      " bytes); the file is truncated or corrupt"));
  }
  if (e.end - e.begin != byte_size) {
    return Invalid(name, absl::StrCat("byte size mismatch: data_offsets span ", e.end - e.begin,
                                      " bytes but dtype ", dtype_it->get<std::string>(),
                                      " and shape [", absl::StrJoin(e.shape, ","), "] need ",
                                      byte_size));
  }
  return e;
}

absl::Status CheckMetadata(const Json& metadata) {
  if (!metadata.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"__metadata__\" is a JSON ", metadata.type_name(), ", not an object"));
  }
  for (const auto& [key, value] : metadata.items()) {
    if (!value.is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "\"__metadata__\" must map strings to strings, but \"", key, "\" is a JSON ",
          value.type_name()));
    }
  }
  return absl::OkStatus();
}

// Entries that own bytes must not share any; empty tensors own none.
absl::Status CheckNoOverlap(std::vector<const Entry*> entries) {
  entries.erase(std::remove_if(entries.begin(), entries.end(),
                               [](const Entry* e) { return e->begin == e->end; }),
                entries.end());
  std::sort(entries.begin(), entries.end(), [](const Entry* a, const Entry* b) {
    return std::tie(a->begin, a->end) < std::tie(b->begin, b->end);
  });
  for (size_t i = 1; i < entries.size(); ++i) {
    const Entry& prev = *entries[i - 1];
    const Entry& cur = *entries[i];
    if (cur.begin < prev.end) {
      return Invalid(cur.name, absl::StrCat("data_offsets [", cur.begin, ", ", cur.end,
                                            "] overlap those of tensor '", prev.name, "' [",
                                            prev.begin, ", ", prev.end, "]"));
    }
  }
  return absl::OkStatus();
}

HostTensor Convert(const Entry& e, const char* data) {
  HostTensor t;
  t.shape = e.shape;
  t.values.resize(e.numel);
  const char* src = data + e.begin;
  switch (e.dtype) {
    case DType::kF32:
      if (e.numel > 0) std::memcpy(t.values.data(), src, e.numel * sizeof(float));
      break;
    case DType::kF16:
    case DType::kBF16:
      for (uint64_t i = 0; i < e.numel; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, 2);
        t.values[i] = e.dtype == DType::kF16 ? HalfToFloat(bits) : BFloat16ToFloat(bits);
      }
      break;
    case DType::kI64:
      break;  // never converted: only counters are I64, and they are dropped
  }
  return t;
}

absl::StatusOr<std::map<std::string, HostTensor>> ParseValidated(const Json& header,
                                                                 const char* data,
                                                                 uint64_t data_size) {
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors header is a JSON ", header.type_name(), ", not an object"));
  }
  std::vector<Entry> entries;
  entries.reserve(header.size());
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (absl::Status s = CheckMetadata(value); !s.ok()) return s;
      continue;
    }
    absl::StatusOr<Entry> entry = ParseEntry(name, value, data_size);
    if (!entry.ok()) return entry.status();
    entries.push_back(*std::move(entry));
  }
  std::vector<const Entry*> pointers;
  pointers.reserve(entries.size());
  for (const Entry& e : entries) pointers.push_back(&e);
  if (absl::Status s = CheckNoOverlap(std::move(pointers)); !s.ok()) return s;

  std::map<std::string, HostTensor> tensors;
  for (const Entry& e : entries) {
    if (!e.ignored) tensors.emplace(e.name, Convert(e, data));
  }
  return tensors;
}

}  // namespace

float HalfToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  uint32_t out;
  if (exponent == 0) {
    // Zero or subnormal: mantissa × 2^-24 is exact in float32.
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign != 0 ? -magnitude : magnitude;
  } else if (exponent == 0x1f) {
    out = sign | 0x7f800000u | (mantissa << 13);  // inf, or NaN keeping its payload
  } else {
    out = sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &out, sizeof(f));
  return f;
}

float BFloat16ToFloat(uint16_t bits) {
  const uint32_t out = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &out, sizeof(f));
  return f;
}

bool LooksLikeSafetensors(absl::string_view bytes) {
  return bytes.size() > kLengthPrefixBytes && bytes[kLengthPrefixBytes] == '{';
}

absl::StatusOr<std::map<std::string, HostTensor>> ParseSafetensors(absl::string_view bytes) {
  if (bytes.size() < kLengthPrefixBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("file is ", bytes.size(),
                     " bytes, shorter than the 8-byte safetensors header length"));
  }
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), sizeof(header_len));
  const uint64_t rest = bytes.size() - kLengthPrefixBytes;
  if (header_len > rest) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors header length ", header_len, " is larger than the ", rest,
                     " bytes that follow it; the file is truncated or not safetensors"));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors header length ", header_len, " exceeds the ", kMaxHeaderBytes,
        "-byte limit"));
  }
  if (header_len < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors header length ", header_len, " is too short for a JSON object"));
  }
  const char* header_begin = bytes.data() + kLengthPrefixBytes;
  const char* data = header_begin + header_len;
  const uint64_t data_size = rest - header_len;

  // nlohmann keeps the last of duplicate names silently; a header that names a tensor (or a
  // field) twice is ambiguous, so the parse callback watches for it in every object.
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  auto watch_duplicates = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case Json::parse_event_t::key:
        if (!open_objects.empty() && duplicate.empty() && parsed.is_string() &&
            !open_objects.back().insert(parsed.get<std::string>()).second) {
          duplicate = parsed.get<std::string>();
        }
        break;
      default:
        break;
    }
    return true;
  };

  Json header;
  try {
    header = Json::parse(header_begin, data, watch_duplicates);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors header is not valid JSON: ", e.what()));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors header names \"", duplicate, "\" twice"));
  }
  // Every access below checks the JSON type first; the catch is the boundary in case one
  // was missed, so that no exception can leave the loader.
  try {
    return ParseValidated(header, data, data_size);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed safetensors header: ", e.what()));
  }
}

}  // namespace arcface::model
