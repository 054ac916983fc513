// Admission: which calls the service accepts, and the drain. Calls are refused UNAVAILABLE
// before SetReady() and after BeginDrain(); an accepted call is counted until Release(). Open
// EmbedStream streams register here so that a drain can end them.
//
// Contract
// - Ownership: the models passed to SetReady() are kept as ServedModels (served_models.h: a call
//   holds the version it found until it has handed its crops over).
//   Registered streams are borrowed from Register() until Unregister() (their OnDone).
// - Blocking: WaitForIdle() and WaitForQuiet() block up to their deadline; everything else takes
//   a short mutex only. BeginDrain() calls each open stream's Pin() under that mutex (the lock
//   order is admission, then stream) and its DrainAndUnpin() after releasing it.
// - Errors: Admit() returns UNAVAILABLE naming why (loading, draining).
// - Thread safety: every method may be called from any thread. models() is set by SetReady()
//   before any call is admitted; a reload swaps versions in it (ServedModels::Replace()).
#ifndef ARCFACE_SERVER_SERVICE_ADMISSION_H_
#define ARCFACE_SERVER_SERVICE_ADMISSION_H_

#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/service/embedding_model.h"
#include "server/service/served_models.h"
#include "server/service/service_metrics.h"

namespace arcface::service {

class Admission {
 public:
  // What the drain needs of an open stream (EmbedStream's reactor).
  class Stream {
   public:
    // Keeps the stream alive until DrainAndUnpin(); false if it is finishing.
    virtual bool Pin() = 0;
    // Ends the stream once it has answered the messages it read.
    virtual void DrainAndUnpin() = 0;

   protected:
    ~Stream() = default;
  };

  // `metrics` is borrowed.
  explicit Admission(ServiceMetrics* metrics) : metrics_(metrics) {}

  // The models are loaded and warm: calls are admitted from now on.
  void SetReady(std::vector<ServedModel> models) ABSL_LOCKS_EXCLUDED(mu_);
  // New calls get UNAVAILABLE; open streams finish once their read messages are answered.
  void BeginDrain() ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks until no accepted call is unfinished or until `deadline`; true when idle.
  bool WaitForIdle(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks until no call has arrived (refused ones count) or finished for `quiet`, or until
  // `deadline` (see FaceEmbeddingService::WaitForQuiet).
  void WaitForQuiet(absl::Duration quiet, absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  int inflight() const ABSL_LOCKS_EXCLUDED(mu_);

  // Counts an accepted call, or says why it is refused.
  absl::Status Admit() ABSL_LOCKS_EXCLUDED(mu_);
  void Release() ABSL_LOCKS_EXCLUDED(mu_);
  // An admitted stream joins the drain. True when a drain began after its Admit(): the stream
  // is then pinned, and the caller must DrainAndUnpin() it once it has started.
  bool Register(Stream* stream) ABSL_LOCKS_EXCLUDED(mu_);
  // A stream's OnDone: forget it and release its call.
  void Unregister(Stream* stream) ABSL_LOCKS_EXCLUDED(mu_);

  const ServedModels& models() const { return models_; }
  ServedModels& models() { return models_; }

 private:
  ServiceMetrics* const metrics_;

  mutable absl::Mutex mu_;
  absl::CondVar idle_;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  int inflight_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time last_arrival_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::flat_hash_set<Stream*> streams_ ABSL_GUARDED_BY(mu_);
  // Set by SetReady() before ready_ becomes true; versions swapped by reloads.
  ServedModels models_;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_ADMISSION_H_
