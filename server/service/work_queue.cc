#include "server/service/work_queue.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace arcface::service {

absl::StatusOr<std::unique_ptr<WorkQueue>> WorkQueue::Create(int threads, int max_pending) {
  if (threads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("work queue threads must be >= 1, got ", threads));
  }
  if (max_pending < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("work queue max_pending must be >= 1, got ", max_pending));
  }
  return std::unique_ptr<WorkQueue>(new WorkQueue(threads, max_pending));
}

WorkQueue::WorkQueue(int threads, int max_pending) : max_pending_(max_pending) {
  absl::MutexLock lock(&join_mu_);
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Loop(); });
}

WorkQueue::~WorkQueue() { Shutdown(); }

absl::Status WorkQueue::Submit(Job job) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (static_cast<int>(jobs_.size()) >= max_pending_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "preprocessing queue full (", max_pending_, " requests waiting); retry later"));
  }
  jobs_.push_back(std::move(job));
  return absl::OkStatus();
}

int WorkQueue::pending() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(jobs_.size());
}

void WorkQueue::Loop() {
  while (true) {
    Job job;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !jobs_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (jobs_.empty()) return;  // stopping and drained
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    std::move(job)();
  }
}

void WorkQueue::Shutdown() {
  absl::MutexLock join_lock(&join_mu_);
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

}  // namespace arcface::service
