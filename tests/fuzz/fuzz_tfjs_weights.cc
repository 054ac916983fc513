// Fuzz target: bytes → TfjsWeights::Parse, checked against tfjs_weights.h's contract. The input
// is the manifest's text, then the shards' bytes, split by "#shard#": the k-th shard that Parse
// asks for is the k-th piece, and when none is left the reader answers NOT_FOUND, as a missing
// file would. File-free: nothing touches the disk.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "server/model/tfjs_weights.h"

namespace {

void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_tfjs_weights: %s\n", what.c_str());
  std::abort();
}

constexpr char kSource[] = "fuzz-weights_manifest.json";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  const std::vector<absl::string_view> pieces = absl::StrSplit(bytes, "#shard#");
  size_t next = 1;
  bool ran_out = false;
  const auto read_shard =
      [&](const std::string& path) -> absl::StatusOr<std::string> {
    // Parse must refuse a path that leaves the manifest's folder before reading it.
    if (path.empty() || path[0] == '/') Fail("asked for the shard '" + path + "'");
    for (absl::string_view part : absl::StrSplit(path, '/')) {
      if (part == "..") Fail("asked for the shard '" + path + "'");
    }
    if (next >= pieces.size()) {
      ran_out = true;
      return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    }
    return std::string(pieces[next++]);
  };
  absl::StatusOr<arcface::model::TfjsWeights> w =
      arcface::model::TfjsWeights::Parse(pieces[0], read_shard, kSource);
  if (!w.ok()) {
    const absl::Status& s = w.status();
    const bool not_found = s.code() == absl::StatusCode::kNotFound;
    if (!(s.code() == absl::StatusCode::kInvalidArgument || (not_found && ran_out))) {
      Fail(absl::StrCat("unexpected error: ", s.ToString()));
    }
    // Every error names the manifest first, and then says something.
    if (!absl::StartsWith(s.message(), absl::StrCat(kSource, ": ")) ||
        s.message().size() <= sizeof(kSource) + 1) {
      Fail(absl::StrCat("the error does not name the manifest: ", s.ToString()));
    }
    return 0;
  }

  if (w->tensors().empty()) Fail("accepted a manifest without tensors");
  if (w->sha256().size() != 64) Fail("no sha256");
  if (w->source() != kSource) Fail("wrong source");
  for (const auto& [name, t] : w->tensors()) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) Fail(absl::StrCat("'", name, "' has a negative size"));
      numel *= static_cast<uint64_t>(d);
    }
    const size_t count = t.is_int ? t.ints.size() : t.values.size();
    const size_t other = t.is_int ? t.values.size() : t.ints.size();
    if (numel != count || other != 0) Fail(absl::StrCat("'", name, "' has the wrong count"));
    for (float v : t.values) {
      if (!std::isfinite(v)) Fail(absl::StrCat("'", name, "' holds a non-finite value"));
    }
    absl::StatusOr<const arcface::model::TfjsTensor*> got = w->Get(name, t.shape);
    if (got.ok() == t.is_int || (got.ok() && *got != &t)) {
      Fail(absl::StrCat("Get('", name, "') with its own shape: ", got.status().ToString()));
    }
    std::vector<int64_t> other_shape = t.shape;
    other_shape.push_back(1);
    if (w->Get(name, other_shape).status().code() != absl::StatusCode::kInvalidArgument) {
      Fail(absl::StrCat("Get('", name, "') accepted a wrong shape"));
    }
  }
  return 0;
}
