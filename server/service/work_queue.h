// WorkQueue: a fixed pool of threads with a bounded admission, for the CPU work of requests
// (decoding, cropping, aligning faces; large Compare matrices) so that it runs neither on gRPC's
// callback threads (which must stay free to move bytes) nor on the batch thread (which must only
// feed the model).
//
// Contract
// - A job runs in steps. Each call of the job does one bounded slice of its work (a face, a block
//   of matrix rows) and returns true to be called again, false when it is finished. After a step
//   that returns true the job goes to the back of the queue: the steps of all queued jobs take
//   turns (round-robin, whatever their size), so one call with many slow images cannot hold the
//   pool while a small call waits. A new job waits at most for one step of each job queued
//   before it (spread over the threads).
// - Admission is weighted: each job states its cost, the memory it may come to hold in units the
//   caller picks (the service: one 112×112 crop, 37,632 bytes, per face or per that many bytes of
//   a Compare matrix), and max_pending bounds the sum over unfinished jobs (queued, running or
//   between steps), so what the pool holds is bounded whatever the order its steps take.
// - Submit() never blocks. It admits the job when its cost fits in what is left of max_pending,
//   or when no admitted job is unfinished (so one job larger than the whole bound runs alone);
//   otherwise it returns RESOURCE_EXHAUSTED at once (transient: retry after a back-off). An
//   admitted job keeps its room until its last step returns: its later steps are never refused.
//   After Shutdown() began it returns UNAVAILABLE.
// - Continue() queues a job for a later stage of a call that Submit() already admitted once (the
//   Compare matrix after the model): never refused for room (the caller bounds how many it hands
//   in), but its cost counts while it runs, so new calls wait for it; UNAVAILABLE after
//   Shutdown() began.
// - On an error the job is destroyed without running. A job is destroyed after its last step,
//   on a pool thread, with no lock held. Jobs must not throw and should not block on other jobs.
// - Shutdown() stops accepting, lets every queued job run to its end, and joins the threads.
//   Idempotent; the destructor calls it. It must not be called from a job.
// - Thread-safe: every method may be called from any thread.
#ifndef ARCFACE_SERVER_SERVICE_WORK_QUEUE_H_
#define ARCFACE_SERVER_SERVICE_WORK_QUEUE_H_

#include <cstdint>
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
  // One step; true: call again later.
  using Job = absl::AnyInvocable<bool()>;

  // `threads`: pool threads, >= 1. `max_pending`: the bound on the summed cost of unfinished
  // jobs (see "Admission is weighted" above), >= 1. No defaults: the server derives both from
  // --preprocess-threads and --preprocess-queue. Errors name the option.
  static absl::StatusOr<std::unique_ptr<WorkQueue>> Create(int threads, int max_pending);
  ~WorkQueue();
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // cost >= 1.
  absl::Status Submit(Job job, int64_t cost) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Continue(Job job, int64_t cost) ABSL_LOCKS_EXCLUDED(mu_);
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_, join_mu_);

  // Jobs unfinished, and the sum of their costs.
  int pending() const ABSL_LOCKS_EXCLUDED(mu_);
  int64_t pending_cost() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    Job job;
    int64_t cost = 0;
  };

  WorkQueue(int threads, int max_pending);
  absl::Status Enqueue(Job job, int64_t cost, bool may_refuse) ABSL_LOCKS_EXCLUDED(mu_);
  void Loop() ABSL_LOCKS_EXCLUDED(mu_);

  const int64_t max_pending_;
  mutable absl::Mutex mu_;
  std::deque<Entry> queue_ ABSL_GUARDED_BY(mu_);
  int unfinished_ ABSL_GUARDED_BY(mu_) = 0;  // jobs queued, running or between steps
  int64_t unfinished_cost_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Mutex join_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(join_mu_);
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_WORK_QUEUE_H_
