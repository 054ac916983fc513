// ServedModels: the models one server serves (--model NAME=PATH, repeatable), each with its own
// Embedder (batcher, model threads, queue), and how a request's model name finds one.
//
// Contract
// - The first model is the default: a request whose `model` is empty gets it.
// - Find() of an unknown name is NOT_FOUND naming the served ones ("model 'x' is not served
//   here; this server serves: arcface (default), dlib"). ByModelId() finds the model that
//   computes embeddings of a model_id (a gallery's binding), or null.
// - Ownership: the Embedders are borrowed and outlive every call; the list is fixed once built.
// - Thread safety: const after construction; any thread may read it.
#ifndef ARCFACE_SERVER_SERVICE_SERVED_MODELS_H_
#define ARCFACE_SERVER_SERVICE_SERVED_MODELS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/service/embedder.h"
#include "server/service/embedding_model.h"

namespace arcface::service {

struct ServedModel {
  ModelDescription description;
  Embedder* embedder = nullptr;

  const model::CropGeometry& geometry() const { return embedder->geometry(); }
  int dim() const { return embedder->embedding_dim(); }
  const std::string& model_id() const { return description.model_id; }
};

class ServedModels {
 public:
  ServedModels() = default;
  // `models` non-empty, names distinct (the flags check both); the first is the default.
  explicit ServedModels(std::vector<ServedModel> models) : models_(std::move(models)) {}

  absl::StatusOr<const ServedModel*> Find(absl::string_view name) const;
  const ServedModel* ByModelId(absl::string_view model_id) const;
  const ServedModel& default_model() const { return models_.front(); }
  const std::vector<ServedModel>& all() const { return models_; }
  bool empty() const { return models_.empty(); }
  // "arcface (default), dlib": for errors.
  std::string Names() const;

 private:
  std::vector<ServedModel> models_;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_SERVED_MODELS_H_
