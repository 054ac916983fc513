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
// - A rejected task is not kept, and loses its `done`: Schedule() moves `done` out of the task
//   and destroys it (without calling it) before it returns any error, whatever the reason, so
//   that what `done` captures (the task itself, the caller's call state) is released with the
//   caller's last reference. To retry, give the task a new `done` and schedule it again.
// - Options::observer and the Clock are not owned and must outlive the batcher.
// - A Task object is scheduled at most once (until it is rejected or its `done` ran).
//
// Blocking and threads
// - Schedule() never waits for the model or for room in the queue: it holds the batcher's
//   mutex for a short bounded section (a few small allocations, no callbacks) and returns; only
//   a rejection runs caller code (the observer's OnRejected and the destructor of the rejected
//   `done`), after the mutex is released. It may be called from any thread, including from
//   inside `done` and the BatchFn.
// - The threads form a pipeline, so that the model never waits for the work around it:
//   the model threads (Options::max_batches_in_flight of them, k below) only call the BatchFn;
//   the one batch thread does everything else: it forms the next batch and stages its items
//   (the StageFn, e.g. gathering their inputs into one buffer) while the model runs, hands it
//   to a model thread the moment one is free, finishes the tasks of each batch that came
//   back (their `done`, the observer's hooks), in the order batches come back, and ends the
//   waiting tasks that expire or are cancelled (see "Expired and cancelled"). In puppet mode
//   the caller of RunOnce()/Shutdown() does all of it in turn, one batch at a time whatever k.
//   At most k batches are in the BatchFn at once, each on its own model thread, so with k > 1
//   the BatchFn must be safe to call concurrently (e.g. an engine with k CUDA streams); with
//   k == 1 (the default) exactly one batch is in it at a time. On a CPU-bound model k > 1 does
//   not pay: the forward passes only contend for the same cores. The StageFn never sees a
//   batch the BatchFn is running. No callback is called with the batcher's mutex held; they
//   must not throw (the engine turns library exceptions into a status at its boundary), and the
//   BatchFn must not keep the slices' Task pointers after it returns.
// - With k > 1, batches may return out of order, and the batches of one task may be in the
//   model at the same time (they hold different items, so per-item outputs do not overlap, but
//   a BatchFn writing anything else of the task must expect that).
// - Shutdown() blocks until every accepted task has finished and all threads have exited.
//   The destructor calls it. Calling Shutdown() from any of the batcher's callbacks only starts
//   the shutdown (it cannot join itself); the owner's later Shutdown()/destructor completes it.
//
// Errors (the status Schedule() returns; on any error `done` is never called, it is destroyed
// before Schedule() returns, and the task is not kept)
// - RESOURCE_EXHAUSTED, transient: queued items + the task's items would exceed max_queue_size.
//   Retrying after a short back-off can succeed once batches drain the queue.
// - RESOURCE_EXHAUSTED, permanent: the task alone has more items than max_queue_size. The caller
//   must split it; the message says so.
// - UNAVAILABLE, permanent for this batcher: Shutdown() has begun. Another replica may serve it.
// - INVALID_ARGUMENT: a null task, no items, or no `done`. The caller's bug.
// The status passed to `done`:
// - OK: every item went through a BatchFn call that succeeded for it.
// - DEADLINE_EXCEEDED / CANCELLED: the task expired (Now() >= deadline) or was found cancelled
//   while some of its items were still waiting (see "Expired and cancelled"); those items never
//   reach the BatchFn (its items already in the model finish first; `done` comes after them).
// - Otherwise the BatchFn's status (or a slice status it set) for the first batch that failed
//   any of the task's items; the task's items not yet handed to the model are dropped (with
//   k > 1, `done` still waits for its other batches in the model).
//
// When a batch runs (latency bound)
// - As soon as a model thread is free and max_batch_size items are queued, or once the oldest
//   queued item has waited max_queue_delay on the injected clock since its Schedule(), or at once
//   after Shutdown() began. A batch that runs takes up to max_batch_size items from the front
//   of the queue; if expired or cancelled tasks were among them it is topped up from behind,
//   and may still run smaller than full (never later than the rules above).
// - While the model runs a batch (any of the k), the batch thread already moves items from the
//   front of the queue into the next batch and stages them, up to max_batch_size. That changes
//   neither which items the next batch holds nor when it runs: staged items still count as queued
//   (for queue_depth() and max_queue_size) until the batch is handed to the model, and expiry and
//   cancellation apply to them as to unstaged items.
// - So an item waits at most max_queue_delay plus the run time of the batches already queued
//   ahead of it (at most ceil(max_queue_size / max_batch_size) of them, run k at a time) plus
//   the batches in flight when it was scheduled. max_queue_size bounds that backlog.
// - RealClock is wall time (absl::Now()), the same base as gRPC deadlines; a wall-clock step
//   can stretch or shorten one wait, never lose an item.
//
// Expired and cancelled (a task is "waiting" while some of its items are queued or staged)
// - A waiting task ends DEADLINE_EXCEEDED when the batcher's clock reaches its deadline: the
//   batch thread wakes at the earliest deadline among the waiting tasks, even while every model
//   thread is busy, takes the task's waiting items out of the queue (and out of the staged next
//   batch, whose items behind it move up and are staged again) and calls `done` at once (unless
//   some of its items are in the model: then after they come back). Its room in the queue is
//   free from that moment, and its waiting items never reach the model.
// - is_cancelled is polled for every waiting task once per Options::cancel_poll_interval on the
//   batcher's clock, so a cancelled task gives back its room and gets `done` within one interval
//   of its cancellation. Both bounds add the time the batch thread needs to finish the step it
//   is in (a staging or a round of `done` calls). Both are also checked once more when the
//   task's items are about to be handed to the model.
// - In puppet mode, RunOnce() does the same first (at the clock's current time), then runs a
//   batch if one is due.
//
// Invariants
// - FIFO: items enter batches, and batches are handed to the model threads, in Schedule()
//   order, a task's items in index order (with k > 1, batches handed over in turn may start in
//   either order and finish in any order). A task larger than max_batch_size (or than the room
//   left in a batch) continues in the next batches; a batch may hold several tasks and parts of
//   them.
// - Every accepted task gets exactly one `done` call, after all its items that reached the
//   BatchFn have come back from it. A failing batch fails only the tasks with items in it.
// - After Shutdown() (and in the counters at any quiet moment):
//   tasks_accepted == tasks_succeeded + tasks_failed + tasks_expired + tasks_cancelled and
//   items_accepted == items_batched + items_dropped.
// - With a StageFn, every item of a batch has been staged at its final position in the batch
//   before the BatchFn sees it.
#ifndef ARCFACE_SERVER_BATCHING_DYNAMIC_BATCHER_H_
#define ARCFACE_SERVER_BATCHING_DYNAMIC_BATCHER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
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
  // Optional. Polled on the batch thread while the task waits (every cancel_poll_interval) and
  // before its items are handed to the model; must be thread-safe and cheap (e.g.
  // grpc::CallbackServerContext::IsCancelled).
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
  // Scratch for the StageFn and the BatchFn (say, the batch's gathered input). The batcher
  // never reads it; it keeps it with the Batch object, which it reuses, so its capacity stays.
  std::vector<uint8_t> staging;
};

// Runs the model on a batch. A non-OK return fails every task in the batch with that status.
using BatchFn = absl::AnyInvocable<absl::Status(Batch& batch)>;

// Optional. Stages the items [first_item, batch.size) of a batch being formed, in batch order
// (slices in order, each slice's items in order), e.g. copies their inputs into
// batch.staging at their offsets; items before first_item are staged already and keep their
// positions. Called on the batch thread, mostly while the model runs the previous batch; called
// again from an earlier first_item when a task dropped out of the batch and the items behind it
// moved up. It must not fail: anything that can fail belongs in the BatchFn.
using StageFn = absl::AnyInvocable<void(Batch& batch, int first_item)>;

enum class RejectReason { kQueueFull, kTooLarge, kShuttingDown, kInvalid };
enum class DropReason { kExpired, kCancelled };

struct BatchInfo {
  int size = 0;
  int num_tasks = 0;
  absl::Span<const absl::Duration> queue_waits;  // one per item: Schedule() to the hand-over
  absl::Duration run_time;                       // the BatchFn call, on the batcher's clock
  absl::Status status;                           // what the BatchFn returned
  // How long the model sat idle between the end of the previous batch and this one's start
  // (load-dependent: with a queue that never empties, only the hand-over itself). Unset for
  // the first batch. With several batches in flight: the time since the latest end while no
  // batch was in the model, zero if another batch still was.
  std::optional<absl::Duration> model_idle;
  int items_staged_ahead = 0;   // items staged while another batch was in the model
  absl::Duration stage_time;    // time in the StageFn for this batch, all calls together
  absl::Duration finish_time;   // the tasks' `done` calls after this batch, all together
};

// Metrics hooks. Must be thread-safe: OnRejected runs on Schedule()'s caller, the others on the
// batch thread (never on a model thread). Called without the batcher's mutex held.
class BatcherObserver {
 public:
  virtual ~BatcherObserver() = default;
  // After the batch's tasks that ended with it got their `done`.
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
  // Create() checks each range and names the option it refuses.
  struct Options {
    // Items in one BatchFn call at most. >= 1; default 32.
    int max_batch_size = 32;
    // How long the oldest queued item may wait for a fuller batch, on the batcher's clock.
    // >= 0 and finite, 0: no waiting; default 2 ms.
    absl::Duration max_queue_delay = absl::Milliseconds(2);
    // Items accepted and not yet in the model (queued or staged); beyond, Schedule() refuses.
    // >= max_batch_size; default 4096.
    int max_queue_size = 4096;
    // false: "puppet" mode for deterministic tests of the layer above: no threads; batches are
    // formed, staged, run and finished only inside RunOnce() and Shutdown(), on the caller's
    // thread. Default true.
    bool start_batch_thread = true;
    // Model threads, each calling the BatchFn with its own batch: 1..kMaxBatchesInFlight;
    // default 1. Ignored in puppet mode, which runs one batch at a time.
    int max_batches_in_flight = 1;
    // How often the waiting tasks' is_cancelled is polled, on the batcher's clock. >= 0 and
    // finite, 0: only when a task's items are about to be handed to the model; default 20 ms.
    absl::Duration cancel_poll_interval = absl::Milliseconds(20);
    // Metrics hooks; optional (default none), not owned, must outlive the batcher.
    BatcherObserver* observer = nullptr;
  };
  static constexpr int kMaxBatchesInFlight = 16;

  // `clock` null means RealClock::Get(); `stage_fn` may be null. Errors name the offending
  // option.
  static absl::StatusOr<std::unique_ptr<DynamicBatcher>> Create(const Options& options,
                                                                 BatchFn batch_fn,
                                                                 Clock* clock = nullptr,
                                                                 StageFn stage_fn = nullptr);

  ~DynamicBatcher();
  DynamicBatcher(const DynamicBatcher&) = delete;
  DynamicBatcher& operator=(const DynamicBatcher&) = delete;

  absl::Status Schedule(std::shared_ptr<Task> task) ABSL_LOCKS_EXCLUDED(mu_);

  // Stops accepting, runs everything queued without waiting for the delay, finishes every
  // accepted task, joins the batch thread. Idempotent; concurrent callers all wait.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_, step_mu_, join_mu_);

  // Test hooks (puppet mode, the idle waits) stay in the class: they run its private steps (sweep,
  // form, stage, run, finish) and read its batch thread's state under mu_, unreachable outside.
  //
  // Puppet mode only (else FAILED_PRECONDITION). Ends the waiting tasks that expired or (when a
  // poll is due) were cancelled, as the batch thread would at the clock's current time; then, if
  // a batch is due, drops the expired/cancelled tasks in its way, runs it and returns its size;
  // else returns 0.
  absl::StatusOr<int> RunOnce() ABSL_LOCKS_EXCLUDED(mu_, step_mu_);

  // For tests: waits (up to `timeout` of real time, as a safety net) until no batch is in the model
  // and the batch thread has nothing to do at the clock's current time and is blocked waiting, or
  // until the threads have exited. Returns false on timeout. Puppet mode is always idle.
  bool WaitUntilIdle(absl::Duration timeout = absl::Seconds(30)) ABSL_LOCKS_EXCLUDED(mu_);
  // The same, except that batches may still be in the model (e.g. one the test holds there).
  bool WaitUntilBatchThreadIdle(absl::Duration timeout = absl::Seconds(30))
      ABSL_LOCKS_EXCLUDED(mu_);

  // Items accepted and not yet handed to the model (queued or staged).
  int queue_depth() const ABSL_LOCKS_EXCLUDED(mu_);
  BatcherCounters counters() const ABSL_LOCKS_EXCLUDED(mu_);
  const Options& options() const { return options_; }

 private:
  struct TaskState;
  struct Outcome;
  struct Slot;

  DynamicBatcher(const Options& options, BatchFn batch_fn, StageFn stage_fn, Clock* clock);

  void BatchThreadLoop() ABSL_LOCKS_EXCLUDED(mu_);
  void ModelThreadLoop() ABSL_LOCKS_EXCLUDED(mu_);
  bool BatchDueLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Time OldestLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // When the next sweep (an expiry or a cancellation poll) is due; InfiniteFuture() if none.
  absl::Time NextSweepLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool BatchThreadIdleLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool IdleLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // The steps of the forming (batch) thread, or of the puppet's caller. The open batch
  // (open_) belongs to that one thread.
  // Moves items from the front of the queue into the open batch, up to max_batch_size.
  void TakeLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StageOpen(bool ahead) ABSL_LOCKS_EXCLUDED(mu_);
  // Fills the open batch for the model: takes, drops expired/cancelled tasks (their outcomes
  // into *drops), tops up, stages. Leaves it empty if nothing is left to run.
  void FormOpen(std::vector<Outcome>* drops) ABSL_LOCKS_EXCLUDED(mu_);
  // Ends the waiting tasks that expired, or were cancelled if a poll is due: their waiting items
  // leave the queue and the open batch, their outcomes go into *drops.
  void Sweep(std::vector<Outcome>* drops) ABSL_LOCKS_EXCLUDED(mu_);
  // A task that ended: its items still waiting (open batch or queue) leave, with its deadline.
  void RemoveWaitingLocked(TaskState& state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ForgetDeadlineLocked(TaskState& state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes a task's slice from the open batch, if it has one.
  void RemoveFromOpenLocked(const TaskState* state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveQueuedRestLocked(TaskState& state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes the formed open batch out for the model and starts a fresh open batch.
  std::unique_ptr<Slot> HandOver() ABSL_LOCKS_EXCLUDED(mu_);
  void RunModel(Slot& slot);
  // The batch came back from the model: per-task accounting (no callbacks), outcomes into
  // *outcomes; a failed task's items still waiting (queued or staged) are removed.
  void Complete(Slot& slot, std::vector<Outcome>* outcomes) ABSL_LOCKS_EXCLUDED(mu_);
  // Calls the finished tasks' `done` and the observer's OnBatch.
  void Report(Slot& slot, std::vector<Outcome>& outcomes) ABSL_LOCKS_EXCLUDED(mu_);
  // Turns a task whose end is sealed into an outcome once none of its items is in the model.
  void EndIfIdle(const std::shared_ptr<TaskState>& state, std::vector<Outcome>* outcomes);
  void Recycle(std::unique_ptr<Slot> slot);
  // Puppet mode: forms one batch, runs and finishes it on the caller's thread; its size, 0 if
  // every candidate was dropped or nothing was queued.
  int FormAndRunInline() ABSL_LOCKS_EXCLUDED(mu_);
  void Finish(std::vector<Outcome>& outcomes) ABSL_LOCKS_EXCLUDED(mu_);

  const Options options_;
  Clock* const clock_;
  BatchFn batch_fn_;  // only touched by the model thread (or the puppet's caller)
  StageFn stage_fn_;  // only touched by the forming thread

  // Forming thread only (see above).
  std::unique_ptr<Slot> open_;
  std::vector<std::unique_ptr<Slot>> spare_;  // finished Slots kept for their buffers' capacity
  std::optional<absl::Time> last_model_end_;

  mutable absl::Mutex mu_;
  absl::CondVar wake_;  // the batch thread's: the queue changed, the model finished, shutdown
  std::deque<std::shared_ptr<TaskState>> queue_ ABSL_GUARDED_BY(mu_);
  // The waiting tasks with a finite deadline, earliest first. A task leaves it when its last
  // item is handed to the model or when it ends, so it holds no finished task.
  std::multimap<absl::Time, std::shared_ptr<TaskState>> deadlines_ ABSL_GUARDED_BY(mu_);
  int queued_items_ ABSL_GUARDED_BY(mu_) = 0;  // in queue_ and in the open batch
  int open_items_ ABSL_GUARDED_BY(mu_) = 0;    // mirror of open_->batch.size
  absl::Time open_oldest_ ABSL_GUARDED_BY(mu_);  // enqueue time of the open batch's first task
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time next_poll_ ABSL_GUARDED_BY(mu_);  // of is_cancelled, with a cancel_poll_interval
  BatcherCounters counters_ ABSL_GUARDED_BY(mu_);
  // The hand-over between the threads: the batch thread appends to to_run_ and counts
  // models_busy_ up (only while it is below max_batches_in_flight, so a model thread is free for
  // each); a model thread takes a batch from to_run_ and appends it to ran_ when the BatchFn
  // returned; the batch thread takes it from ran_ and counts models_busy_ down.
  std::deque<std::unique_ptr<Slot>> to_run_ ABSL_GUARDED_BY(mu_);
  std::deque<std::unique_ptr<Slot>> ran_ ABSL_GUARDED_BY(mu_);
  int models_busy_ ABSL_GUARDED_BY(mu_) = 0;  // batches handed over and not yet taken back
  bool model_thread_stop_ ABSL_GUARDED_BY(mu_) = false;
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
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(join_mu_);
};

}  // namespace arcface::batching

#endif  // ARCFACE_SERVER_BATCHING_DYNAMIC_BATCHER_H_
