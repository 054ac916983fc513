// Probes (a face or an embedding, arcface.v1.Probe) to unit vectors: the step that Compare,
// Enroll and Identify share before their faces go through the batcher.
//
// Contract
// - CollectProbes(): every embedding probe i is checked (`dim` finite values, a nonzero norm,
//   computed by `model_id`) and its unit vector written to units[i * dim]; the index of every
//   face probe is appended to *faces (its row is written later, from the model). Errors:
//   INVALID_ARGUMENT naming the probe ("query 2: embedding has 128 values, expected 512"),
//   including a probe with neither a face nor an embedding; FAILED_PRECONDITION for a probe
//   whose own model_id is another model's (naming both: embeddings of two models are never
//   compared). Pure, thread-safe.
#ifndef ARCFACE_SERVER_SERVICE_PROBE_UNITS_H_
#define ARCFACE_SERVER_SERVICE_PROBE_UNITS_H_

#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "arcface/v1/face_embedding.pb.h"

namespace arcface::service {

// `label` names the probes in errors: "<label> <index>: ...".
absl::Status CollectProbes(const google::protobuf::RepeatedPtrField<arcface::v1::Probe>& probes,
                           absl::string_view label, int dim, absl::string_view model_id,
                           float* units, std::vector<int>* faces);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_PROBE_UNITS_H_
