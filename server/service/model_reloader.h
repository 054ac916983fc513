// ModelReloader: reloads served models without a restart (SIGHUP, or ModelAdmin.ReloadModels
// with --admin-rpc). One thread does the reloads, one request after the other.
//
// What a reload of a model does
// 1. `load` re-reads the model's file and validates it (the server's: architecture, shapes,
//    values). A file whose weights are those serving now (same SHA-256) is UNCHANGED: nothing
//    else happens. Demo weights are built in and always UNCHANGED.
// 2. Otherwise `load` builds the new version beside the old one (engine, warm-up, its own
//    Embedder), while the old one keeps serving. A file or engine that fails leaves the old
//    version serving: the result is FAILED with the reason, logged as an error and counted
//    (arcface_model_reloads_total{model, result="failed"}).
// 3. The new version is swapped in (ServedModels::Replace()): calls that look their model up
//    from then on get it. A call that found the old version keeps it (served_models.h), so its
//    faces are cropped and embedded by the weights it started with and it reports their
//    model_id; calls never fail because of a reload.
// 4. The old version retires: once no call holds it any more (each call lets go once its crops
//    are in the old Embedder's queue), its Embedder shuts down, which runs every batch still
//    queued on the old weights, and it is freed (on this thread, never on a batch thread).
//
// Contract
// - Request(): queues a reload of `names` (empty: every served model, in served order) and
//   returns at once. `done` is called exactly once: on the reloader's thread with one result
//   per model once all are reloaded (UNAVAILABLE if Stop() came first), or at once, in
//   Request(), with its refusal: NOT_FOUND (naming the served models) for a name not served,
//   INVALID_ARGUMENT for an empty one, RESOURCE_EXHAUSTED with kMaxPending requests waiting
//   (a burst of SIGHUPs cannot queue work without end), UNAVAILABLE after Stop().
// - Ownership: `models` and `metrics` are borrowed and outlive the reloader; `load` is owned.
// - Blocking: Request() takes a short mutex. Stop() waits for the reload in progress (a model
//   being built finishes; a retiring version is shut down at once, running its queued
//   batches), answers the requests still queued UNAVAILABLE, and joins the thread.
// - Thread safety: Request() from any thread; Stop() once, from the owner.
#ifndef ARCFACE_SERVER_SERVICE_MODEL_RELOADER_H_
#define ARCFACE_SERVER_SERVICE_MODEL_RELOADER_H_

#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/service/served_models.h"
#include "server/service/service_metrics.h"

namespace arcface::service {

struct ModelReload {
  enum class Result { kReloaded, kUnchanged, kFailed };
  std::string model;  // the served name
  Result result = Result::kUnchanged;
  std::string model_id;           // serving after the reload
  std::string previous_model_id;  // serving before it
  std::string error;              // kFailed: why (the previous weights keep serving)
  double seconds = 0;             // reading, building and warming up
};

// "reloaded", "unchanged", "failed": the metric's and the log's words.
const char* ReloadResultName(ModelReload::Result result);

class ModelReloader {
 public:
  // Reads the file of the model `current` serves as again; nullopt when its weights are
  // `current`'s (unchanged), else the new version, built and warm, or why it cannot be.
  using LoadFn =
      std::function<absl::StatusOr<std::optional<ServedModel>>(const ServedModel& current)>;
  // Called after a new version is swapped in, before the old one retires (the metrics' sources
  // move to the new version).
  using SwappedFn = std::function<void(const ServedModel& now, const ServedModel& before)>;
  using Done = absl::AnyInvocable<void(absl::StatusOr<std::vector<ModelReload>>)>;

  static constexpr size_t kMaxPending = 8;

  ModelReloader(ServedModels* models, LoadFn load, SwappedFn swapped, ServiceMetrics* metrics);
  ~ModelReloader();  // Stop()
  ModelReloader(const ModelReloader&) = delete;
  ModelReloader& operator=(const ModelReloader&) = delete;

  // `source` names who asked, for the log ("SIGHUP", "ReloadModels").
  void Request(std::vector<std::string> names, std::string source, Done done)
      ABSL_LOCKS_EXCLUDED(mu_);
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Pending {
    std::vector<std::string> names;  // empty: every served model
    std::string source;
    Done done;
  };
  void Loop() ABSL_LOCKS_EXCLUDED(mu_);
  bool HasWork() const ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stopping_ || !pending_.empty(); }
  ModelReload ReloadOne(const std::string& name);
  // Step 4 above.
  void Retire(ModelRef old) ABSL_LOCKS_EXCLUDED(mu_);

  ServedModels* const models_;
  const LoadFn load_;
  const SwappedFn swapped_;
  ServiceMetrics* const metrics_;

  mutable absl::Mutex mu_;
  std::deque<Pending> pending_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_MODEL_RELOADER_H_
