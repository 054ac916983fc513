// DynamicBatcher: coalesces the items (face crops) of many concurrent tasks (requests) into
// batches for one model, and reports each task's outcome exactly once.
//
// The batcher knows nothing about what an item is. A caller derives from Task, stores its
// inputs and per-item output slots there, and schedules it; the BatchFn, written by the same
// layer, casts each slice's task back to that type, reads the slice's inputs and fills its
// outputs. Only the item count, the deadline and the cancellation check are the batcher's
// business.
//
// Contract
//
// Ownership
// - Schedule() shares ownership of the task with the batcher. The batcher keeps it alive until
//   just after calling its `done`, then drops its reference. `done` is moved out of the task
//   and destroyed after it runs, so a `done` that captures the task's own shared_ptr does not
//   leak. Nothing in the task may change between Schedule() and `done`, except the per-item
//   outputs the BatchFn writes.
// - Options::observer and the Clock are not owned and must outlive the batcher.
// - A Task object is scheduled at most once; to retry after a rejection, schedule it again
//   (a rejected task was not kept).
//
// Blocking and threads
// - Schedule() never waits for the model or for room in the queue: it holds the batcher's
//   mutex for a short bounded section (one allocation, no callbacks) and returns; only a
//   rejection runs caller code (the observer's OnRejected), after the mutex is released. It may
//   be called from any thread, including from inside `done` and the BatchFn.
// - One batch thread (or, in puppet mode, the caller of RunOnce()/Shutdown()) forms batches,
//   calls the BatchFn, the tasks' is_cancelled and done, and the observer's batch and drop
//   hooks. Exactly one batch is in the BatchFn at a time. None of these callbacks is called with
//   the batcher's mutex held; they should still be short, because the next batch waits for them.
//   They must not throw (the engine turns library exceptions into a status at its boundary),
//   and the BatchFn must not keep the slices' Task pointers after it returns.
// - Shutdown() blocks until every accepted task has finished and the batch thread has exited.
//   The destructor calls it. Calling Shutdown() from a callback on the batch thread only starts
//   the shutdown (it cannot join itself); the owner's later Shutdown()/destructor completes it.
//
// Errors (the status Schedule() returns; on any error `done` is never called and the task is
// not kept)
// - RESOURCE_EXHAUSTED, transient: queued items + the task's items would exceed max_queue_size.
//   Retrying after a short back-off can succeed once batches drain the queue.
// - RESOURCE_EXHAUSTED, permanent: the task alone has more items than max_queue_size. The caller
//   must split it; the message says so.
// - UNAVAILABLE, permanent for this batcher: Shutdown() has begun. Another replica may serve it.
// - INVALID_ARGUMENT: a null task, no items, or no `done`. The caller's bug.
// The status passed to `done`:
// - OK: every item went through a BatchFn call that succeeded for it.
// - DEADLINE_EXCEEDED / CANCELLED: the task was found expired (Now() >= deadline) or cancelled
//   when a batch was being formed; its items not yet run never reach the BatchFn.
// - Otherwise the BatchFn's status (or a slice status it set) for the first batch that failed
//   any of the task's items; the task's remaining items are dropped.
//
// When a batch runs (latency bound)
// - As soon as max_batch_size items are queued, or once the oldest queued item has waited
//   max_queue_delay on the injected clock since its Schedule(), or at once after Shutdown()
//   began. A batch that runs takes up to max_batch_size items from the front of the queue; if
//   expired or cancelled tasks were among them it is topped up from behind, and may still run
//   smaller than full (never later than the rules above).
// - So an item waits at most max_queue_delay plus the run time of the batches already queued
//   ahead of it (at most ceil(max_queue_size / max_batch_size) of them) plus the batch in
//   flight when it was scheduled. max_queue_size bounds that backlog.
// - Expired and cancelled tasks are detected only when they reach the front of the queue,
//   i.e. when their items would otherwise be put into a batch, not at their deadline. Until
//   then their items keep their room in the queue.
// - RealClock is wall time (absl::Now()), the same base as gRPC deadlines; a wall-clock step
//   can stretch or shorten one wait, never lose an item.
//
// Invariants
// - FIFO: items enter batches in Schedule() order, a task's items in index order. A task larger
//   than max_batch_size (or than the room left in a batch) continues in the next batches; a
//   batch may hold several tasks and parts of them.
// - Every accepted task gets exactly one `done` call, after all its items that reached the
//   BatchFn have come back from it. A failing batch fails only the tasks with items in it.
// - After Shutdown() (and in the counters at any quiet moment):
//   tasks_accepted == tasks_succeeded + tasks_failed + tasks_expired + tasks_cancelled and
//   items_accepted == items_batched + items_dropped.
#ifndef ARCFACE_SERVER_BATCHING_DYNAMIC_BATCHER_H_
#define ARCFACE_SERVER_BATCHING_DYNAMIC_BATCHER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/batching/clock.h"

namespace arcface::batching {

// One request's worth of items. Derive from it to carry the items' inputs and outputs.
struct Task {
  virtual ~Task() = default;

  int num_items = 0;
  // On the batcher's clock. absl::InfiniteFuture() never expires.
  absl::Time deadline = absl::InfiniteFuture();
  // Optional. Polled on the batch thread before the task's items go into a batch; must be
  // thread-safe and cheap (e.g. grpc::CallbackServerContext::IsCancelled).
  std::function<bool()> is_cancelled;
  // Required. Called exactly once, on the batch thread (or the puppet's caller).
  absl::AnyInvocable<void(absl::Status)> done;
};

// The items [first_item, first_item + num_items) of one task, as they sit in a batch.
struct BatchSlice {
  Task* task = nullptr;
  int first_item = 0;
  int num_items = 0;
  // The BatchFn may set this to fail just this slice's task (say, one request's input turned out
  // to be unusable) without failing its batch-mates. Ignored when the BatchFn itself fails.
  absl::Status status;
};

struct Batch {
  std::vector<BatchSlice> slices;  // in queue order; a task appears at most once
  int size = 0;                    // total items, 1..max_batch_size
};

// Runs the model on a batch. A non-OK return fails every task in the batch with that status.
using BatchFn = absl::AnyInvocable<absl::Status(Batch& batch)>;

enum class RejectReason { kQueueFull, kTooLarge, kShuttingDown, kInvalid };
enum class DropReason { kExpired, kCancelled };

struct BatchInfo {
  int size = 0;
  int num_tasks = 0;
  absl::Span<const absl::Duration> queue_waits;  // one per item: Schedule() to batch formation
  absl::Duration run_time;                       // the BatchFn call, on the batcher's clock
  absl::Status status;                           // what the BatchFn returned
};

// Metrics hooks. Must be thread-safe: OnRejected runs on Schedule()'s caller, the others on the
// batch thread. Called without the batcher's mutex held.
class BatcherObserver {
 public:
  virtual ~BatcherObserver() = default;
  virtual void OnBatch(const BatchInfo& info) {}
  virtual void OnRejected(RejectReason reason, int num_items) {}
  // A task ended expired or cancelled; `num_items_dropped` of its items never ran.
  virtual void OnDropped(DropReason reason, int num_items_dropped) {}
};

struct BatcherCounters {
  int64_t tasks_accepted = 0;
  int64_t items_accepted = 0;
  int64_t rejected_queue_full = 0;  // tasks; transient
  int64_t rejected_too_large = 0;   // tasks with more items than max_queue_size
  int64_t rejected_shutting_down = 0;
  int64_t rejected_invalid = 0;
  int64_t tasks_succeeded = 0;
  int64_t tasks_failed = 0;  // ended with a BatchFn (or slice) error
  int64_t tasks_expired = 0;
  int64_t tasks_cancelled = 0;
  int64_t batches = 0;
  int64_t batches_failed = 0;
  int64_t items_batched = 0;  // items handed to the BatchFn
  int64_t items_dropped = 0;  // accepted items that never reached it
};

class DynamicBatcher {
 public:
  struct Options {
    int max_batch_size = 32;                                // >= 1
    absl::Duration max_queue_delay = absl::Milliseconds(2);  // >= 0, finite; 0: no waiting
    int max_queue_size = 4096;  // items not yet in a batch; >= max_batch_size
    // false: "puppet" mode for deterministic tests of the layer above: no thread; batches run
    // only inside RunOnce() and Shutdown(), on the caller's thread.
    bool start_batch_thread = true;
    BatcherObserver* observer = nullptr;  // optional, not owned
  };

  // `clock` null means RealClock::Get(). Errors name the offending option.
  static absl::StatusOr<std::unique_ptr<DynamicBatcher>> Create(const Options& options,
                                                                 BatchFn batch_fn,
                                                                 Clock* clock = nullptr);

  ~DynamicBatcher();
  DynamicBatcher(const DynamicBatcher&) = delete;
  DynamicBatcher& operator=(const DynamicBatcher&) = delete;

  absl::Status Schedule(std::shared_ptr<Task> task) ABSL_LOCKS_EXCLUDED(mu_);

  // Stops accepting, runs everything queued without waiting for the delay, finishes every
  // accepted task, joins the batch thread. Idempotent; concurrent callers all wait.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_, step_mu_, join_mu_);

  // Puppet mode only (else FAILED_PRECONDITION). If a batch is due at the clock's current time,
  // drops the expired/cancelled tasks in its way, runs it and returns its size; else returns 0.
  absl::StatusOr<int> RunOnce() ABSL_LOCKS_EXCLUDED(mu_, step_mu_);

  // For tests: waits (up to `timeout` of real time, as a safety net) until the batch thread has
  // nothing to do at the clock's current time and is blocked waiting, or has exited. Returns
  // false on timeout. Puppet mode is always idle.
  bool WaitUntilIdle(absl::Duration timeout = absl::Seconds(30)) ABSL_LOCKS_EXCLUDED(mu_);

  // Items accepted and not yet put into a batch.
  int queue_depth() const ABSL_LOCKS_EXCLUDED(mu_);
  BatcherCounters counters() const ABSL_LOCKS_EXCLUDED(mu_);
  const Options& options() const { return options_; }

 private:
  struct TaskState;
  struct Outcome;

  DynamicBatcher(const Options& options, BatchFn batch_fn, Clock* clock);

  void BatchThreadLoop() ABSL_LOCKS_EXCLUDED(mu_);
  bool BatchDueLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool IdleLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forms one batch from the front of the queue and runs it; returns its size, 0 when every
  // candidate was dropped or the queue was empty. Only one caller at a time.
  int FormAndRunBatch() ABSL_LOCKS_EXCLUDED(mu_);
  void RemoveQueuedRestLocked(TaskState& state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Finish(std::vector<Outcome>& outcomes) ABSL_LOCKS_EXCLUDED(mu_);

  const Options options_;
  Clock* const clock_;
  BatchFn batch_fn_;  // only touched by the one thread forming batches

  mutable absl::Mutex mu_;
  absl::CondVar wake_;  // queue became due-able, or shutdown began
  std::deque<std::shared_ptr<TaskState>> queue_ ABSL_GUARDED_BY(mu_);
  int queued_items_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  BatcherCounters counters_ ABSL_GUARDED_BY(mu_);
  // What the batch thread is doing, for WaitUntilIdle(). A signal it has not yet acted on
  // (wake_pending_) or a wait deadline already reached means it is about to run.
  bool thread_waiting_ ABSL_GUARDED_BY(mu_) = false;
  bool thread_exited_ ABSL_GUARDED_BY(mu_) = false;
  bool wake_pending_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time thread_wait_deadline_ ABSL_GUARDED_BY(mu_);

  // Serializes puppet steps (RunOnce, the puppet's Shutdown flush), which may come from any
  // thread; the batch thread never needs it. Taken before mu_.
  absl::Mutex step_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  // Makes concurrent Shutdown() calls wait for the one that joins.
  absl::Mutex join_mu_ ABSL_ACQUIRED_BEFORE(mu_, step_mu_);
  std::thread thread_ ABSL_GUARDED_BY(join_mu_);
};

}  // namespace arcface::batching

#endif  // ARCFACE_SERVER_BATCHING_DYNAMIC_BATCHER_H_
