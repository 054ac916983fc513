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

absl::Status WorkQueue::Submit(Job job, int64_t cost) {
  return Enqueue(std::move(job), cost, /*may_refuse=*/true);
}

absl::Status WorkQueue::Continue(Job job, int64_t cost) {
  return Enqueue(std::move(job), cost, /*may_refuse=*/false);
}

absl::Status WorkQueue::Enqueue(Job job, int64_t cost, bool may_refuse) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (may_refuse && unfinished_ > 0 && unfinished_cost_ + cost > max_pending_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "preprocessing pool full (", unfinished_cost_, " of ", max_pending_,
        " face crops admitted, this call needs ", cost, "; --preprocess-queue); retry later"));
  }
  ++unfinished_;
  unfinished_cost_ += cost;
  queue_.push_back(Entry{std::move(job), cost});
  return absl::OkStatus();
}

int WorkQueue::pending() const {
  absl::MutexLock lock(&mu_);
  return unfinished_;
}

int64_t WorkQueue::pending_cost() const {
  absl::MutexLock lock(&mu_);
  return unfinished_cost_;
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
      unfinished_cost_ -= entry.cost;
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
