#include "server/batching/dynamic_batcher.h"

#include <algorithm>
#include <optional>
#include <string>
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

struct DynamicBatcher::Outcome {
  enum class Kind { kSucceeded, kFailed, kExpired, kCancelled };
  std::shared_ptr<TaskState> state;
  Kind kind;
  int items_dropped;  // accepted items of this task that never reached the BatchFn
};

struct DynamicBatcher::TaskState {
  std::shared_ptr<Task> task;
  int num_items = 0;
  absl::Time deadline;
  absl::Time enqueued;  // on the batcher's clock; the age of all its items
  // First item not yet taken out of the queue (into the open batch). Written under mu_ by the
  // forming thread only, so that thread may also read it without the lock.
  int next_item = 0;
  // The fields below are touched only by the forming thread.
  int items_sent = 0;      // items handed to the model
  int items_returned = 0;  // of those, items that came back from the BatchFn
  absl::Status status;     // first error
  // Set once the task's fate is sealed (dropped or failed; its rest left the queue). With
  // several batches in flight it may still have items in the model: `done` waits for them.
  std::optional<Outcome::Kind> ended;
  // Its entry in deadlines_ while it waits with a finite deadline. Under mu_.
  std::optional<std::multimap<absl::Time, std::shared_ptr<TaskState>>::iterator> deadline_entry;

  // Seals the end of a task found expired or cancelled while some of its items wait.
  void Drop(Outcome::Kind kind) {
    ended = kind;
    const std::string ran = absl::StrCat(" after ", items_sent, " of ", num_items, " items ran");
    status = kind == Outcome::Kind::kExpired
                 ? absl::DeadlineExceededError(absl::StrCat("deadline passed", ran))
                 : absl::CancelledError(absl::StrCat("cancelled", ran));
  }
};

// A batch and the batcher's notes on it. Owned by one thread at a time: the forming thread
// while open, a model thread from the hand-over until it puts it in ran_.
struct DynamicBatcher::Slot {
  Batch batch;
  std::vector<std::shared_ptr<TaskState>> states;  // parallel to batch.slices
  std::vector<char> checked;  // parallel: the task passed the expiry/cancel check
  int staged = 0;             // items [0, staged) were staged at their current positions
  int staged_ahead = 0;       // of those, staged while the model ran the previous batch
  absl::Duration stage_time;
  std::vector<absl::Duration> waits;
  std::optional<absl::Duration> model_idle;
  absl::Status status;
  absl::Duration run_time;
  absl::Time run_end;

  void Clear() {
    batch.slices.clear();
    batch.size = 0;
    states.clear();
    checked.clear();
    staged = 0;
    staged_ahead = 0;
    stage_time = absl::ZeroDuration();
    waits.clear();
    model_idle.reset();
    status = absl::OkStatus();
    run_time = absl::ZeroDuration();
  }
};

absl::StatusOr<std::unique_ptr<DynamicBatcher>> DynamicBatcher::Create(const Options& options,
                                                                        BatchFn batch_fn,
                                                                        Clock* clock,
                                                                        StageFn stage_fn) {
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
  if (options.max_batches_in_flight < 1 ||
      options.max_batches_in_flight > kMaxBatchesInFlight) {
    return absl::InvalidArgumentError(absl::StrCat("max_batches_in_flight must be in 1..",
                                                   kMaxBatchesInFlight, ", got ",
                                                   options.max_batches_in_flight));
  }
  if (options.cancel_poll_interval < absl::ZeroDuration() ||
      options.cancel_poll_interval == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cancel_poll_interval must be >= 0 and finite, got ",
                     absl::FormatDuration(options.cancel_poll_interval)));
  }
  if (!batch_fn) return absl::InvalidArgumentError("batch_fn must be set");
  if (clock == nullptr) clock = RealClock::Get();

  std::unique_ptr<DynamicBatcher> batcher(
      new DynamicBatcher(options, std::move(batch_fn), std::move(stage_fn), clock));
  if (options.start_batch_thread) {
    DynamicBatcher* b = batcher.get();
    absl::MutexLock lock(&b->join_mu_);  // through `b`, so the analysis sees the same mutex
    b->threads_.emplace_back([b] { b->BatchThreadLoop(); });
    for (int i = 0; i < options.max_batches_in_flight; ++i) {
      b->threads_.emplace_back([b] { b->ModelThreadLoop(); });
    }
  }
  return batcher;
}

DynamicBatcher::DynamicBatcher(const Options& options, BatchFn batch_fn, StageFn stage_fn,
                               Clock* clock)
    : options_(options),
      clock_(clock),
      batch_fn_(std::move(batch_fn)),
      stage_fn_(std::move(stage_fn)),
      open_(std::make_unique<Slot>()),
      next_poll_(clock->Now() + options.cancel_poll_interval) {}

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
      // Only these changes give the batch thread something to do earlier than it plans: a new
      // oldest item, a full batch, items to stage while the model is busy, or an earlier
      // deadline to end.
      const bool earlier_deadline = thread_waiting_ && state->deadline < thread_wait_deadline_;
      if (state->deadline != absl::InfiniteFuture()) {
        state->deadline_entry = deadlines_.emplace(state->deadline, state);
      }
      const bool was_empty = queued_items_ == 0;
      const bool was_below_full = queued_items_ < options_.max_batch_size;
      queue_.push_back(std::move(state));
      queued_items_ += n;
      ++counters_.tasks_accepted;
      counters_.items_accepted += n;
      if (was_empty || (was_below_full && queued_items_ >= options_.max_batch_size) ||
          (models_busy_ > 0 && open_items_ < options_.max_batch_size) || earlier_deadline) {
        wake_pending_ = true;
        wake_.Signal();
      }
    }
  }
  if (reject.has_value()) {
    // Destroyed now, not with the task: a `done` that holds the task's own shared_ptr (or the
    // caller's call state) would otherwise keep all of it alive forever.
    if (task != nullptr) {
      absl::AnyInvocable<void(absl::Status)> rejected = std::move(task->done);
      task->done = nullptr;
    }
    if (options_.observer != nullptr) options_.observer->OnRejected(*reject, n);
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
  // From one of our own callbacks: the flush is already under way on the batcher's threads.
  if (tls_in_callbacks_of == this) return;
  if (!options_.start_batch_thread) {
    absl::MutexLock step(&step_mu_);
    for (;;) {
      {
        absl::MutexLock lock(&mu_);
        if (queued_items_ == 0) break;
      }
      FormAndRunInline();
    }
    return;
  }
  absl::MutexLock join(&join_mu_);
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
}

absl::StatusOr<int> DynamicBatcher::RunOnce() {
  if (options_.start_batch_thread) {
    return absl::FailedPreconditionError("RunOnce() is for batchers without a batch thread");
  }
  if (tls_in_callbacks_of == this) {
    return absl::FailedPreconditionError("RunOnce() called from the batcher's own callback");
  }
  absl::MutexLock step(&step_mu_);
  {
    ScopedCallbackThread mark(this);
    std::vector<Outcome> drops;
    Sweep(&drops);
    Finish(drops);
  }
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (!BatchDueLocked()) return 0;
    }
    // 0 means everything taken was dropped; what is behind it may be due too.
    if (int size = FormAndRunInline(); size > 0) return size;
  }
}

bool DynamicBatcher::WaitUntilIdle(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(absl::Condition(this, &DynamicBatcher::IdleLocked), timeout);
}

bool DynamicBatcher::WaitUntilBatchThreadIdle(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(absl::Condition(this, &DynamicBatcher::BatchThreadIdleLocked),
                              timeout);
}

int DynamicBatcher::queue_depth() const {
  absl::MutexLock lock(&mu_);
  return queued_items_;
}

BatcherCounters DynamicBatcher::counters() const {
  absl::MutexLock lock(&mu_);
  return counters_;
}

absl::Time DynamicBatcher::OldestLocked() {
  return open_items_ > 0 ? open_oldest_ : queue_.front()->enqueued;
}

bool DynamicBatcher::BatchDueLocked() {
  if (queued_items_ == 0) return false;
  if (stopping_ || queued_items_ >= options_.max_batch_size) return true;
  return clock_->Now() >= OldestLocked() + options_.max_queue_delay;
}

absl::Time DynamicBatcher::NextSweepLocked() {
  absl::Time next = deadlines_.empty() ? absl::InfiniteFuture() : deadlines_.begin()->first;
  if (options_.cancel_poll_interval > absl::ZeroDuration() && queued_items_ > 0) {
    next = std::min(next, next_poll_);
  }
  return next;
}

bool DynamicBatcher::BatchThreadIdleLocked() {
  if (!options_.start_batch_thread || thread_exited_) return true;
  // Evaluated by absl whenever mu_ is released; the clock may have moved past the thread's
  // wake-up time without anyone touching mu_, which is why the time is part of the test.
  return thread_waiting_ && !wake_pending_ && clock_->Now() < thread_wait_deadline_;
}

bool DynamicBatcher::IdleLocked() {
  if (!options_.start_batch_thread || thread_exited_) return true;
  return models_busy_ == 0 && BatchThreadIdleLocked();
}

void DynamicBatcher::BatchThreadLoop() {
  ScopedCallbackThread mark(this);
  for (;;) {
    std::unique_ptr<Slot> ran;
    bool due = false;
    bool sweep = false;
    bool stage = false;
    {
      absl::MutexLock lock(&mu_);
      for (;;) {
        const bool model_free = models_busy_ < options_.max_batches_in_flight;
        if (!ran_.empty()) {
          ran = std::move(ran_.front());
          ran_.pop_front();
          --models_busy_;
          break;
        }
        if (model_free && BatchDueLocked()) {
          due = true;
          break;
        }
        if (clock_->Now() >= NextSweepLocked()) {
          sweep = true;
          break;
        }
        // Items to take while the model is busy, or to stage again after a sweep moved them up.
        if (models_busy_ > 0 &&
            ((!queue_.empty() && open_items_ < options_.max_batch_size) ||
             open_->staged < open_items_)) {
          stage = true;
          break;
        }
        if (stopping_ && queued_items_ == 0 && models_busy_ == 0) {
          model_thread_stop_ = true;
          thread_exited_ = true;
          return;
        }
        // While every model thread is busy only a sweep becomes due by time; the first model
        // thread to finish wakes us.
        thread_wait_deadline_ = NextSweepLocked();
        if (model_free && queued_items_ > 0) {
          thread_wait_deadline_ =
              std::min(thread_wait_deadline_, OldestLocked() + options_.max_queue_delay);
        }
        thread_waiting_ = true;
        wake_pending_ = false;
        clock_->WaitUntil(mu_, wake_, thread_wait_deadline_);
        thread_waiting_ = false;
      }
    }
    std::vector<Outcome> outcomes;
    if (ran != nullptr) {
      Complete(*ran, &outcomes);
      absl::MutexLock lock(&mu_);
      due = BatchDueLocked();  // the model thread that ran it is free now
    }
    std::vector<Outcome> drops;
    if (sweep) Sweep(&drops);
    if (due) {
      FormOpen(&drops);
      if (open_->batch.size > 0) {
        std::unique_ptr<Slot> next = HandOver();
        absl::MutexLock lock(&mu_);
        to_run_.push_back(std::move(next));
        ++models_busy_;
      }
    }
    // The model has its next batch (if there was one); now the slower work around it.
    Finish(drops);
    if (ran != nullptr) {
      Report(*ran, outcomes);
      Recycle(std::move(ran));
    }
    if (stage) {
      {
        absl::MutexLock lock(&mu_);
        TakeLocked();
      }
      StageOpen(/*ahead=*/true);
    }
  }
}

void DynamicBatcher::ModelThreadLoop() {
  ScopedCallbackThread mark(this);
  for (;;) {
    std::unique_ptr<Slot> slot;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !to_run_.empty() || model_thread_stop_;
      };
      mu_.Await(absl::Condition(&ready));
      if (to_run_.empty()) return;
      slot = std::move(to_run_.front());
      to_run_.pop_front();
    }
    RunModel(*slot);
    absl::MutexLock lock(&mu_);
    ran_.push_back(std::move(slot));
    wake_pending_ = true;
    wake_.Signal();
  }
}

void DynamicBatcher::TakeLocked() {
  Slot& open = *open_;
  int room = options_.max_batch_size - open.batch.size;
  while (room > 0 && !queue_.empty()) {
    const std::shared_ptr<TaskState>& front = queue_.front();
    const int first = front->next_item;
    const int count = std::min(room, front->num_items - first);
    if (open.batch.size == 0) open_oldest_ = front->enqueued;
    if (!open.states.empty() && open.states.back() == front) {
      // The rest of the last slice's task, taken once a drop made room.
      open.batch.slices.back().num_items += count;
    } else {
      open.batch.slices.push_back({front->task.get(), first, count, absl::OkStatus()});
      open.states.push_back(front);
      open.checked.push_back(0);
    }
    open.batch.size += count;
    front->next_item += count;
    room -= count;
    if (front->next_item == front->num_items) queue_.pop_front();
  }
  open_items_ = open.batch.size;
}

void DynamicBatcher::StageOpen(bool ahead) {
  Slot& open = *open_;
  if (open.staged < open.batch.size && stage_fn_) {
    const absl::Time start = clock_->Now();
    stage_fn_(open.batch, open.staged);
    open.stage_time += clock_->Now() - start;
  }
  open.staged = open.batch.size;
  if (ahead) open.staged_ahead = open.staged;
}

void DynamicBatcher::Sweep(std::vector<Outcome>* drops) {
  const absl::Time now = clock_->Now();
  std::vector<std::shared_ptr<TaskState>> ending;
  std::vector<std::shared_ptr<TaskState>> to_poll;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = deadlines_.begin(); it != deadlines_.end() && it->first <= now; ++it) {
      ending.push_back(it->second);
    }
    if (options_.cancel_poll_interval > absl::ZeroDuration() && queued_items_ > 0 &&
        now >= next_poll_) {
      next_poll_ = now + options_.cancel_poll_interval;
      auto add = [&](const std::shared_ptr<TaskState>& s) {
        if (s->task->is_cancelled && now < s->deadline) to_poll.push_back(s);
      };
      for (const std::shared_ptr<TaskState>& s : open_->states) add(s);
      for (const std::shared_ptr<TaskState>& s : queue_) {
        // The task whose first items are in the open batch and the rest still queued: once.
        if (open_->states.empty() || open_->states.back() != s) add(s);
      }
    }
  }
  for (const std::shared_ptr<TaskState>& s : ending) s->Drop(Outcome::Kind::kExpired);
  // Outside mu_: is_cancelled is the caller's code.
  for (const std::shared_ptr<TaskState>& s : to_poll) {
    if (!s->task->is_cancelled()) continue;
    s->Drop(Outcome::Kind::kCancelled);
    ending.push_back(s);
  }
  if (ending.empty()) return;
  {
    absl::MutexLock lock(&mu_);
    for (const std::shared_ptr<TaskState>& s : ending) RemoveWaitingLocked(*s);
  }
  for (const std::shared_ptr<TaskState>& s : ending) EndIfIdle(s, drops);
}

void DynamicBatcher::RemoveWaitingLocked(TaskState& state) {
  RemoveFromOpenLocked(&state);
  RemoveQueuedRestLocked(state);
  ForgetDeadlineLocked(state);
}

void DynamicBatcher::ForgetDeadlineLocked(TaskState& state) {
  if (!state.deadline_entry.has_value()) return;
  deadlines_.erase(*state.deadline_entry);
  state.deadline_entry.reset();
}

void DynamicBatcher::RemoveFromOpenLocked(const TaskState* state) {
  Slot& open = *open_;
  int position = 0;
  for (size_t i = 0; i < open.states.size(); ++i) {
    const int count = open.batch.slices[i].num_items;
    if (open.states[i].get() != state) {
      position += count;
      continue;
    }
    open.batch.slices.erase(open.batch.slices.begin() + i);
    open.states.erase(open.states.begin() + i);
    open.checked.erase(open.checked.begin() + i);
    open.batch.size -= count;
    // Items behind the removed slice moved up: they must be staged again.
    open.staged = std::min(open.staged, position);
    open.staged_ahead = std::min(open.staged_ahead, position);
    queued_items_ -= count;
    open_items_ = open.batch.size;
    if (open.batch.size > 0) open_oldest_ = open.states.front()->enqueued;
    return;
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

void DynamicBatcher::FormOpen(std::vector<Outcome>* drops) {
  Slot& open = *open_;
  // Take, then check outside the lock (is_cancelled is the caller's code); dropped tasks leave
  // room, so take again until nothing more is dropped.
  for (;;) {
    absl::Time now;
    {
      absl::MutexLock lock(&mu_);
      TakeLocked();
      // Read after taking: a task scheduled already expired, while this batch was forming,
      // must not pass the check on a time from before its Schedule().
      now = clock_->Now();
    }
    std::vector<std::shared_ptr<TaskState>> dropped;
    for (size_t i = 0; i < open.states.size(); ++i) {
      if (open.checked[i]) continue;
      open.checked[i] = 1;
      TaskState& s = *open.states[i];
      // Items of this task still in the model (several batches in flight) count as run: they
      // cannot be called back, and `done` waits for them (EndIfIdle).
      if (now >= s.deadline) {
        s.Drop(Outcome::Kind::kExpired);
      } else if (s.task->is_cancelled && s.task->is_cancelled()) {
        s.Drop(Outcome::Kind::kCancelled);
      }
      if (s.ended.has_value()) dropped.push_back(open.states[i]);
    }
    if (dropped.empty()) break;
    {
      absl::MutexLock lock(&mu_);
      for (const std::shared_ptr<TaskState>& s : dropped) RemoveWaitingLocked(*s);
    }
    for (const std::shared_ptr<TaskState>& s : dropped) EndIfIdle(s, drops);
  }
  StageOpen(/*ahead=*/false);
}

std::unique_ptr<DynamicBatcher::Slot> DynamicBatcher::HandOver() {
  std::unique_ptr<Slot> slot = std::move(open_);
  if (spare_.empty()) {
    open_ = std::make_unique<Slot>();
  } else {
    open_ = std::move(spare_.back());
    spare_.pop_back();
  }
  open_->Clear();
  const absl::Time now = clock_->Now();
  slot->waits.clear();
  slot->waits.reserve(slot->batch.size);
  for (size_t i = 0; i < slot->states.size(); ++i) {
    slot->waits.insert(slot->waits.end(), slot->batch.slices[i].num_items,
                       now - slot->states[i]->enqueued);
    slot->states[i]->items_sent += slot->batch.slices[i].num_items;
  }
  absl::MutexLock lock(&mu_);
  // A task whose last items leave for the model no longer waits: no deadline to watch.
  for (const std::shared_ptr<TaskState>& s : slot->states) {
    if (s->items_sent == s->num_items) ForgetDeadlineLocked(*s);
  }
  // With several batches in flight the model is idle only while none is in it.
  if (last_model_end_.has_value()) {
    slot->model_idle = models_busy_ > 0 ? absl::ZeroDuration()
                                        : std::max(now - *last_model_end_, absl::ZeroDuration());
  }
  queued_items_ -= slot->batch.size;
  open_items_ = 0;
  return slot;
}

void DynamicBatcher::RunModel(Slot& slot) {
  const absl::Time start = clock_->Now();
  slot.status = batch_fn_(slot.batch);
  slot.run_end = clock_->Now();
  slot.run_time = slot.run_end - start;
}

void DynamicBatcher::Complete(Slot& slot, std::vector<Outcome>* outcomes) {
  // Batches may come back out of order; the model's last activity is the latest end.
  if (!last_model_end_.has_value() || slot.run_end > *last_model_end_) {
    last_model_end_ = slot.run_end;
  }
  {
    absl::MutexLock lock(&mu_);
    ++counters_.batches;
    if (!slot.status.ok()) ++counters_.batches_failed;
    counters_.items_batched += slot.batch.size;
  }
  for (size_t i = 0; i < slot.states.size(); ++i) {
    TaskState& s = *slot.states[i];
    absl::Status item_status = slot.status;
    if (item_status.ok()) item_status = slot.batch.slices[i].status;
    s.items_returned += slot.batch.slices[i].num_items;
    if (!item_status.ok() && s.status.ok()) s.status = item_status;
    if (!s.ended.has_value()) {
      if (!s.status.ok()) {
        // Its items still waiting (open batch or queue) will not run.
        s.ended = Outcome::Kind::kFailed;
        absl::MutexLock lock(&mu_);
        RemoveWaitingLocked(s);
      } else if (s.items_returned == s.num_items) {
        s.ended = Outcome::Kind::kSucceeded;
      }
    }
    // A task that ended while this batch ran (dropped, or failed in another batch) ends now.
    EndIfIdle(slot.states[i], outcomes);
  }
}

void DynamicBatcher::EndIfIdle(const std::shared_ptr<TaskState>& state,
                               std::vector<Outcome>* outcomes) {
  TaskState& s = *state;
  if (!s.ended.has_value() || s.items_returned < s.items_sent) return;
  outcomes->push_back({state, *s.ended, s.num_items - s.items_sent});
}

void DynamicBatcher::Report(Slot& slot, std::vector<Outcome>& outcomes) {
  const absl::Time start = clock_->Now();
  Finish(outcomes);
  const absl::Duration finish_time = clock_->Now() - start;
  if (options_.observer != nullptr) {
    BatchInfo info;
    info.size = slot.batch.size;
    info.num_tasks = static_cast<int>(slot.states.size());
    info.queue_waits = slot.waits;
    info.run_time = slot.run_time;
    info.status = slot.status;
    info.model_idle = slot.model_idle;
    info.items_staged_ahead = slot.staged_ahead;
    info.stage_time = slot.stage_time;
    info.finish_time = finish_time;
    options_.observer->OnBatch(info);
  }
}

void DynamicBatcher::Recycle(std::unique_ptr<Slot> slot) {
  // The tasks may be gone: drop the references (the buffers keep their capacity).
  slot->Clear();
  spare_.push_back(std::move(slot));
}

int DynamicBatcher::FormAndRunInline() {
  ScopedCallbackThread mark(this);
  std::vector<Outcome> drops;
  FormOpen(&drops);
  // Dropped tasks learn their fate now, not after a model run they take no part in.
  Finish(drops);
  if (open_->batch.size == 0) return 0;
  std::unique_ptr<Slot> slot = HandOver();
  RunModel(*slot);
  std::vector<Outcome> outcomes;
  Complete(*slot, &outcomes);
  const int size = slot->batch.size;
  Report(*slot, outcomes);
  Recycle(std::move(slot));
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
