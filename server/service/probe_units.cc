#include "server/service/probe_units.h"

#include <cmath>
#include <cstddef>

#include "absl/strings/str_cat.h"
#include "server/service/cosine.h"
#include "server/service/embedding_model.h"

namespace arcface::service {

using arcface::v1::Probe;

absl::Status CollectProbes(const google::protobuf::RepeatedPtrField<Probe>& probes,
                           absl::string_view label, int dim, absl::string_view model_id,
                           float* units, std::vector<int>* faces) {
  for (int i = 0; i < probes.size(); ++i) {
    const Probe& p = probes[i];
    const std::string name = absl::StrCat(label, " ", i);
    if (!p.model_id().empty() && p.model_id() != model_id) {
      return absl::FailedPreconditionError(absl::StrCat(
          name, ": an embedding of model ", p.model_id(), ", but this call uses model ", model_id,
          "; embeddings of two models are never compared"));
    }
    switch (p.probe_case()) {
      case Probe::kFace:
        faces->push_back(i);
        break;
      case Probe::kEmbedding: {
        const auto& values = p.embedding().values();
        if (values.size() != dim) {
          return absl::InvalidArgumentError(
              absl::StrCat(name, ": embedding has ", values.size(), " values, expected ", dim));
        }
        for (int j = 0; j < dim; ++j) {
          if (!std::isfinite(values[j])) {
            return absl::InvalidArgumentError(
                absl::StrCat(name, ": embedding value ", j, " is not finite"));
          }
        }
        if (!ToUnit(values.data(), dim, units + size_t(i) * dim)) {
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
