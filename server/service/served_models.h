// ServedModels: the models one server serves (--model NAME=PATH, repeatable), each with its own
// Embedder (batcher, model threads, queue), how a request's model name finds one, and the swap
// that a reload makes.
//
// Contract
// - The first model is the default: a request whose `model` is empty gets it.
// - Find() of an unknown name is NOT_FOUND naming the served ones ("model 'x' is not served
//   here; this server serves: arcface (default), dlib"). ByModelId() finds the model that
//   computes embeddings of a model_id (a gallery's binding), or null.
// - Versions: each lookup returns a ModelRef, a shared reference to the version serving at that
//   moment. A call keeps its ModelRef until it has handed its crops to that version's Embedder,
//   so it crops, embeds and reports the model_id of one version, whatever Replace() does
//   meanwhile. Replace() swaps in a new version of a served name (a reload) and returns the one
//   it replaced, which the caller retires (see ModelRef below).
// - Ownership: a ServedModel owns what serves it through `resources` (the engine, its adapter
//   and the Embedder, for the server), released with the last ModelRef. Whoever releases the
//   last one must do so off that Embedder's own threads, or after its Shutdown(): the server's
//   reloader keeps a replaced version until it alone holds it, shuts its Embedder down (which
//   answers every crop already queued) and only then lets it go.
// - Thread safety: every method may be called from any thread; lookups take a shared lock.
#ifndef ARCFACE_SERVER_SERVICE_SERVED_MODELS_H_
#define ARCFACE_SERVER_SERVICE_SERVED_MODELS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "server/service/embedder.h"
#include "server/service/embedding_model.h"

namespace arcface::service {

struct ServedModel {
  ModelDescription description;
  Embedder* embedder = nullptr;
  // Keeps the embedder (and the model it calls) alive; null when they are borrowed (tests).
  std::shared_ptr<const void> resources;

  const model::CropGeometry& geometry() const { return embedder->geometry(); }
  int dim() const { return embedder->embedding_dim(); }
  const std::string& model_id() const { return description.model_id; }
  const std::string& name() const { return description.name; }
};

using ModelRef = std::shared_ptr<const ServedModel>;

class ServedModels {
 public:
  ServedModels() = default;
  ServedModels(const ServedModels&) = delete;
  ServedModels& operator=(const ServedModels&) = delete;

  // `models` non-empty, names distinct (the flags check both); the first is the default.
  void Set(std::vector<ServedModel> models) ABSL_LOCKS_EXCLUDED(mu_);
  // Swaps `next` in for the served model of the same name (it stays the default if it was);
  // returns the version it replaced. NOT_FOUND if no model of that name is served.
  absl::StatusOr<ModelRef> Replace(ModelRef next) ABSL_LOCKS_EXCLUDED(mu_);

  absl::StatusOr<ModelRef> Find(absl::string_view name) const ABSL_LOCKS_EXCLUDED(mu_);
  ModelRef ByModelId(absl::string_view model_id) const ABSL_LOCKS_EXCLUDED(mu_);
  // Null before Set().
  ModelRef default_model() const ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<ModelRef> all() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  mutable absl::Mutex mu_;
  std::vector<ModelRef> models_ ABSL_GUARDED_BY(mu_);
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_SERVED_MODELS_H_
