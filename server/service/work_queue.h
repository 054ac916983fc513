// WorkQueue: a fixed pool of threads with a bounded queue, for the CPU work of requests
// (decoding, cropping, aligning faces) so that it runs neither on gRPC's callback threads (which
// must stay free to move bytes) nor on the batch thread (which must only feed the model).
//
// Contract
// - Submit() never blocks: it queues the job or, when max_pending jobs already wait, returns
//   RESOURCE_EXHAUSTED at once (transient: retry after a back-off). After Shutdown() began it
//   returns UNAVAILABLE. On an error the job is destroyed without running.
// - Jobs run in submission order (FIFO start), on one of the pool's threads, exactly once each.
//   A job must not throw and should not block on other jobs of the same queue.
// - Shutdown() stops accepting, lets every queued job run, and joins the threads. Idempotent;
//   the destructor calls it. It must not be called from a job.
// - Thread-safe: Submit() and Shutdown() may be called from any thread.
#ifndef ARCFACE_SERVER_SERVICE_WORK_QUEUE_H_
#define ARCFACE_SERVER_SERVICE_WORK_QUEUE_H_

#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace arcface::service {

class WorkQueue {
 public:
  using Job = absl::AnyInvocable<void() &&>;

  // threads >= 1, max_pending >= 1; errors name the option.
  static absl::StatusOr<std::unique_ptr<WorkQueue>> Create(int threads, int max_pending);
  ~WorkQueue();
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  absl::Status Submit(Job job) ABSL_LOCKS_EXCLUDED(mu_);
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_, join_mu_);

  int pending() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  WorkQueue(int threads, int max_pending);
  void Loop() ABSL_LOCKS_EXCLUDED(mu_);

  const int max_pending_;
  mutable absl::Mutex mu_;
  std::deque<Job> jobs_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Mutex join_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(join_mu_);
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_WORK_QUEUE_H_
