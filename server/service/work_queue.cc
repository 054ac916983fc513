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

absl::Status WorkQueue::Submit(Job job) { return Enqueue(std::move(job), /*admitted=*/true); }

absl::Status WorkQueue::Continue(Job job) { return Enqueue(std::move(job), /*admitted=*/false); }

absl::Status WorkQueue::Enqueue(Job job, bool admitted) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (admitted) {
    if (admitted_ >= max_pending_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("preprocessing pool full (", max_pending_,
                       " calls admitted, --preprocess-queue); retry later"));
    }
    ++admitted_;
  }
  ++unfinished_;
  queue_.push_back(Entry{std::move(job), admitted});
  return absl::OkStatus();
}

int WorkQueue::pending() const {
  absl::MutexLock lock(&mu_);
  return admitted_;
}

void WorkQueue::Loop() {
  while (true) {
    Entry entry;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !queue_.empty() || (stopping_ && unfinished_ == 0);
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stopping, and no job left to step
      entry = std::move(queue_.front());
      queue_.pop_front();
    }
    const bool more = entry.job();
    {
      absl::MutexLock lock(&mu_);
      if (more) {
        queue_.push_back(std::move(entry));
        continue;
      }
      --unfinished_;
      if (entry.admitted) --admitted_;
    }
    entry.job = nullptr;  // destroyed here, with no lock held
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
