#include "server/batching/dynamic_batcher.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"

namespace arcface::batching {
namespace {

// The batcher whose callbacks the current thread is running, if any. Shutdown() and RunOnce()
// consult it so that a callback calling them cannot wait for itself.
thread_local const DynamicBatcher* tls_in_callbacks_of = nullptr;

class ScopedCallbackThread {
 public:
  explicit ScopedCallbackThread(const DynamicBatcher* batcher) : saved_(tls_in_callbacks_of) {
    tls_in_callbacks_of = batcher;
  }
  ~ScopedCallbackThread() { tls_in_callbacks_of = saved_; }

 private:
  const DynamicBatcher* const saved_;
};

}  // namespace

struct DynamicBatcher::TaskState {
  std::shared_ptr<Task> task;
  int num_items = 0;
  absl::Time deadline;
  absl::Time enqueued;  // on the batcher's clock; the age of all its items
  // First item not yet taken into a batch. Written under mu_ by the batch-forming thread only,
  // so that thread may also read it without the lock.
  int next_item = 0;
  // The fields below are touched only by the one thread forming and running batches.
  int items_returned = 0;  // items that came back from the BatchFn
  absl::Status status;     // first error
};

struct DynamicBatcher::Outcome {
  enum class Kind { kSucceeded, kFailed, kExpired, kCancelled };
  std::shared_ptr<TaskState> state;
  Kind kind;
  int items_dropped;  // accepted items of this task that never reached the BatchFn
};

absl::StatusOr<std::unique_ptr<DynamicBatcher>> DynamicBatcher::Create(const Options& options,
                                                                        BatchFn batch_fn,
                                                                        Clock* clock) {
  if (options.max_batch_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch_size must be >= 1, got ", options.max_batch_size));
  }
  if (options.max_queue_size < options.max_batch_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_queue_size must be >= max_batch_size (", options.max_batch_size, "), got ",
        options.max_queue_size));
  }
  if (options.max_queue_delay < absl::ZeroDuration() ||
      options.max_queue_delay == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_queue_delay must be >= 0 and finite, got ",
                     absl::FormatDuration(options.max_queue_delay)));
  }
  if (!batch_fn) return absl::InvalidArgumentError("batch_fn must be set");
  if (clock == nullptr) clock = RealClock::Get();

  std::unique_ptr<DynamicBatcher> batcher(
      new DynamicBatcher(options, std::move(batch_fn), clock));
  if (options.start_batch_thread) {
    absl::MutexLock lock(&batcher->join_mu_);
    batcher->thread_ = std::thread([b = batcher.get()] { b->BatchThreadLoop(); });
  }
  return batcher;
}

DynamicBatcher::DynamicBatcher(const Options& options, BatchFn batch_fn, Clock* clock)
    : options_(options), clock_(clock), batch_fn_(std::move(batch_fn)) {}

DynamicBatcher::~DynamicBatcher() { Shutdown(); }

absl::Status DynamicBatcher::Schedule(std::shared_ptr<Task> task) {
  std::optional<RejectReason> reject;
  absl::Status status;
  const int n = task ? task->num_items : 0;
  {
    absl::MutexLock lock(&mu_);
    if (task == nullptr) {
      reject = RejectReason::kInvalid;
      status = absl::InvalidArgumentError("task is null");
    } else if (n <= 0) {
      reject = RejectReason::kInvalid;
      status = absl::InvalidArgumentError(absl::StrCat("task has ", n, " items; needs >= 1"));
    } else if (!task->done) {
      reject = RejectReason::kInvalid;
      status = absl::InvalidArgumentError("task has no done callback");
    } else if (stopping_) {
      reject = RejectReason::kShuttingDown;
      status = absl::UnavailableError("batcher is shutting down");
    } else if (n > options_.max_queue_size) {
      reject = RejectReason::kTooLarge;
      status = absl::ResourceExhaustedError(
          absl::StrCat("task of ", n, " items exceeds the queue limit of ",
                       options_.max_queue_size, " on its own; split it"));
    } else if (queued_items_ + n > options_.max_queue_size) {
      reject = RejectReason::kQueueFull;
      status = absl::ResourceExhaustedError(absl::StrCat("queue full: ", queued_items_, " + ", n,
                                                         " items over the limit of ",
                                                         options_.max_queue_size));
    }
    if (reject.has_value()) {
      switch (*reject) {
        case RejectReason::kQueueFull: ++counters_.rejected_queue_full; break;
        case RejectReason::kTooLarge: ++counters_.rejected_too_large; break;
        case RejectReason::kShuttingDown: ++counters_.rejected_shutting_down; break;
        case RejectReason::kInvalid: ++counters_.rejected_invalid; break;
      }
    } else {
      auto state = std::make_shared<TaskState>();
      state->num_items = n;
      state->deadline = task->deadline;
      state->enqueued = clock_->Now();
      state->task = std::move(task);
      const bool was_empty = queue_.empty();
      const bool was_below_full = queued_items_ < options_.max_batch_size;
      queue_.push_back(std::move(state));
      queued_items_ += n;
      ++counters_.tasks_accepted;
      counters_.items_accepted += n;
      // Only these two changes can make a batch due earlier than the batch thread already plans
      // (a new oldest item, or a full batch); waking it for anything else is wasted work.
      if (was_empty || (was_below_full && queued_items_ >= options_.max_batch_size)) {
        wake_pending_ = true;
        wake_.Signal();
      }
    }
  }
  if (reject.has_value() && options_.observer != nullptr) {
    options_.observer->OnRejected(*reject, n);
  }
  return status;
}

void DynamicBatcher::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_) {
      stopping_ = true;
      wake_pending_ = true;
      wake_.SignalAll();
    }
  }
  // From one of our own callbacks: the flush is already under way on this very thread.
  if (tls_in_callbacks_of == this) return;
  if (!options_.start_batch_thread) {
    absl::MutexLock step(&step_mu_);
    for (;;) {
      {
        absl::MutexLock lock(&mu_);
        if (queue_.empty()) break;
      }
      FormAndRunBatch();
    }
    return;
  }
  absl::MutexLock join(&join_mu_);
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<int> DynamicBatcher::RunOnce() {
  if (options_.start_batch_thread) {
    return absl::FailedPreconditionError("RunOnce() is for batchers without a batch thread");
  }
  if (tls_in_callbacks_of == this) {
    return absl::FailedPreconditionError("RunOnce() called from the batcher's own callback");
  }
  absl::MutexLock step(&step_mu_);
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (!BatchDueLocked()) return 0;
    }
    // 0 means everything taken was dropped; what is behind it may be due too.
    if (int size = FormAndRunBatch(); size > 0) return size;
  }
}

bool DynamicBatcher::WaitUntilIdle(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(absl::Condition(this, &DynamicBatcher::IdleLocked), timeout);
}

int DynamicBatcher::queue_depth() const {
  absl::MutexLock lock(&mu_);
  return queued_items_;
}

BatcherCounters DynamicBatcher::counters() const {
  absl::MutexLock lock(&mu_);
  return counters_;
}

bool DynamicBatcher::BatchDueLocked() {
  if (queue_.empty()) return false;
  if (stopping_ || queued_items_ >= options_.max_batch_size) return true;
  return clock_->Now() >= queue_.front()->enqueued + options_.max_queue_delay;
}

bool DynamicBatcher::IdleLocked() {
  if (!options_.start_batch_thread || thread_exited_) return true;
  // Evaluated by absl whenever mu_ is released; the clock may have moved past the thread's
  // wake-up time without anyone touching mu_, which is why the time is part of the test.
  return thread_waiting_ && !wake_pending_ && clock_->Now() < thread_wait_deadline_;
}

void DynamicBatcher::BatchThreadLoop() {
  ScopedCallbackThread mark(this);
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      while (!BatchDueLocked()) {
        if (stopping_ && queue_.empty()) {
          thread_exited_ = true;
          return;
        }
        thread_wait_deadline_ = queue_.empty()
                                    ? absl::InfiniteFuture()
                                    : queue_.front()->enqueued + options_.max_queue_delay;
        thread_waiting_ = true;
        wake_pending_ = false;
        clock_->WaitUntil(mu_, wake_, thread_wait_deadline_);
        thread_waiting_ = false;
      }
    }
    FormAndRunBatch();
  }
}

void DynamicBatcher::RemoveQueuedRestLocked(TaskState& state) {
  const int rest = state.num_items - state.next_item;
  if (rest == 0) return;
  // A task with items left but some already taken can only be at the front (batches take from
  // the front); search anyway rather than trust that silently.
  auto it = std::find_if(queue_.begin(), queue_.end(),
                         [&state](const std::shared_ptr<TaskState>& s) { return s.get() == &state; });
  if (it != queue_.end()) queue_.erase(it);
  queued_items_ -= rest;
  state.next_item = state.num_items;
}

int DynamicBatcher::FormAndRunBatch() {
  ScopedCallbackThread mark(this);
  const absl::Time now = clock_->Now();
  const int max_size = options_.max_batch_size;

  Batch batch;
  std::vector<std::shared_ptr<TaskState>> states;  // parallel to batch.slices
  std::vector<Outcome> outcomes;

  struct Taken {
    std::shared_ptr<TaskState> state;
    int first;
    int count;
  };
  std::vector<Taken> taken;
  // Take, then check outside the lock (is_cancelled is the caller's code); dropped tasks leave
  // room, so take again until the batch is full or the queue is empty.
  while (batch.size < max_size) {
    taken.clear();
    {
      absl::MutexLock lock(&mu_);
      int room = max_size - batch.size;
      while (room > 0 && !queue_.empty()) {
        const std::shared_ptr<TaskState>& front = queue_.front();
        const int count = std::min(room, front->num_items - front->next_item);
        taken.push_back({front, front->next_item, count});
        front->next_item += count;
        queued_items_ -= count;
        room -= count;
        if (front->next_item == front->num_items) queue_.pop_front();
      }
    }
    if (taken.empty()) break;
    for (Taken& t : taken) {
      if (!states.empty() && states.back() == t.state) {
        // The rest of the previous slice's task, taken once a drop made room: already checked.
        batch.slices.back().num_items += t.count;
        batch.size += t.count;
        continue;
      }
      TaskState& s = *t.state;
      std::optional<Outcome::Kind> drop;
      if (now >= s.deadline) {
        drop = Outcome::Kind::kExpired;
        s.status = absl::DeadlineExceededError(
            absl::StrCat("deadline passed after ", t.first, " of ", s.num_items,
                         " items ran"));
      } else if (s.task->is_cancelled && s.task->is_cancelled()) {
        drop = Outcome::Kind::kCancelled;
        s.status = absl::CancelledError(absl::StrCat("cancelled after ", t.first, " of ",
                                                     s.num_items, " items ran"));
      }
      if (drop.has_value()) {
        {
          absl::MutexLock lock(&mu_);
          RemoveQueuedRestLocked(s);
        }
        outcomes.push_back({t.state, *drop, s.num_items - t.first});
        continue;
      }
      batch.slices.push_back({s.task.get(), t.first, t.count, absl::OkStatus()});
      states.push_back(t.state);
      batch.size += t.count;
    }
  }
  // Dropped tasks learn their fate now, not after a model run they take no part in.
  Finish(outcomes);
  outcomes.clear();
  if (batch.size == 0) return 0;

  std::vector<absl::Duration> waits;
  waits.reserve(batch.size);
  std::vector<int> counts;
  counts.reserve(states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    counts.push_back(batch.slices[i].num_items);
    waits.insert(waits.end(), batch.slices[i].num_items, now - states[i]->enqueued);
  }
  const int size = batch.size;

  const absl::Time start = clock_->Now();
  const absl::Status status = batch_fn_(batch);
  const absl::Duration run_time = clock_->Now() - start;

  {
    absl::MutexLock lock(&mu_);
    ++counters_.batches;
    if (!status.ok()) ++counters_.batches_failed;
    counters_.items_batched += size;
  }
  if (options_.observer != nullptr) {
    BatchInfo info;
    info.size = size;
    info.num_tasks = static_cast<int>(states.size());
    info.queue_waits = waits;
    info.run_time = run_time;
    info.status = status;
    options_.observer->OnBatch(info);
  }

  for (size_t i = 0; i < states.size(); ++i) {
    TaskState& s = *states[i];
    absl::Status item_status = status;
    if (item_status.ok() && i < batch.slices.size()) item_status = batch.slices[i].status;
    s.items_returned += counts[i];
    if (!item_status.ok() && s.status.ok()) s.status = item_status;
    if (!s.status.ok()) {
      // Nothing of this task is in flight any more (one batch at a time): end it now.
      int dropped;
      {
        absl::MutexLock lock(&mu_);
        dropped = s.num_items - s.next_item;
        RemoveQueuedRestLocked(s);
      }
      outcomes.push_back({states[i], Outcome::Kind::kFailed, dropped});
    } else if (s.items_returned == s.num_items) {
      outcomes.push_back({states[i], Outcome::Kind::kSucceeded, 0});
    }
  }
  Finish(outcomes);
  return size;
}

void DynamicBatcher::Finish(std::vector<Outcome>& outcomes) {
  if (outcomes.empty()) return;
  {
    absl::MutexLock lock(&mu_);
    for (const Outcome& o : outcomes) {
      counters_.items_dropped += o.items_dropped;
      switch (o.kind) {
        case Outcome::Kind::kSucceeded: ++counters_.tasks_succeeded; break;
        case Outcome::Kind::kFailed: ++counters_.tasks_failed; break;
        case Outcome::Kind::kExpired: ++counters_.tasks_expired; break;
        case Outcome::Kind::kCancelled: ++counters_.tasks_cancelled; break;
      }
    }
  }
  for (Outcome& o : outcomes) {
    TaskState& s = *o.state;
    if (options_.observer != nullptr) {
      if (o.kind == Outcome::Kind::kExpired) {
        options_.observer->OnDropped(DropReason::kExpired, o.items_dropped);
      } else if (o.kind == Outcome::Kind::kCancelled) {
        options_.observer->OnDropped(DropReason::kCancelled, o.items_dropped);
      }
    }
    // Moved out and destroyed here so that a callback holding its own task is released.
    absl::AnyInvocable<void(absl::Status)> done = std::move(s.task->done);
    s.task->done = nullptr;
    // Empty only if the same Task object was scheduled twice (a caller bug): finish the first.
    if (done) done(std::move(s.status));
    done = nullptr;
    s.task.reset();
  }
  outcomes.clear();
}

}  // namespace arcface::batching
