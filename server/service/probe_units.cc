#include "server/service/probe_units.h"

#include <cmath>
#include <cstddef>

#include "absl/strings/str_cat.h"
#include "server/service/cosine.h"
#include "server/service/embedding_model.h"

namespace arcface::service {

using arcface::v1::Probe;

absl::Status CollectProbes(const google::protobuf::RepeatedPtrField<Probe>& probes,
                           absl::string_view label, float* units, std::vector<int>* faces) {
  for (int i = 0; i < probes.size(); ++i) {
    const Probe& p = probes[i];
    const std::string name = absl::StrCat(label, " ", i);
    switch (p.probe_case()) {
      case Probe::kFace:
        faces->push_back(i);
        break;
      case Probe::kEmbedding: {
        const auto& values = p.embedding().values();
        if (values.size() != kEmbeddingDim) {
          return absl::InvalidArgumentError(absl::StrCat(name, ": embedding has ", values.size(),
                                                         " values, expected ", kEmbeddingDim));
        }
        for (int j = 0; j < kEmbeddingDim; ++j) {
          if (!std::isfinite(values[j])) {
            return absl::InvalidArgumentError(
                absl::StrCat(name, ": embedding value ", j, " is not finite"));
          }
        }
        if (!ToUnit(values.data(), units + size_t(i) * kEmbeddingDim)) {
          return absl::InvalidArgumentError(
              absl::StrCat(name, ": embedding has zero norm (cosine is undefined)"));
        }
        break;
      }
      case Probe::PROBE_NOT_SET:
        return absl::InvalidArgumentError(
            absl::StrCat(name, ": probe has neither a face nor an embedding"));
    }
  }
  return absl::OkStatus();
}

}  // namespace arcface::service
