// Tests of the dynamic batcher against its contract (server/batching/dynamic_batcher.h).
// Time is a FakeClock moved by hand; the tests never sleep. They wait only on the batcher's own
// state (WaitUntilIdle) or on notifications, with generous real-time timeouts as a safety net.
#include "server/batching/dynamic_batcher.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/batching/clock.h"
#include "tests/test_util/fake_clock.h"

namespace arcface::batching {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr absl::Duration kSafety = absl::Seconds(60);

std::vector<int> Range(int first, int n) {
  std::vector<int> v(n);
  std::iota(v.begin(), v.end(), first);
  return v;
}

// A request: its items are integer ids; the BatchFn writes id * 10 into each output slot.
struct TestTask : Task {
  std::vector<int> ids;
  std::vector<int> outputs;
  std::atomic<int> done_calls{0};

  absl::Status result() {
    absl::MutexLock lock(&mu);
    return status;
  }

  absl::Mutex mu;
  absl::Status status ABSL_GUARDED_BY(mu) = absl::UnknownError("done not called");
};

std::shared_ptr<TestTask> MakeTask(int first_id, int n,
                                   absl::Time deadline = absl::InfiniteFuture()) {
  auto task = std::make_shared<TestTask>();
  task->num_items = n;
  task->ids = Range(first_id, n);
  task->outputs.assign(n, -1);
  task->deadline = deadline;
  TestTask* raw = task.get();
  task->done = [raw](absl::Status status) {
    {
      absl::MutexLock lock(&raw->mu);
      raw->status = std::move(status);
    }
    raw->done_calls.fetch_add(1);
  };
  return task;
}

// Stands in for the model: records what each batch held, fills the outputs, and fails the
// batches the test asks it to fail.
class Recorder {
 public:
  BatchFn Fn() {
    return [this](Batch& batch) { return Run(batch); };
  }

  absl::Status Run(Batch& batch) {
    std::vector<int> ids;
    int total = 0;
    for (const BatchSlice& slice : batch.slices) {
      auto* task = static_cast<TestTask*>(slice.task);
      for (int i = 0; i < slice.num_items; ++i) {
        const int item = slice.first_item + i;
        ids.push_back(task->ids[item]);
        task->outputs[item] = task->ids[item] * 10;
      }
      total += slice.num_items;
    }
    EXPECT_EQ(total, batch.size);
    absl::Status status;
    {
      absl::MutexLock lock(&mu_);
      batches_.push_back(ids);
      num_slices_.push_back(static_cast<int>(batch.slices.size()));
      if (fail_if_) status = fail_if_(ids);
      if (slice_status_) {
        for (BatchSlice& slice : batch.slices) slice.status = slice_status_(slice);
      }
    }
    return status;
  }

  void FailIf(std::function<absl::Status(const std::vector<int>&)> f) {
    absl::MutexLock lock(&mu_);
    fail_if_ = std::move(f);
  }
  void SetSliceStatus(std::function<absl::Status(const BatchSlice&)> f) {
    absl::MutexLock lock(&mu_);
    slice_status_ = std::move(f);
  }

  std::vector<std::vector<int>> batches() {
    absl::MutexLock lock(&mu_);
    return batches_;
  }
  std::vector<int> sizes() {
    absl::MutexLock lock(&mu_);
    std::vector<int> out;
    for (const auto& b : batches_) out.push_back(static_cast<int>(b.size()));
    return out;
  }
  std::vector<int> all_ids() {
    absl::MutexLock lock(&mu_);
    std::vector<int> out;
    for (const auto& b : batches_) out.insert(out.end(), b.begin(), b.end());
    return out;
  }
  std::vector<int> num_slices() {
    absl::MutexLock lock(&mu_);
    return num_slices_;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::vector<int>> batches_ ABSL_GUARDED_BY(mu_);
  std::vector<int> num_slices_ ABSL_GUARDED_BY(mu_);
  std::function<absl::Status(const std::vector<int>&)> fail_if_ ABSL_GUARDED_BY(mu_);
  std::function<absl::Status(const BatchSlice&)> slice_status_ ABSL_GUARDED_BY(mu_);
};

class RecordingObserver : public BatcherObserver {
 public:
  struct Stages {
    std::optional<absl::Duration> model_idle;
    int items_staged_ahead;
  };
  void OnBatch(const BatchInfo& info) override {
    absl::MutexLock lock(&mu_);
    sizes_.push_back(info.size);
    waits_.emplace_back(info.queue_waits.begin(), info.queue_waits.end());
    stages_.push_back({info.model_idle, info.items_staged_ahead});
  }
  std::vector<Stages> stages() {
    absl::MutexLock lock(&mu_);
    return stages_;
  }
  void OnRejected(RejectReason reason, int num_items) override {
    absl::MutexLock lock(&mu_);
    rejected_.push_back(reason);
  }
  void OnDropped(DropReason reason, int num_items_dropped) override {
    absl::MutexLock lock(&mu_);
    dropped_.emplace_back(reason, num_items_dropped);
  }

  std::vector<std::vector<absl::Duration>> waits() {
    absl::MutexLock lock(&mu_);
    return waits_;
  }
  std::vector<RejectReason> rejected() {
    absl::MutexLock lock(&mu_);
    return rejected_;
  }
  std::vector<std::pair<DropReason, int>> dropped() {
    absl::MutexLock lock(&mu_);
    return dropped_;
  }

 private:
  absl::Mutex mu_;
  std::vector<int> sizes_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<absl::Duration>> waits_ ABSL_GUARDED_BY(mu_);
  std::vector<Stages> stages_ ABSL_GUARDED_BY(mu_);
  std::vector<RejectReason> rejected_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<DropReason, int>> dropped_ ABSL_GUARDED_BY(mu_);
};

DynamicBatcher::Options MakeOptions(int max_batch, absl::Duration delay, int max_queue,
                                    bool thread = true) {
  DynamicBatcher::Options options;
  options.max_batch_size = max_batch;
  options.max_queue_delay = delay;
  options.max_queue_size = max_queue;
  options.start_batch_thread = thread;
  return options;
}

std::unique_ptr<DynamicBatcher> MustCreate(const DynamicBatcher::Options& options, BatchFn fn,
                                           Clock* clock) {
  auto batcher = DynamicBatcher::Create(options, std::move(fn), clock);
  EXPECT_TRUE(batcher.ok()) << batcher.status();
  return batcher.ok() ? std::move(*batcher) : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Options

TEST(DynamicBatcherOptions, DefaultsMatchTheDesign) {
  DynamicBatcher::Options options;
  EXPECT_EQ(options.max_batch_size, 32);
  EXPECT_EQ(options.max_queue_delay, absl::Milliseconds(2));
  EXPECT_EQ(options.max_queue_size, 4096);
  EXPECT_EQ(options.cancel_poll_interval, absl::Milliseconds(20));
  FakeClock clock;
  Recorder model;
  EXPECT_TRUE(DynamicBatcher::Create(options, model.Fn(), &clock).ok());
}

TEST(DynamicBatcherOptions, RejectsBadValuesNamingTheOption) {
  FakeClock clock;
  Recorder model;
  auto check = [&](DynamicBatcher::Options options, const char* name) {
    auto batcher = DynamicBatcher::Create(options, model.Fn(), &clock);
    ASSERT_FALSE(batcher.ok()) << name;
    EXPECT_EQ(batcher.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(batcher.status().message(), HasSubstr(name));
  };
  check(MakeOptions(0, absl::Milliseconds(2), 64), "max_batch_size");
  check(MakeOptions(-3, absl::Milliseconds(2), 64), "max_batch_size");
  check(MakeOptions(32, absl::Milliseconds(2), 31), "max_queue_size");
  check(MakeOptions(32, -absl::Microseconds(1), 64), "max_queue_delay");
  check(MakeOptions(32, absl::InfiniteDuration(), 64), "max_queue_delay");
  auto poll = MakeOptions(32, absl::Milliseconds(2), 64);
  poll.cancel_poll_interval = -absl::Microseconds(1);
  check(poll, "cancel_poll_interval");
  poll.cancel_poll_interval = absl::InfiniteDuration();
  check(poll, "cancel_poll_interval");

  auto no_fn = DynamicBatcher::Create(DynamicBatcher::Options(), nullptr, &clock);
  ASSERT_FALSE(no_fn.ok());
  EXPECT_THAT(no_fn.status().message(), HasSubstr("batch_fn"));

  // The edges are valid.
  EXPECT_TRUE(DynamicBatcher::Create(MakeOptions(1, absl::ZeroDuration(), 1), model.Fn(), &clock)
                  .ok());
  poll.cancel_poll_interval = absl::ZeroDuration();  // polled only at the hand-over
  EXPECT_TRUE(DynamicBatcher::Create(poll, model.Fn(), &clock).ok());
}

TEST(DynamicBatcherOptions, NullClockMeansRealClock) {
  Recorder model;
  auto batcher = MustCreate(MakeOptions(1, absl::ZeroDuration(), 4), model.Fn(), nullptr);
  ASSERT_NE(batcher, nullptr);
  auto task = MakeTask(0, 1);
  ASSERT_TRUE(batcher->Schedule(task).ok());
  batcher->Shutdown();
  EXPECT_EQ(task->done_calls.load(), 1);
  EXPECT_TRUE(task->result().ok());
}

// ---------------------------------------------------------------------------------------------
// When a batch runs

TEST(DynamicBatcher, TimeoutBoundaryIsExact) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(32, absl::Milliseconds(2), 4096), model.Fn(), &clock);
  auto a = MakeTask(0, 1);
  auto b = MakeTask(1, 2);
  auto c = MakeTask(3, 1);
  ASSERT_TRUE(batcher->Schedule(a).ok());
  ASSERT_TRUE(batcher->Schedule(b).ok());
  ASSERT_TRUE(batcher->Schedule(c).ok());
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), IsEmpty());

  clock.Advance(absl::Milliseconds(2) - absl::Microseconds(1));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), IsEmpty());
  EXPECT_EQ(batcher->queue_depth(), 4);
  EXPECT_EQ(a->done_calls.load(), 0);

  clock.Advance(absl::Microseconds(1));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(0, 1, 2, 3)));
  EXPECT_EQ(batcher->queue_depth(), 0);
  for (auto* t : {a.get(), b.get(), c.get()}) {
    EXPECT_EQ(t->done_calls.load(), 1);
    EXPECT_TRUE(t->result().ok()) << t->result();
  }
  EXPECT_THAT(b->outputs, ElementsAre(10, 20));
}

TEST(DynamicBatcher, DelayCountsFromTheOldestItemsSchedule) {
  FakeClock clock;
  Recorder model;
  RecordingObserver observer;
  auto options = MakeOptions(32, absl::Milliseconds(2), 4096);
  options.observer = &observer;
  auto batcher = MustCreate(options, model.Fn(), &clock);

  ASSERT_TRUE(batcher->Schedule(MakeTask(0, 1)).ok());
  clock.Advance(absl::Milliseconds(1));
  ASSERT_TRUE(batcher->Schedule(MakeTask(1, 2)).ok());
  clock.Advance(absl::Milliseconds(1) - absl::Microseconds(1));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), IsEmpty());

  clock.Advance(absl::Microseconds(1));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(0, 1, 2)));
  EXPECT_THAT(observer.waits(),
              ElementsAre(ElementsAre(absl::Milliseconds(2), absl::Milliseconds(1),
                                      absl::Milliseconds(1))));
}

TEST(DynamicBatcher, FullBatchRunsWithoutWaitingForTheDelay) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(4, absl::Seconds(1), 64), model.Fn(), &clock);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(batcher->Schedule(MakeTask(i, 1)).ok());
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), IsEmpty());

  ASSERT_TRUE(batcher->Schedule(MakeTask(3, 1)).ok());  // the 4th item fills the batch
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(0, 1, 2, 3)));

  // A 5th item starts a new batch that again waits for its delay.
  ASSERT_TRUE(batcher->Schedule(MakeTask(4, 1)).ok());
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_EQ(model.batches().size(), 1u);
  clock.Advance(absl::Seconds(1));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(0, 1, 2, 3), ElementsAre(4)));
}

TEST(DynamicBatcher, ZeroDelayRunsWhatIsQueuedAtOnce) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(32, absl::ZeroDuration(), 64), model.Fn(), &clock);
  auto task = MakeTask(0, 3);
  ASSERT_TRUE(batcher->Schedule(task).ok());
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(0, 1, 2)));
  EXPECT_EQ(task->done_calls.load(), 1);
}

// ---------------------------------------------------------------------------------------------
// Admission

TEST(DynamicBatcher, ExactQueueCapacity) {
  FakeClock clock;
  Recorder model;
  RecordingObserver observer;
  auto options = MakeOptions(4, absl::Milliseconds(2), 8, /*thread=*/false);
  options.observer = &observer;
  auto batcher = MustCreate(options, model.Fn(), &clock);

  for (int i = 0; i < 8; ++i) ASSERT_TRUE(batcher->Schedule(MakeTask(i, 1)).ok()) << i;
  EXPECT_EQ(batcher->queue_depth(), 8);
  absl::Status full = batcher->Schedule(MakeTask(8, 1));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(full.message(), "queue full: 8 + 1 items over the limit of 8");

  ASSERT_EQ(*batcher->RunOnce(), 4);  // a full batch is due at once
  EXPECT_EQ(batcher->queue_depth(), 4);
  ASSERT_TRUE(batcher->Schedule(MakeTask(8, 3)).ok());
  EXPECT_EQ(batcher->Schedule(MakeTask(11, 2)).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(batcher->Schedule(MakeTask(11, 1)).ok());
  EXPECT_EQ(batcher->queue_depth(), 8);

  BatcherCounters counters = batcher->counters();
  EXPECT_EQ(counters.rejected_queue_full, 2);
  EXPECT_EQ(counters.tasks_accepted, 10);
  EXPECT_THAT(observer.rejected(),
              ElementsAre(RejectReason::kQueueFull, RejectReason::kQueueFull));
}

TEST(DynamicBatcher, ItemsInFlightDoNotTakeQueueRoom) {
  FakeClock clock;
  Recorder model;
  absl::Notification entered, release;
  std::atomic<int> calls{0};
  auto fn = [&](Batch& batch) {
    if (calls.fetch_add(1) == 0) {
      entered.Notify();
      release.WaitForNotificationWithTimeout(kSafety);
    }
    return model.Run(batch);
  };
  auto batcher = MustCreate(MakeOptions(4, absl::Seconds(1), 8), fn, &clock);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(batcher->Schedule(MakeTask(i, 1)).ok());
  ASSERT_TRUE(entered.WaitForNotificationWithTimeout(kSafety));
  // The first batch is in the model; the whole queue is free again.
  EXPECT_EQ(batcher->queue_depth(), 0);
  ASSERT_TRUE(batcher->Schedule(MakeTask(4, 3)).ok());
  ASSERT_TRUE(batcher->Schedule(MakeTask(7, 5)).ok());
  EXPECT_EQ(batcher->Schedule(MakeTask(12, 1)).code(), absl::StatusCode::kResourceExhausted);
  release.Notify();
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(0, 1, 2, 3), ElementsAre(4, 5, 6, 7),
                                           ElementsAre(8, 9, 10, 11)));
}

TEST(DynamicBatcher, RejectsBadTasksAndTasksLargerThanTheQueue) {
  FakeClock clock;
  Recorder model;
  RecordingObserver observer;
  auto options = MakeOptions(4, absl::Milliseconds(2), 8);
  options.observer = &observer;
  auto batcher = MustCreate(options, model.Fn(), &clock);

  EXPECT_EQ(batcher->Schedule(nullptr).code(), absl::StatusCode::kInvalidArgument);
  auto empty = MakeTask(0, 0);
  EXPECT_EQ(batcher->Schedule(empty).code(), absl::StatusCode::kInvalidArgument);
  auto no_done = MakeTask(0, 1);
  no_done->done = nullptr;
  EXPECT_EQ(batcher->Schedule(no_done).code(), absl::StatusCode::kInvalidArgument);

  auto huge = MakeTask(0, 9);
  absl::Status status = batcher->Schedule(huge);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr("limit of 8"));

  batcher->Shutdown();
  EXPECT_EQ(empty->done_calls.load(), 0);
  EXPECT_EQ(huge->done_calls.load(), 0);
  EXPECT_THAT(model.batches(), IsEmpty());
  BatcherCounters counters = batcher->counters();
  EXPECT_EQ(counters.rejected_invalid, 3);
  EXPECT_EQ(counters.rejected_too_large, 1);
  EXPECT_EQ(counters.tasks_accepted, 0);
  EXPECT_THAT(observer.rejected(),
              ElementsAre(RejectReason::kInvalid, RejectReason::kInvalid, RejectReason::kInvalid,
                          RejectReason::kTooLarge));
}

// ---------------------------------------------------------------------------------------------
// Order and splitting

TEST(DynamicBatcher, FifoAcrossTasks) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(4, absl::Milliseconds(2), 64), model.Fn(), &clock);
  std::vector<std::shared_ptr<TestTask>> tasks;
  int next = 0;
  for (int n : {3, 5, 2, 7, 1}) {
    tasks.push_back(MakeTask(next, n));
    next += n;
    ASSERT_TRUE(batcher->Schedule(tasks.back()).ok());
  }
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.sizes(), ElementsAre(4, 4, 4, 4));  // 2 of 18 wait for the delay
  clock.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.sizes(), ElementsAre(4, 4, 4, 4, 2));
  EXPECT_THAT(model.all_ids(), ElementsAreArray(Range(0, 18)));
  for (auto& t : tasks) {
    EXPECT_EQ(t->done_calls.load(), 1);
    EXPECT_TRUE(t->result().ok());
    for (size_t i = 0; i < t->ids.size(); ++i) EXPECT_EQ(t->outputs[i], t->ids[i] * 10);
  }
}

TEST(DynamicBatcher, LargeTaskIsSplitAcrossBatchesAndDoneOnce) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(32, absl::Milliseconds(2), 4096), model.Fn(), &clock);
  auto task = MakeTask(0, 70);
  ASSERT_TRUE(batcher->Schedule(task).ok());
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.sizes(), ElementsAre(32, 32));
  EXPECT_EQ(task->done_calls.load(), 0);  // 6 items still queued
  EXPECT_EQ(batcher->queue_depth(), 6);

  clock.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.sizes(), ElementsAre(32, 32, 6));
  EXPECT_THAT(model.all_ids(), ElementsAreArray(Range(0, 70)));
  EXPECT_EQ(task->done_calls.load(), 1);
  EXPECT_TRUE(task->result().ok());
  std::vector<int> expected;
  for (int i = 0; i < 70; ++i) expected.push_back(i * 10);
  EXPECT_THAT(task->outputs, ElementsAreArray(expected));
}

TEST(DynamicBatcher, BatchMixesTasksAndPartsOfTasks) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(4, absl::Milliseconds(2), 64, false), model.Fn(), &clock);
  auto a = MakeTask(0, 3);
  auto b = MakeTask(3, 3);
  ASSERT_TRUE(batcher->Schedule(a).ok());
  ASSERT_TRUE(batcher->Schedule(b).ok());
  ASSERT_EQ(*batcher->RunOnce(), 4);
  EXPECT_EQ(a->done_calls.load(), 1);  // all of a ran
  EXPECT_EQ(b->done_calls.load(), 0);  // one of b's three ran
  EXPECT_EQ(*batcher->RunOnce(), 0);   // b's rest waits for its delay
  clock.Advance(absl::Milliseconds(2));
  ASSERT_EQ(*batcher->RunOnce(), 2);
  EXPECT_EQ(b->done_calls.load(), 1);
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(0, 1, 2, 3), ElementsAre(4, 5)));
  EXPECT_THAT(model.num_slices(), ElementsAre(2, 1));
}

// ---------------------------------------------------------------------------------------------
// Shutdown

TEST(DynamicBatcher, ShutdownFlushesEverythingAtOnce) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(32, absl::Hours(1), 4096), model.Fn(), &clock);
  std::vector<std::shared_ptr<TestTask>> tasks;
  for (int i = 0; i < 8; ++i) {
    tasks.push_back(MakeTask(i * 5, 5));
    ASSERT_TRUE(batcher->Schedule(tasks.back()).ok());
  }
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_EQ(model.sizes().size(), 1u);  // 40 items: one full batch, 8 wait for the hour

  batcher->Shutdown();  // no clock advance: the flush does not wait for the delay
  EXPECT_THAT(model.sizes(), ElementsAre(32, 8));
  EXPECT_THAT(model.all_ids(), ElementsAreArray(Range(0, 40)));
  for (auto& t : tasks) {
    EXPECT_EQ(t->done_calls.load(), 1);
    EXPECT_TRUE(t->result().ok());
  }
  auto late = MakeTask(100, 1);
  absl::Status status = batcher->Schedule(late);
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  batcher->Shutdown();  // idempotent
  batcher.reset();      // and the destructor's call too
  EXPECT_EQ(late->done_calls.load(), 0);
  for (auto& t : tasks) EXPECT_EQ(t->done_calls.load(), 1);
}

TEST(DynamicBatcher, PuppetShutdownFlushesOnTheCaller) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(4, absl::Hours(1), 64, false), model.Fn(), &clock);
  auto a = MakeTask(0, 6);
  ASSERT_TRUE(batcher->Schedule(a).ok());
  batcher->Shutdown();
  EXPECT_THAT(model.sizes(), ElementsAre(4, 2));
  EXPECT_EQ(a->done_calls.load(), 1);
  EXPECT_EQ(batcher->Schedule(MakeTask(6, 1)).code(), absl::StatusCode::kUnavailable);
}

TEST(DynamicBatcher, DestructorFinishesAcceptedTasks) {
  FakeClock clock;
  Recorder model;
  auto task = MakeTask(0, 3);
  {
    auto batcher = MustCreate(MakeOptions(32, absl::Hours(1), 64), model.Fn(), &clock);
    ASSERT_TRUE(batcher->Schedule(task).ok());
  }
  EXPECT_EQ(task->done_calls.load(), 1);
  EXPECT_TRUE(task->result().ok());
}

TEST(DynamicBatcher, ShutdownFromADoneCallbackDoesNotDeadlock) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(1, absl::Hours(1), 64), model.Fn(), &clock);
  DynamicBatcher* raw = batcher.get();
  auto first = MakeTask(0, 1);
  absl::Status late_status;
  first->done = [raw, &late_status](absl::Status) {
    raw->Shutdown();
    late_status = raw->Schedule(MakeTask(9, 1));
  };
  ASSERT_TRUE(batcher->Schedule(first).ok());
  batcher->Shutdown();
  EXPECT_EQ(late_status.code(), absl::StatusCode::kUnavailable);
}

TEST(DynamicBatcher, RunOnceNeedsPuppetMode) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(4, absl::Milliseconds(2), 64), model.Fn(), &clock);
  EXPECT_EQ(batcher->RunOnce().status().code(), absl::StatusCode::kFailedPrecondition);
}

// ---------------------------------------------------------------------------------------------
// Expiry, cancellation, failures

TEST(DynamicBatcher, ExpiredTaskNeverReachesTheModel) {
  FakeClock clock;
  Recorder model;
  RecordingObserver observer;
  auto options = MakeOptions(32, absl::Milliseconds(2), 64);
  options.observer = &observer;
  auto batcher = MustCreate(options, model.Fn(), &clock);
  auto expiring = MakeTask(0, 2, clock.Now() + absl::Milliseconds(1));
  auto living = MakeTask(2, 1, clock.Now() + absl::Milliseconds(3));
  ASSERT_TRUE(batcher->Schedule(expiring).ok());
  ASSERT_TRUE(batcher->Schedule(living).ok());
  clock.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(2)));
  EXPECT_EQ(expiring->done_calls.load(), 1);
  EXPECT_EQ(expiring->result().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(living->done_calls.load(), 1);
  EXPECT_TRUE(living->result().ok());
  EXPECT_THAT(expiring->outputs, ElementsAre(-1, -1));
  BatcherCounters counters = batcher->counters();
  EXPECT_EQ(counters.tasks_expired, 1);
  EXPECT_EQ(counters.items_dropped, 2);
  EXPECT_THAT(observer.dropped(), ElementsAre(std::make_pair(DropReason::kExpired, 2)));
}

TEST(DynamicBatcher, DeadlineIsInclusive) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(32, absl::Milliseconds(2), 64), model.Fn(), &clock);
  auto task = MakeTask(0, 1, clock.Now() + absl::Milliseconds(2));  // expires as the batch forms
  ASSERT_TRUE(batcher->Schedule(task).ok());
  clock.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), IsEmpty());
  EXPECT_EQ(task->result().code(), absl::StatusCode::kDeadlineExceeded);
}

// A task scheduled, already expired, while a batch forms (here from inside the is_cancelled
// check of the task ahead of it, which also moves the clock) is checked against the time after
// it was taken, not a time from before its Schedule().
TEST(DynamicBatcher, ATaskScheduledExpiredWhileTheBatchFormsNeverRuns) {
  FakeClock clock;
  Recorder model;
  auto options = MakeOptions(2, absl::ZeroDuration(), 8, /*thread=*/false);
  options.cancel_poll_interval = absl::ZeroDuration();  // checked only as the batch forms
  auto batcher = MustCreate(options, model.Fn(), &clock);
  std::shared_ptr<TestTask> late;
  auto first = MakeTask(0, 1);
  first->is_cancelled = [&] {
    if (late == nullptr) {
      clock.Advance(absl::Milliseconds(1));
      late = MakeTask(10, 1, clock.Now());
      EXPECT_TRUE(batcher->Schedule(late).ok());
    }
    return true;
  };
  ASSERT_TRUE(batcher->Schedule(first).ok());
  EXPECT_EQ(*batcher->RunOnce(), 0);
  ASSERT_NE(late, nullptr);
  EXPECT_EQ(first->result().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(late->result().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(model.batches(), IsEmpty());
}

TEST(DynamicBatcher, CancelledTaskNeverReachesTheModel) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(32, absl::Milliseconds(2), 64), model.Fn(), &clock);
  auto flag = std::make_shared<std::atomic<bool>>(false);
  auto cancelled = MakeTask(0, 3);
  cancelled->is_cancelled = [flag] { return flag->load(); };
  auto other = MakeTask(3, 1);
  ASSERT_TRUE(batcher->Schedule(cancelled).ok());
  ASSERT_TRUE(batcher->Schedule(other).ok());
  flag->store(true);
  clock.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(3)));
  EXPECT_EQ(cancelled->done_calls.load(), 1);
  EXPECT_EQ(cancelled->result().code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(other->result().ok());
  EXPECT_EQ(batcher->counters().tasks_cancelled, 1);
}

TEST(DynamicBatcher, DroppedTaskLeavesRoomForTheNextItems) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(4, absl::Milliseconds(2), 64, false), model.Fn(), &clock);
  auto cancelled = MakeTask(0, 2);
  cancelled->is_cancelled = [] { return true; };
  auto big = MakeTask(2, 6);
  ASSERT_TRUE(batcher->Schedule(cancelled).ok());
  ASSERT_TRUE(batcher->Schedule(big).ok());
  ASSERT_EQ(*batcher->RunOnce(), 4);  // the batch is topped up to full after the drop
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(2, 3, 4, 5)));
  EXPECT_THAT(model.num_slices(), ElementsAre(1));  // one slice, not two pieces of `big`
  EXPECT_EQ(cancelled->result().code(), absl::StatusCode::kCancelled);
  clock.Advance(absl::Milliseconds(2));
  ASSERT_EQ(*batcher->RunOnce(), 2);
  EXPECT_TRUE(big->result().ok());
  EXPECT_EQ(big->done_calls.load(), 1);
}

TEST(DynamicBatcher, TaskThatExpiresMidwayEndsDeadlineExceeded) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(32, absl::Milliseconds(2), 4096), model.Fn(), &clock);
  auto task = MakeTask(0, 70, clock.Now() + absl::Milliseconds(1));
  ASSERT_TRUE(batcher->Schedule(task).ok());
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.sizes(), ElementsAre(32, 32));
  EXPECT_EQ(task->done_calls.load(), 0);
  clock.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.sizes(), ElementsAre(32, 32));  // the last 6 never ran
  EXPECT_EQ(task->done_calls.load(), 1);
  EXPECT_EQ(task->result().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(batcher->queue_depth(), 0);
  BatcherCounters counters = batcher->counters();
  EXPECT_EQ(counters.items_batched, 64);
  EXPECT_EQ(counters.items_dropped, 6);
}

TEST(DynamicBatcher, FailingBatchFailsOnlyTheTasksInIt) {
  FakeClock clock;
  Recorder model;
  model.FailIf([](const std::vector<int>& ids) {
    return ids.front() == 0 ? absl::InternalError("model exploded") : absl::OkStatus();
  });
  auto batcher = MustCreate(MakeOptions(4, absl::Milliseconds(2), 64, false), model.Fn(), &clock);
  auto a = MakeTask(0, 2);
  auto b = MakeTask(2, 2);
  auto c = MakeTask(4, 4);
  auto d = MakeTask(8, 1);
  for (auto& t : {a, b, c, d}) ASSERT_TRUE(batcher->Schedule(t).ok());
  ASSERT_EQ(*batcher->RunOnce(), 4);
  ASSERT_EQ(*batcher->RunOnce(), 4);
  clock.Advance(absl::Milliseconds(2));
  ASSERT_EQ(*batcher->RunOnce(), 1);
  EXPECT_EQ(a->result(), absl::InternalError("model exploded"));
  EXPECT_EQ(b->result(), absl::InternalError("model exploded"));
  EXPECT_TRUE(c->result().ok());
  EXPECT_TRUE(d->result().ok());
  for (auto& t : {a, b, c, d}) EXPECT_EQ(t->done_calls.load(), 1);
  BatcherCounters counters = batcher->counters();
  EXPECT_EQ(counters.batches, 3);
  EXPECT_EQ(counters.batches_failed, 1);
  EXPECT_EQ(counters.tasks_failed, 2);
  EXPECT_EQ(counters.tasks_succeeded, 2);
}

TEST(DynamicBatcher, FailedSplitTaskDropsItsRestAndEndsAtOnce) {
  FakeClock clock;
  Recorder model;
  model.FailIf([](const std::vector<int>& ids) {
    return ids.front() == 0 ? absl::UnavailableError("device lost") : absl::OkStatus();
  });
  auto batcher = MustCreate(MakeOptions(4, absl::Milliseconds(2), 64, false), model.Fn(), &clock);
  auto split = MakeTask(0, 10);
  auto next = MakeTask(10, 1);
  ASSERT_TRUE(batcher->Schedule(split).ok());
  ASSERT_TRUE(batcher->Schedule(next).ok());
  ASSERT_EQ(*batcher->RunOnce(), 4);
  EXPECT_EQ(split->done_calls.load(), 1);  // not kept waiting for items that cannot help
  EXPECT_EQ(split->result().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(batcher->queue_depth(), 1);
  clock.Advance(absl::Milliseconds(2));
  ASSERT_EQ(*batcher->RunOnce(), 1);
  EXPECT_THAT(model.batches(), ElementsAre(ElementsAre(0, 1, 2, 3), ElementsAre(10)));
  EXPECT_TRUE(next->result().ok());
  EXPECT_EQ(batcher->counters().items_dropped, 6);
}

TEST(DynamicBatcher, SliceStatusFailsOnlyThatTask) {
  FakeClock clock;
  Recorder model;
  model.SetSliceStatus([](const BatchSlice& slice) {
    auto* task = static_cast<TestTask*>(slice.task);
    return task->ids.front() == 2 ? absl::InvalidArgumentError("face 1: unusable crop")
                                  : absl::OkStatus();
  });
  auto batcher = MustCreate(MakeOptions(8, absl::Milliseconds(2), 64, false), model.Fn(), &clock);
  auto a = MakeTask(0, 2);
  auto bad = MakeTask(2, 2);
  auto c = MakeTask(4, 2);
  for (auto& t : {a, bad, c}) ASSERT_TRUE(batcher->Schedule(t).ok());
  clock.Advance(absl::Milliseconds(2));
  ASSERT_EQ(*batcher->RunOnce(), 6);
  EXPECT_TRUE(a->result().ok());
  EXPECT_EQ(bad->result(), absl::InvalidArgumentError("face 1: unusable crop"));
  EXPECT_TRUE(c->result().ok());
}

TEST(DynamicBatcher, DoneReleasesTheTask) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(1, absl::Milliseconds(2), 64), model.Fn(), &clock);
  std::weak_ptr<TestTask> weak;
  std::atomic<int> calls{0};
  {
    auto task = MakeTask(0, 1);
    weak = task;
    // A done that keeps its own task alive, as a gRPC reactor might.
    task->done = [task, &calls](absl::Status) { calls.fetch_add(1); };
    ASSERT_TRUE(batcher->Schedule(std::move(task)).ok());
  }
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_EQ(calls.load(), 1);
  EXPECT_TRUE(weak.expired());
}

// A rejected task's `done` is destroyed before Schedule() returns, whatever the reason, so a
// `done` that holds its own task (as a caller keeping its call state alive does) cannot leak it.
TEST(DynamicBatcher, ARejectedTaskReleasesItsDoneForEveryReason) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(4, absl::Milliseconds(2), 8, /*thread=*/false),
                            model.Fn(), &clock);
  std::vector<std::shared_ptr<TestTask>> queued;
  for (int i = 0; i < 4; ++i) {
    queued.push_back(MakeTask(2 * i, 2));
    ASSERT_TRUE(batcher->Schedule(queued.back()).ok());
  }
  std::atomic<int> calls{0};
  // Schedules a task of n items whose `done` holds the task itself, keeping no other reference.
  auto schedule_self_holding = [&](int n) {
    auto task = MakeTask(100, std::max(n, 0));
    task->num_items = n;
    std::weak_ptr<TestTask> weak = task;
    task->done = [task, &calls](absl::Status) { calls.fetch_add(1); };
    const absl::StatusCode code = batcher->Schedule(std::move(task)).code();
    return std::make_pair(code, weak);
  };

  auto [full, full_weak] = schedule_self_holding(1);
  EXPECT_EQ(full, absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(full_weak.expired()) << "queue full";
  auto [large, large_weak] = schedule_self_holding(9);
  EXPECT_EQ(large, absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(large_weak.expired()) << "too large";
  auto [empty, empty_weak] = schedule_self_holding(0);
  EXPECT_EQ(empty, absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(empty_weak.expired()) << "no items";
  auto [negative, negative_weak] = schedule_self_holding(-2);
  EXPECT_EQ(negative, absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(negative_weak.expired()) << "negative items";

  // A caller that keeps its task: the `done` (and what it holds) is gone all the same.
  auto kept = MakeTask(200, 1);
  auto sentinel = std::make_shared<int>(0);
  kept->done = [sentinel, &calls](absl::Status) { calls.fetch_add(1); };
  EXPECT_EQ(batcher->Schedule(kept).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(kept->done);
  EXPECT_EQ(sentinel.use_count(), 1);

  batcher->Shutdown();
  auto [down, down_weak] = schedule_self_holding(1);
  EXPECT_EQ(down, absl::StatusCode::kUnavailable);
  EXPECT_TRUE(down_weak.expired()) << "shutting down";

  EXPECT_EQ(calls.load(), 0);
  for (auto& t : queued) EXPECT_TRUE(t->result().ok());
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.rejected_queue_full, 2);
  EXPECT_EQ(c.rejected_too_large, 1);
  EXPECT_EQ(c.rejected_invalid, 2);
  EXPECT_EQ(c.rejected_shutting_down, 1);
}

// The documented retry: a task refused for a full queue is scheduled again with a new `done`.
TEST(DynamicBatcher, ARejectedTaskIsRetriedWithANewDone) {
  FakeClock clock;
  Recorder model;
  auto batcher = MustCreate(MakeOptions(2, absl::Milliseconds(2), 2, /*thread=*/false),
                            model.Fn(), &clock);
  ASSERT_TRUE(batcher->Schedule(MakeTask(0, 2)).ok());
  auto retried = MakeTask(2, 1);
  ASSERT_EQ(batcher->Schedule(retried).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_EQ(*batcher->RunOnce(), 2);
  EXPECT_EQ(batcher->Schedule(retried).code(), absl::StatusCode::kInvalidArgument);  // no done
  absl::Status got = absl::UnknownError("not called");
  retried->done = [&got](absl::Status status) { got = std::move(status); };
  ASSERT_TRUE(batcher->Schedule(retried).ok());
  clock.Advance(absl::Milliseconds(2));
  ASSERT_EQ(*batcher->RunOnce(), 1);
  EXPECT_TRUE(got.ok()) << got;
  EXPECT_THAT(retried->outputs, ElementsAre(20));
}

TEST(DynamicBatcher, CountersBalance) {
  FakeClock clock;
  Recorder model;
  model.FailIf([](const std::vector<int>& ids) {
    return ids.front() == 20 ? absl::InternalError("x") : absl::OkStatus();
  });
  auto batcher = MustCreate(MakeOptions(4, absl::Milliseconds(2), 16, false), model.Fn(), &clock);
  auto cancelled = MakeTask(0, 3);
  cancelled->is_cancelled = [] { return true; };
  ASSERT_TRUE(batcher->Schedule(cancelled).ok());
  ASSERT_TRUE(batcher->Schedule(MakeTask(3, 5, clock.Now() + absl::Milliseconds(1))).ok());
  ASSERT_TRUE(batcher->Schedule(MakeTask(20, 6)).ok());
  ASSERT_TRUE(batcher->Schedule(MakeTask(30, 2)).ok());
  EXPECT_FALSE(batcher->Schedule(MakeTask(40, 1)).ok());  // 16 queued
  clock.Advance(absl::Milliseconds(5));
  batcher->Shutdown();
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.tasks_accepted, 4);
  EXPECT_EQ(c.tasks_accepted, c.tasks_succeeded + c.tasks_failed + c.tasks_expired +
                                  c.tasks_cancelled);
  EXPECT_EQ(c.items_accepted, 16);
  EXPECT_EQ(c.items_accepted, c.items_batched + c.items_dropped);
  EXPECT_EQ(c.tasks_cancelled, 1);
  EXPECT_EQ(c.tasks_expired, 1);
  EXPECT_EQ(c.tasks_failed, 1);
  EXPECT_EQ(c.tasks_succeeded, 1);
  EXPECT_EQ(c.rejected_queue_full, 1);
  EXPECT_EQ(batcher->queue_depth(), 0);
}

// ---------------------------------------------------------------------------------------------
// The pipeline: the next batch is formed and staged while the model runs the current one.

// Stages each item's id (an int) at the item's position in batch.staging, and counts what it
// staged, so that a test can wait for staging and the model can check its input is in place.
class Stager {
 public:
  StageFn Fn() {
    return [this](Batch& batch, int first_item) { Stage(batch, first_item); };
  }
  void Stage(Batch& batch, int first_item) {
    batch.staging.resize(size_t(batch.size) * sizeof(int));
    int position = 0;
    for (const BatchSlice& slice : batch.slices) {
      auto* task = static_cast<TestTask*>(slice.task);
      for (int i = 0; i < slice.num_items; ++i, ++position) {
        if (position < first_item) continue;
        std::memcpy(batch.staging.data() + size_t(position) * sizeof(int),
                    &task->ids[slice.first_item + i], sizeof(int));
      }
    }
    absl::MutexLock lock(&mu_);
    staged_ += batch.size - first_item;
    calls_.emplace_back(first_item, batch.size);
  }
  bool WaitForStaged(int total) {
    absl::MutexLock lock(&mu_);
    auto reached = [this, total]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return staged_ >= total; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kSafety);
  }
  // (first_item, batch size) of each call.
  std::vector<std::pair<int, int>> calls() {
    absl::MutexLock lock(&mu_);
    return calls_;
  }

 private:
  absl::Mutex mu_;
  int staged_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::pair<int, int>> calls_ ABSL_GUARDED_BY(mu_);
};

std::vector<int> StagedIds(const Batch& batch) {
  std::vector<int> ids(batch.size);
  EXPECT_GE(batch.staging.size(), ids.size() * sizeof(int));
  if (batch.staging.size() >= ids.size() * sizeof(int)) {
    std::memcpy(ids.data(), batch.staging.data(), ids.size() * sizeof(int));
  }
  return ids;
}

std::vector<int> SliceIds(const Batch& batch) {
  std::vector<int> ids;
  for (const BatchSlice& slice : batch.slices) {
    auto* task = static_cast<TestTask*>(slice.task);
    for (int i = 0; i < slice.num_items; ++i) ids.push_back(task->ids[slice.first_item + i]);
  }
  return ids;
}

// The model for pipeline tests: batch k (from 1) waits in the BatchFn until the test allowed k
// batches; every batch checks that its staged input matches its items, in order.
class GatedModel {
 public:
  BatchFn Fn() {
    return [this](Batch& batch) {
      {
        absl::MutexLock lock(&mu_);
        const int k = ++entered_;
        auto allowed = [this, k]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return allowed_ >= k; };
        mu_.AwaitWithTimeout(absl::Condition(&allowed), kSafety);
      }
      EXPECT_EQ(StagedIds(batch), SliceIds(batch));
      return recorder.Run(batch);
    };
  }
  bool WaitEntered(int k) {
    absl::MutexLock lock(&mu_);
    auto reached = [this, k]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return entered_ >= k; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kSafety);
  }
  int entered() {
    absl::MutexLock lock(&mu_);
    return entered_;
  }
  void Allow(int k) {
    absl::MutexLock lock(&mu_);
    allowed_ = k;
  }

  Recorder recorder;

 private:
  absl::Mutex mu_;
  int entered_ ABSL_GUARDED_BY(mu_) = 0;
  int allowed_ ABSL_GUARDED_BY(mu_) = 0;
};

std::unique_ptr<DynamicBatcher> MustCreateStaged(const DynamicBatcher::Options& options,
                                                 BatchFn fn, Clock* clock, Stager& stager) {
  auto batcher = DynamicBatcher::Create(options, std::move(fn), clock, stager.Fn());
  EXPECT_TRUE(batcher.ok()) << batcher.status();
  return batcher.ok() ? std::move(*batcher) : nullptr;
}

TEST(DynamicBatcherPipeline, NextBatchIsStagedWhileTheModelRuns) {
  FakeClock clock;
  GatedModel model;
  Stager stager;
  RecordingObserver observer;
  auto options = MakeOptions(4, absl::Milliseconds(2), 64);
  options.observer = &observer;
  auto batcher = MustCreateStaged(options, model.Fn(), &clock, stager);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(batcher->Schedule(MakeTask(i, 1)).ok());
  ASSERT_TRUE(model.WaitEntered(1));  // a full batch: in the model at once

  auto next = MakeTask(4, 3);
  ASSERT_TRUE(batcher->Schedule(next).ok());
  // Staged while the first batch is still in the model...
  ASSERT_TRUE(stager.WaitForStaged(4 + 3));
  EXPECT_EQ(model.entered(), 1);
  // ...yet still queued: it takes queue room and is checked for expiry at the hand-over.
  EXPECT_EQ(batcher->queue_depth(), 3);
  clock.Advance(absl::Milliseconds(2));  // due now, but the model is busy
  EXPECT_EQ(model.entered(), 1);

  model.Allow(2);
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.recorder.batches(), ElementsAre(ElementsAre(0, 1, 2, 3), ElementsAre(4, 5, 6)));
  EXPECT_EQ(next->done_calls.load(), 1);
  EXPECT_THAT(next->outputs, ElementsAre(40, 50, 60));
  // The first batch was staged when it formed, the second entirely ahead; nothing twice.
  EXPECT_THAT(stager.calls(), ElementsAre(std::pair(0, 4), std::pair(0, 3)));
  auto stages = observer.stages();
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_EQ(stages[0].items_staged_ahead, 0);
  EXPECT_FALSE(stages[0].model_idle.has_value());
  EXPECT_EQ(stages[1].items_staged_ahead, 3);
  // The first batch ended at the clock's current time and the second began then: no gap.
  EXPECT_EQ(stages[1].model_idle, absl::ZeroDuration());
  EXPECT_THAT(observer.waits()[1], ElementsAre(absl::Milliseconds(2), absl::Milliseconds(2),
                                               absl::Milliseconds(2)));
}

TEST(DynamicBatcherPipeline, ADropAtTheHandOverRestagesTheItemsBehindIt) {
  FakeClock clock;
  GatedModel model;
  Stager stager;
  RecordingObserver observer;
  auto options = MakeOptions(4, absl::Milliseconds(2), 64);
  options.observer = &observer;
  auto batcher = MustCreateStaged(options, model.Fn(), &clock, stager);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(batcher->Schedule(MakeTask(i, 1)).ok());
  ASSERT_TRUE(model.WaitEntered(1));

  auto a = MakeTask(4, 2);
  auto b = MakeTask(6, 1);
  std::atomic<bool> b_cancelled{false};
  b->is_cancelled = [&b_cancelled] { return b_cancelled.load(); };
  auto c = MakeTask(7, 1);
  auto d = MakeTask(8, 1);
  for (auto& t : {a, b, c, d}) ASSERT_TRUE(batcher->Schedule(t).ok());
  ASSERT_TRUE(stager.WaitForStaged(4 + 4));  // a, b, c: the open batch is full; d waits
  b_cancelled.store(true);

  model.Allow(2);
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  // b left at the hand-over; c moved up and was staged again; d topped the batch up.
  EXPECT_THAT(model.recorder.batches(), ElementsAre(ElementsAre(0, 1, 2, 3), ElementsAre(4, 5, 7, 8)));
  // (How the staging ahead was split depends on when the batch thread woke; the last call is
  // the restaging from c's new place.)
  auto calls = stager.calls();
  ASSERT_GE(calls.size(), 3u);
  EXPECT_EQ(calls.back(), std::pair(2, 4));
  EXPECT_EQ(b->done_calls.load(), 1);
  EXPECT_EQ(b->result().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(b->outputs[0], -1);
  for (auto& t : {a, c, d}) EXPECT_TRUE(t->result().ok());
  auto stages = observer.stages();
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_EQ(stages[1].items_staged_ahead, 2);  // a's; c's place changed after the drop
  BatcherCounters counters = batcher->counters();
  EXPECT_EQ(counters.tasks_cancelled, 1);
  EXPECT_EQ(counters.items_dropped, 1);
  EXPECT_EQ(counters.items_batched, 8);
}

TEST(DynamicBatcherPipeline, AFailedTaskLeavesTheNextBatchAtOnce) {
  FakeClock clock;
  GatedModel model;
  Stager stager;
  auto batcher = MustCreateStaged(MakeOptions(4, absl::Milliseconds(2), 64), model.Fn(), &clock,
                                  stager);
  model.recorder.FailIf([](const std::vector<int>& ids) {
    return ids[0] == 0 ? absl::InternalError("model failed") : absl::OkStatus();
  });
  auto split = MakeTask(0, 6);  // 4 in the failing batch, 2 staged behind it
  auto other = MakeTask(6, 1);
  ASSERT_TRUE(batcher->Schedule(split).ok());
  ASSERT_TRUE(model.WaitEntered(1));
  ASSERT_TRUE(batcher->Schedule(other).ok());
  ASSERT_TRUE(stager.WaitForStaged(4 + 3));

  model.Allow(2);
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_EQ(split->done_calls.load(), 1);
  EXPECT_EQ(split->result().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(batcher->queue_depth(), 1);  // `other` alone, now restaged at the front
  clock.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(model.recorder.batches(), ElementsAre(ElementsAre(0, 1, 2, 3), ElementsAre(6)));
  EXPECT_TRUE(other->result().ok());
  BatcherCounters counters = batcher->counters();
  EXPECT_EQ(counters.tasks_failed, 1);
  EXPECT_EQ(counters.tasks_succeeded, 1);
  EXPECT_EQ(counters.items_dropped, 2);
  EXPECT_EQ(counters.items_accepted, counters.items_batched + counters.items_dropped);
}

TEST(DynamicBatcherPipeline, ModelIdleIsTheGapBetweenBatches) {
  FakeClock clock;
  Recorder model;
  RecordingObserver observer;
  auto options = MakeOptions(2, absl::Milliseconds(1), 64);
  options.observer = &observer;
  auto batcher = MustCreate(options, model.Fn(), &clock);
  ASSERT_TRUE(batcher->Schedule(MakeTask(0, 2)).ok());
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  clock.Advance(absl::Milliseconds(5));
  ASSERT_TRUE(batcher->Schedule(MakeTask(2, 1)).ok());
  clock.Advance(absl::Milliseconds(1));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  auto stages = observer.stages();
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_FALSE(stages[0].model_idle.has_value());
  EXPECT_EQ(stages[1].model_idle, absl::Milliseconds(6));
  EXPECT_EQ(stages[1].items_staged_ahead, 0);  // the model was idle: nothing to stage ahead of
}

// ---------------------------------------------------------------------------------------------
// Expired and cancelled tasks give back their queue room at their deadline / the next poll,
// while the model is busy, not when their items reach the hand-over.

// A model busy on the batch [0 1 2 3] (held in the BatchFn), a queue of 8 and batches of 4.
struct BusyModelFixture {
  explicit BusyModelFixture(absl::Duration poll = absl::Milliseconds(20)) {
    auto options = MakeOptions(4, absl::Milliseconds(2), 8);
    options.observer = &observer;
    options.cancel_poll_interval = poll;
    batcher = MustCreateStaged(options, model.Fn(), &clock, stager);
    for (int i = 0; i < 4; ++i) EXPECT_TRUE(batcher->Schedule(MakeTask(i, 1)).ok());
    EXPECT_TRUE(model.WaitEntered(1));
  }

  FakeClock clock;
  GatedModel model;
  Stager stager;
  RecordingObserver observer;
  std::unique_ptr<DynamicBatcher> batcher;
};

TEST(DynamicBatcherSweep, ExpiredTasksGiveBackTheirRoomAtTheirDeadline) {
  BusyModelFixture f;
  std::vector<std::shared_ptr<TestTask>> short_lived;
  for (int i = 0; i < 4; ++i) {
    short_lived.push_back(MakeTask(10 + 2 * i, 2, f.clock.Now() + absl::Milliseconds(1)));
    ASSERT_TRUE(f.batcher->Schedule(short_lived.back()).ok());
  }
  ASSERT_TRUE(f.stager.WaitForStaged(4 + 4));  // half of them staged as the next batch
  EXPECT_EQ(f.batcher->queue_depth(), 8);
  EXPECT_EQ(f.batcher->Schedule(MakeTask(100, 2)).code(), absl::StatusCode::kResourceExhausted);

  f.clock.Advance(absl::Milliseconds(1) - absl::Microseconds(1));
  ASSERT_TRUE(f.batcher->WaitUntilBatchThreadIdle(kSafety));
  EXPECT_EQ(f.batcher->queue_depth(), 8);
  for (auto& t : short_lived) EXPECT_EQ(t->done_calls.load(), 0);

  f.clock.Advance(absl::Microseconds(1));
  ASSERT_TRUE(f.batcher->WaitUntilBatchThreadIdle(kSafety));
  EXPECT_EQ(f.batcher->queue_depth(), 0);
  for (auto& t : short_lived) {
    EXPECT_EQ(t->done_calls.load(), 1);
    EXPECT_EQ(t->result().code(), absl::StatusCode::kDeadlineExceeded) << t->result();
    EXPECT_THAT(t->result().message(), HasSubstr("after 0 of 2 items ran"));
  }
  EXPECT_EQ(f.model.entered(), 1);  // without the model running anything
  EXPECT_THAT(f.observer.dropped(), ElementsAre(std::pair(DropReason::kExpired, 2),
                                                std::pair(DropReason::kExpired, 2),
                                                std::pair(DropReason::kExpired, 2),
                                                std::pair(DropReason::kExpired, 2)));

  auto live = MakeTask(100, 2);
  ASSERT_TRUE(f.batcher->Schedule(live).ok());
  f.model.Allow(2);
  f.clock.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(f.batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(f.model.recorder.batches(),
              ElementsAre(ElementsAre(0, 1, 2, 3), ElementsAre(100, 101)));
  EXPECT_TRUE(live->result().ok());
  for (auto& t : short_lived) EXPECT_THAT(t->outputs, ElementsAre(-1, -1));
  BatcherCounters c = f.batcher->counters();
  EXPECT_EQ(c.tasks_expired, 4);
  EXPECT_EQ(c.items_dropped, 8);
  EXPECT_EQ(c.tasks_succeeded, 5);
  EXPECT_EQ(c.rejected_queue_full, 1);
  EXPECT_EQ(c.tasks_accepted, c.tasks_succeeded + c.tasks_failed + c.tasks_expired +
                                  c.tasks_cancelled);
  EXPECT_EQ(c.items_accepted, c.items_batched + c.items_dropped);
}

TEST(DynamicBatcherSweep, CancelledTasksGiveBackTheirRoomWithinOnePollInterval) {
  BusyModelFixture f(/*poll=*/absl::Milliseconds(10));
  std::atomic<bool> cancelled{false};
  std::atomic<int> polls{0};
  std::vector<std::shared_ptr<TestTask>> doomed;
  for (int i = 0; i < 4; ++i) {
    doomed.push_back(MakeTask(10 + 2 * i, 2));
    doomed.back()->is_cancelled = [&] {
      polls.fetch_add(1);
      return cancelled.load();
    };
    ASSERT_TRUE(f.batcher->Schedule(doomed.back()).ok());
  }
  EXPECT_EQ(f.batcher->Schedule(MakeTask(100, 2)).code(), absl::StatusCode::kResourceExhausted);
  cancelled.store(true);

  f.clock.Advance(absl::Milliseconds(10) - absl::Microseconds(1));
  ASSERT_TRUE(f.batcher->WaitUntilBatchThreadIdle(kSafety));
  EXPECT_EQ(f.batcher->queue_depth(), 8);
  EXPECT_EQ(polls.load(), 0);
  for (auto& t : doomed) EXPECT_EQ(t->done_calls.load(), 0);

  f.clock.Advance(absl::Microseconds(1));
  ASSERT_TRUE(f.batcher->WaitUntilBatchThreadIdle(kSafety));
  EXPECT_EQ(f.batcher->queue_depth(), 0);
  EXPECT_EQ(polls.load(), 4);  // each task once
  for (auto& t : doomed) {
    EXPECT_EQ(t->done_calls.load(), 1);
    EXPECT_EQ(t->result().code(), absl::StatusCode::kCancelled) << t->result();
  }
  EXPECT_EQ(f.model.entered(), 1);

  auto live = MakeTask(100, 2);
  ASSERT_TRUE(f.batcher->Schedule(live).ok());
  f.model.Allow(2);
  f.clock.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(f.batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(f.model.recorder.batches(),
              ElementsAre(ElementsAre(0, 1, 2, 3), ElementsAre(100, 101)));
  BatcherCounters c = f.batcher->counters();
  EXPECT_EQ(c.tasks_cancelled, 4);
  EXPECT_EQ(c.items_dropped, 8);
  EXPECT_EQ(c.items_accepted, c.items_batched + c.items_dropped);
}

TEST(DynamicBatcherSweep, ZeroPollIntervalChecksCancellationOnlyAtTheHandOver) {
  BusyModelFixture f(/*poll=*/absl::ZeroDuration());
  auto doomed = MakeTask(10, 2);
  doomed->is_cancelled = [] { return true; };
  ASSERT_TRUE(f.batcher->Schedule(doomed).ok());
  f.clock.Advance(absl::Seconds(10));
  ASSERT_TRUE(f.batcher->WaitUntilBatchThreadIdle(kSafety));
  EXPECT_EQ(doomed->done_calls.load(), 0);
  EXPECT_EQ(f.batcher->queue_depth(), 2);
  f.model.Allow(2);
  ASSERT_TRUE(f.batcher->WaitUntilIdle(kSafety));
  EXPECT_EQ(doomed->result().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(f.model.entered(), 1);
}

// A task dropped out of the staged next batch: the items behind it move up and are staged again
// while the model still runs, and the batch that finally runs holds exactly the right items in
// the right places (GatedModel checks the staged input against the slices).
TEST(DynamicBatcherSweep, AnExpiryInTheStagedBatchRestagesTheItemsBehindIt) {
  BusyModelFixture f;
  auto a = MakeTask(4, 2);
  auto b = MakeTask(6, 1, f.clock.Now() + absl::Milliseconds(1));
  auto c = MakeTask(7, 1);
  auto d = MakeTask(8, 1);
  for (auto& t : {a, b, c, d}) ASSERT_TRUE(f.batcher->Schedule(t).ok());
  ASSERT_TRUE(f.stager.WaitForStaged(4 + 4));  // [4 5 6 7] staged; d queued
  f.clock.Advance(absl::Milliseconds(1));
  ASSERT_TRUE(f.batcher->WaitUntilBatchThreadIdle(kSafety));
  EXPECT_EQ(b->done_calls.load(), 1);
  EXPECT_EQ(b->result().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(f.batcher->queue_depth(), 4);
  // c restaged from its new place 2, d taken in behind it.
  EXPECT_EQ(f.stager.calls().back(), std::pair(2, 4));
  EXPECT_EQ(f.model.entered(), 1);

  f.model.Allow(2);
  ASSERT_TRUE(f.batcher->WaitUntilIdle(kSafety));
  EXPECT_THAT(f.model.recorder.batches(),
              ElementsAre(ElementsAre(0, 1, 2, 3), ElementsAre(4, 5, 7, 8)));
  for (auto& t : {a, c, d}) EXPECT_TRUE(t->result().ok());
  EXPECT_THAT(b->outputs, ElementsAre(-1));
  auto stages = f.observer.stages();
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_EQ(stages[1].items_staged_ahead, 4);  // all of it, restaging included, ahead
}

// A task with items in the model expires: its waiting rest leaves the queue at once, but `done`
// waits for the items in the model, and comes exactly once.
TEST(DynamicBatcherSweep, ATaskExpiringWithItemsInTheModelEndsOnceTheyAreBack) {
  FakeClock clock;
  GatedModel model;
  Stager stager;
  auto batcher = MustCreateStaged(MakeOptions(4, absl::Milliseconds(2), 8), model.Fn(), &clock,
                                  stager);
  auto task = MakeTask(0, 6, clock.Now() + absl::Milliseconds(1));
  ASSERT_TRUE(batcher->Schedule(task).ok());
  ASSERT_TRUE(model.WaitEntered(1));        // [0 1 2 3] in the model
  ASSERT_TRUE(stager.WaitForStaged(4 + 2));  // [4 5] staged
  clock.Advance(absl::Milliseconds(1));
  ASSERT_TRUE(batcher->WaitUntilBatchThreadIdle(kSafety));
  EXPECT_EQ(batcher->queue_depth(), 0);
  EXPECT_EQ(task->done_calls.load(), 0);
  model.Allow(2);
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_EQ(task->done_calls.load(), 1);
  EXPECT_EQ(task->result().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(task->result().message(), HasSubstr("after 4 of 6 items ran"));
  EXPECT_THAT(task->outputs, ElementsAre(0, 10, 20, 30, -1, -1));
  EXPECT_EQ(model.entered(), 1);
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.tasks_expired, 1);
  EXPECT_EQ(c.items_batched, 4);
  EXPECT_EQ(c.items_dropped, 2);
}

// Puppet mode: RunOnce() ends the expired and (at a poll) cancelled tasks even when no batch is
// due, so the layer above can test the same thing step by step.
TEST(DynamicBatcherSweep, RunOnceSweepsWhenNoBatchIsDue) {
  FakeClock clock;
  Recorder model;
  auto options = MakeOptions(8, absl::Seconds(1), 8, /*thread=*/false);
  options.cancel_poll_interval = absl::Milliseconds(10);
  auto batcher = MustCreate(options, model.Fn(), &clock);
  auto keep = MakeTask(0, 1);
  auto expiring = MakeTask(1, 2, clock.Now() + absl::Milliseconds(5));
  auto doomed = MakeTask(3, 1);
  doomed->is_cancelled = [] { return true; };
  for (auto& t : {keep, expiring, doomed}) ASSERT_TRUE(batcher->Schedule(t).ok());

  clock.Advance(absl::Milliseconds(5));
  EXPECT_EQ(*batcher->RunOnce(), 0);
  EXPECT_EQ(expiring->result().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(doomed->done_calls.load(), 0);
  EXPECT_EQ(batcher->queue_depth(), 2);

  clock.Advance(absl::Milliseconds(5) - absl::Microseconds(1));
  EXPECT_EQ(*batcher->RunOnce(), 0);
  EXPECT_EQ(doomed->done_calls.load(), 0);
  clock.Advance(absl::Microseconds(1));
  EXPECT_EQ(*batcher->RunOnce(), 0);
  EXPECT_EQ(doomed->result().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(batcher->queue_depth(), 1);
  EXPECT_THAT(model.batches(), IsEmpty());

  clock.Advance(absl::Seconds(1));
  EXPECT_EQ(*batcher->RunOnce(), 1);
  EXPECT_TRUE(keep->result().ok());
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.tasks_expired, 1);
  EXPECT_EQ(c.tasks_cancelled, 1);
  EXPECT_EQ(c.tasks_succeeded, 1);
}

// ---------------------------------------------------------------------------------------------
// Several batches in flight (max_batches_in_flight > 1): the batch thread hands a formed batch
// to whichever model thread is free and finishes batches in the order they come back.

// The model for these tests: each batch waits in the BatchFn until the test releases it by its
// first item's id, so batches can be made to finish in any order. (Not by order of entry: two
// model threads that took their batches in order may still enter the BatchFn the other way
// round.)
class LaneModel {
 public:
  BatchFn Fn() {
    return [this](Batch& batch) {
      const int first_id = SliceIds(batch).front();
      {
        absl::MutexLock lock(&mu_);
        ++entered_;
        ++inside_;
        max_inside_ = std::max(max_inside_, inside_);
        auto released = [this, first_id]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return release_all_ || std::find(released_.begin(), released_.end(), first_id) !=
                                     released_.end();
        };
        mu_.AwaitWithTimeout(absl::Condition(&released), kSafety);
      }
      EXPECT_EQ(StagedIds(batch), SliceIds(batch));
      absl::Status status = recorder.Run(batch);
      absl::MutexLock lock(&mu_);
      --inside_;
      return status;
    };
  }
  bool WaitEntered(int k) {
    absl::MutexLock lock(&mu_);
    auto reached = [this, k]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return entered_ >= k; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kSafety);
  }
  int entered() {
    absl::MutexLock lock(&mu_);
    return entered_;
  }
  int max_inside() {
    absl::MutexLock lock(&mu_);
    return max_inside_;
  }
  // Lets the batch whose first item has this id return (now or when it arrives).
  void Release(int first_id) {
    absl::MutexLock lock(&mu_);
    released_.push_back(first_id);
  }
  void ReleaseAll() {
    absl::MutexLock lock(&mu_);
    release_all_ = true;
  }

  Recorder recorder;

 private:
  absl::Mutex mu_;
  int entered_ ABSL_GUARDED_BY(mu_) = 0;
  int inside_ ABSL_GUARDED_BY(mu_) = 0;
  int max_inside_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<int> released_ ABSL_GUARDED_BY(mu_);
  bool release_all_ ABSL_GUARDED_BY(mu_) = false;
};

// Counts the batches the batcher finished (OnBatch comes after their tasks' `done`), so a test
// can wait for one while another is still in the model (WaitUntilIdle would wait for both).
class FinishedBatches : public BatcherObserver {
 public:
  void OnBatch(const BatchInfo& info) override {
    absl::MutexLock lock(&mu_);
    ++finished_;
  }
  void OnDropped(DropReason reason, int num_items_dropped) override {
    absl::MutexLock lock(&mu_);
    dropped_.emplace_back(reason, num_items_dropped);
  }
  bool WaitFinished(int n) {
    absl::MutexLock lock(&mu_);
    auto reached = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return finished_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), kSafety);
  }
  std::vector<std::pair<DropReason, int>> dropped() {
    absl::MutexLock lock(&mu_);
    return dropped_;
  }

 private:
  absl::Mutex mu_;
  int finished_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::pair<DropReason, int>> dropped_ ABSL_GUARDED_BY(mu_);
};

DynamicBatcher::Options LaneOptions(int lanes, int max_batch,
                                    BatcherObserver* observer = nullptr) {
  auto options = MakeOptions(max_batch, absl::Milliseconds(2), 64);
  options.max_batches_in_flight = lanes;
  options.observer = observer;
  return options;
}

TEST(DynamicBatcherLanes, FactoryChecksTheNumberOfBatchesInFlight) {
  FakeClock clock;
  Recorder model;
  EXPECT_EQ(DynamicBatcher::Options().max_batches_in_flight, 1);
  for (int bad : {0, -1, DynamicBatcher::kMaxBatchesInFlight + 1}) {
    auto batcher = DynamicBatcher::Create(LaneOptions(bad, 4), model.Fn(), &clock);
    ASSERT_FALSE(batcher.ok()) << bad;
    EXPECT_EQ(batcher.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(batcher.status().message(), HasSubstr("max_batches_in_flight"));
    EXPECT_THAT(batcher.status().message(), HasSubstr(absl::StrCat("got ", bad)));
  }
  EXPECT_EQ(DynamicBatcher::kMaxBatchesInFlight, 16);
  for (int good : {1, 2, DynamicBatcher::kMaxBatchesInFlight}) {
    auto batcher = DynamicBatcher::Create(LaneOptions(good, 4), model.Fn(), &clock);
    EXPECT_TRUE(batcher.ok()) << good << ": " << batcher.status();
  }
}

TEST(DynamicBatcherLanes, TwoBatchesRunAtOnceAndAThirdWaitsStaged) {
  FakeClock clock;
  LaneModel model;
  Stager stager;
  FinishedBatches finished;
  auto batcher = MustCreateStaged(LaneOptions(2, 2, &finished), model.Fn(), &clock, stager);
  std::vector<std::shared_ptr<TestTask>> tasks;
  for (int i = 0; i < 3; ++i) {
    tasks.push_back(MakeTask(10 * i, 2));
    ASSERT_TRUE(batcher->Schedule(tasks.back()).ok());
  }
  ASSERT_TRUE(model.WaitEntered(2));  // both full batches entered the BatchFn, neither returned
  // The third is formed and staged while both run, but no model thread is free for it.
  ASSERT_TRUE(stager.WaitForStaged(6));
  clock.Advance(absl::Milliseconds(5));  // due by time too
  EXPECT_EQ(model.entered(), 2);
  EXPECT_EQ(batcher->queue_depth(), 2);  // staged items still count as queued
  for (auto& t : tasks) EXPECT_EQ(t->done_calls.load(), 0);

  // The second batch returns first: its task ends and the third batch takes the free thread.
  model.Release(10);
  ASSERT_TRUE(model.WaitEntered(3));
  model.Release(20);
  ASSERT_TRUE(finished.WaitFinished(2));  // the first batch is still in the model
  EXPECT_EQ(tasks[1]->done_calls.load(), 1);
  EXPECT_EQ(tasks[2]->done_calls.load(), 1);
  EXPECT_EQ(tasks[0]->done_calls.load(), 0);
  model.Release(0);
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(tasks[i]->done_calls.load(), 1) << i;
    EXPECT_TRUE(tasks[i]->result().ok()) << i;
    EXPECT_THAT(tasks[i]->outputs, ElementsAre(100 * i, 100 * i + 10)) << i;
  }
  EXPECT_EQ(model.max_inside(), 2);
  // Batches are formed in FIFO order even though they came back out of order.
  // (The recorder lists batches in the order they ran to the end.)
  EXPECT_THAT(model.recorder.batches(),
              ElementsAre(ElementsAre(10, 11), ElementsAre(20, 21), ElementsAre(0, 1)));
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.batches, 3);
  EXPECT_EQ(c.tasks_succeeded, 3);
}

TEST(DynamicBatcherLanes, ASplitTaskEndsOnceAfterItsBatchesReturnOutOfOrder) {
  FakeClock clock;
  LaneModel model;
  Stager stager;
  FinishedBatches finished;
  auto batcher = MustCreateStaged(LaneOptions(2, 2, &finished), model.Fn(), &clock, stager);
  auto task = MakeTask(0, 5);  // batches [0 1] [2 3] [4]
  ASSERT_TRUE(batcher->Schedule(task).ok());
  ASSERT_TRUE(model.WaitEntered(2));
  model.Release(2);
  clock.Advance(absl::Milliseconds(2));  // [4] alone is due by time
  ASSERT_TRUE(model.WaitEntered(3));     // and went to the thread [2 3] freed
  model.Release(4);
  ASSERT_TRUE(finished.WaitFinished(2));
  EXPECT_EQ(task->done_calls.load(), 0);  // [0 1] is still in the model
  model.Release(0);
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_EQ(task->done_calls.load(), 1);
  EXPECT_TRUE(task->result().ok());
  EXPECT_THAT(task->outputs, ElementsAre(0, 10, 20, 30, 40));
  EXPECT_THAT(model.recorder.batches(),
              ElementsAre(ElementsAre(2, 3), ElementsAre(4), ElementsAre(0, 1)));
}

// A task is dropped (cancelled or expired) at the hand-over of its last batch while an earlier
// batch of it is still in the model: its rest never runs, and `done` waits for that batch.
void DropWhileInFlight(bool cancel) {
  FakeClock clock;
  LaneModel model;
  Stager stager;
  FinishedBatches finished;
  auto batcher = MustCreateStaged(LaneOptions(2, 2, &finished), model.Fn(), &clock, stager);
  auto task = MakeTask(0, 5, clock.Now() + absl::Milliseconds(10));
  std::atomic<bool> cancelled{false};
  task->is_cancelled = [&cancelled] { return cancelled.load(); };
  auto after = MakeTask(100, 1);
  ASSERT_TRUE(batcher->Schedule(task).ok());
  ASSERT_TRUE(batcher->Schedule(after).ok());
  ASSERT_TRUE(model.WaitEntered(2));  // [0 1] and [2 3]; [4 100] staged behind them
  ASSERT_TRUE(stager.WaitForStaged(6));
  if (cancel) {
    cancelled.store(true);
  } else {
    clock.Advance(absl::Milliseconds(10));
  }
  model.Release(0);
  // [4] is dropped (cancelled: at the hand-over; expired: at once, at its deadline); `after`
  // alone goes to the free thread...
  ASSERT_TRUE(model.WaitEntered(3));
  model.Release(100);
  ASSERT_TRUE(finished.WaitFinished(2));
  EXPECT_EQ(after->done_calls.load(), 1);
  // ...but the task's [2 3] is still in the model, so it has not ended.
  EXPECT_EQ(task->done_calls.load(), 0);
  EXPECT_THAT(finished.dropped(), IsEmpty());
  model.Release(2);
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_EQ(task->done_calls.load(), 1);
  EXPECT_EQ(task->result().code(),
            cancel ? absl::StatusCode::kCancelled : absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(task->result().message(), HasSubstr("after 4 of 5 items ran"));
  EXPECT_THAT(task->outputs, ElementsAre(0, 10, 20, 30, -1));
  EXPECT_TRUE(after->result().ok());
  EXPECT_THAT(after->outputs, ElementsAre(1000));
  EXPECT_THAT(finished.dropped(),
              ElementsAre(std::pair(cancel ? DropReason::kCancelled : DropReason::kExpired, 1)));
  EXPECT_THAT(model.recorder.all_ids(), ::testing::UnorderedElementsAre(0, 1, 2, 3, 100));
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.items_batched, 5);
  EXPECT_EQ(c.items_dropped, 1);
  EXPECT_EQ(c.tasks_cancelled, cancel ? 1 : 0);
  EXPECT_EQ(c.tasks_expired, cancel ? 0 : 1);
  EXPECT_EQ(c.tasks_succeeded, 1);
}

TEST(DynamicBatcherLanes, CancelledWhileABatchOfItIsInFlight) { DropWhileInFlight(true); }
TEST(DynamicBatcherLanes, ExpiredWhileABatchOfItIsInFlight) { DropWhileInFlight(false); }

TEST(DynamicBatcherLanes, DropsBeforeTheModelStillHappen) {
  FakeClock clock;
  LaneModel model;
  Stager stager;
  // Batches of 4: nothing is due before the clock moves.
  auto batcher = MustCreateStaged(LaneOptions(2, 4), model.Fn(), &clock, stager);
  model.ReleaseAll();
  auto expired = MakeTask(0, 1, clock.Now() + absl::Milliseconds(1));
  auto cancelled = MakeTask(10, 1);
  cancelled->is_cancelled = [] { return true; };
  auto fine = MakeTask(20, 1);
  for (auto& t : {expired, cancelled, fine}) ASSERT_TRUE(batcher->Schedule(t).ok());
  clock.Advance(absl::Milliseconds(2));
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_EQ(expired->result().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(cancelled->result().code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(fine->result().ok());
  EXPECT_THAT(model.recorder.batches(), ElementsAre(ElementsAre(20)));
  for (auto& t : {expired, cancelled, fine}) EXPECT_EQ(t->done_calls.load(), 1);
}

// A batch fails while another batch of the same task is in the model: the task's queued rest
// leaves at once, but it ends (once, with the failure) only when the other batch is back.
TEST(DynamicBatcherLanes, AFailureWaitsForTheTasksOtherBatchInFlight) {
  FakeClock clock;
  LaneModel model;
  Stager stager;
  FinishedBatches finished;
  auto batcher = MustCreateStaged(LaneOptions(2, 2, &finished), model.Fn(), &clock, stager);
  model.recorder.FailIf([](const std::vector<int>& ids) {
    return ids[0] == 0 ? absl::InternalError("model failed") : absl::OkStatus();
  });
  auto task = MakeTask(0, 6);
  auto after = MakeTask(100, 1);
  ASSERT_TRUE(batcher->Schedule(task).ok());
  ASSERT_TRUE(batcher->Schedule(after).ok());
  ASSERT_TRUE(model.WaitEntered(2));
  ASSERT_TRUE(stager.WaitForStaged(6));  // [4 5] staged
  model.Release(0);                      // fails
  ASSERT_TRUE(finished.WaitFinished(1));
  EXPECT_EQ(task->done_calls.load(), 0);  // [2 3] still in the model
  clock.Advance(absl::Milliseconds(2));   // `after` is due alone now
  ASSERT_TRUE(model.WaitEntered(3));
  model.Release(2);
  model.Release(100);
  ASSERT_TRUE(batcher->WaitUntilIdle(kSafety));
  EXPECT_EQ(task->done_calls.load(), 1);
  EXPECT_EQ(task->result().code(), absl::StatusCode::kInternal);
  EXPECT_TRUE(after->result().ok());
  EXPECT_THAT(model.recorder.all_ids(), ::testing::UnorderedElementsAre(0, 1, 2, 3, 100));
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.tasks_failed, 1);
  EXPECT_EQ(c.items_dropped, 2);
  EXPECT_EQ(c.items_accepted, c.items_batched + c.items_dropped);
}

TEST(DynamicBatcherLanes, ShutdownWithBatchesInFlightFinishesEachTaskOnce) {
  FakeClock clock;
  LaneModel model;
  Stager stager;
  auto batcher = MustCreateStaged(LaneOptions(3, 2), model.Fn(), &clock, stager);
  std::vector<std::shared_ptr<TestTask>> tasks;
  for (int i = 0; i < 8; ++i) {
    tasks.push_back(MakeTask(10 * i, 1 + i % 3));  // 15 items
    ASSERT_TRUE(batcher->Schedule(tasks.back()).ok());
  }
  ASSERT_TRUE(model.WaitEntered(3));
  // Shutdown waits for the batches in the model; the rest run without waiting for the delay
  // (the fake clock never moves here).
  std::thread closer([&] { batcher->Shutdown(); });
  // Release the model only once the shutdown has begun; probes accepted before that are
  // tasks like any other.
  for (int probe = 0;; ++probe) {
    auto task = MakeTask(1000 + probe, 1);
    absl::Status status = batcher->Schedule(task);
    if (status.code() == absl::StatusCode::kUnavailable) break;
    if (status.ok()) tasks.push_back(task);
    std::this_thread::yield();
  }
  EXPECT_EQ(model.entered(), 3);
  model.ReleaseAll();
  closer.join();
  for (size_t i = 0; i < tasks.size(); ++i) {
    EXPECT_EQ(tasks[i]->done_calls.load(), 1) << i;
    EXPECT_TRUE(tasks[i]->result().ok()) << i;
    for (int j = 0; j < tasks[i]->num_items; ++j) {
      EXPECT_EQ(tasks[i]->outputs[j], tasks[i]->ids[j] * 10) << i;
    }
  }
  EXPECT_LE(model.max_inside(), 3);
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.tasks_succeeded, static_cast<int64_t>(tasks.size()));
  EXPECT_EQ(c.items_batched, 15 + static_cast<int64_t>(tasks.size()) - 8);
  EXPECT_EQ(batcher->queue_depth(), 0);
}

// Puppet mode has no model threads: the option is accepted and batches run one at a time.
TEST(DynamicBatcherLanes, PuppetModeRunsOneBatchAtATime) {
  FakeClock clock;
  Recorder model;
  auto options = LaneOptions(4, 2);
  options.start_batch_thread = false;
  auto batcher = MustCreate(options, model.Fn(), &clock);
  auto task = MakeTask(0, 5);
  ASSERT_TRUE(batcher->Schedule(task).ok());
  EXPECT_EQ(*batcher->RunOnce(), 2);
  EXPECT_EQ(*batcher->RunOnce(), 2);
  EXPECT_EQ(task->done_calls.load(), 0);
  clock.Advance(absl::Milliseconds(2));
  EXPECT_EQ(*batcher->RunOnce(), 1);
  EXPECT_EQ(task->done_calls.load(), 1);
  EXPECT_THAT(task->outputs, ElementsAre(0, 10, 20, 30, 40));
}

TEST(DynamicBatcherLanes, ManyThreadsManyLanesExactAccounting) {
  constexpr int kThreads = 16;
  constexpr int kPerThread = 150;
  std::atomic<int> inside{0}, max_inside{0};
  std::atomic<int64_t> items{0};
  auto fn = [&](Batch& batch) {
    const int now_inside = inside.fetch_add(1) + 1;
    int prev = max_inside.load();
    while (prev < now_inside && !max_inside.compare_exchange_weak(prev, now_inside)) {
    }
    for (const BatchSlice& slice : batch.slices) {
      auto* task = static_cast<TestTask*>(slice.task);
      for (int i = 0; i < slice.num_items; ++i) {
        task->outputs[slice.first_item + i] = task->ids[slice.first_item + i] * 10;
      }
    }
    items.fetch_add(batch.size);
    std::this_thread::yield();
    inside.fetch_sub(1);
    return absl::OkStatus();
  };
  auto options = MakeOptions(8, absl::Microseconds(100), 128);
  options.max_batches_in_flight = 4;
  auto batcher = MustCreate(options, fn, RealClock::Get());
  ASSERT_NE(batcher, nullptr);
  std::vector<std::shared_ptr<TestTask>> tasks(kThreads * kPerThread);
  for (int i = 0; i < kThreads * kPerThread; ++i) tasks[i] = MakeTask(i * 10, 1 + i % 7);
  std::vector<char> accepted(tasks.size(), 0);
  std::atomic<int> ok{0}, ok_items{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const int index = t * kPerThread + i;
        absl::Status status = batcher->Schedule(tasks[index]);
        if (status.ok()) {
          accepted[index] = 1;
          ok.fetch_add(1);
          ok_items.fetch_add(tasks[index]->num_items);
        } else {
          ASSERT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
          std::this_thread::yield();
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  batcher->Shutdown();
  for (size_t i = 0; i < tasks.size(); ++i) {
    ASSERT_EQ(tasks[i]->done_calls.load(), accepted[i] ? 1 : 0) << i;
    if (!accepted[i]) continue;
    ASSERT_TRUE(tasks[i]->result().ok()) << i;
    for (int j = 0; j < tasks[i]->num_items; ++j) {
      ASSERT_EQ(tasks[i]->outputs[j], tasks[i]->ids[j] * 10) << i;
    }
  }
  EXPECT_LE(max_inside.load(), 4);
  EXPECT_EQ(items.load(), ok_items.load());
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.tasks_succeeded, ok.load());
  EXPECT_EQ(c.items_batched, ok_items.load());
  EXPECT_EQ(c.items_dropped, 0);
}

// ---------------------------------------------------------------------------------------------
// Concurrency (real clock): exact accounting, not timing.

TEST(DynamicBatcherConcurrency, ManyThreadsSingleItemTasks) {
  constexpr int kThreads = 64;
  constexpr int kPerThread = 200;
  constexpr int kMaxBatch = 16;
  std::atomic<int64_t> items_in_batches{0};
  std::atomic<int> max_seen{0};
  std::atomic<int> num_batches{0};
  auto fn = [&](Batch& batch) {
    int64_t n = 0;
    for (const BatchSlice& slice : batch.slices) {
      auto* task = static_cast<TestTask*>(slice.task);
      for (int i = 0; i < slice.num_items; ++i) {
        task->outputs[slice.first_item + i] = task->ids[slice.first_item + i] * 10;
      }
      n += slice.num_items;
    }
    items_in_batches.fetch_add(n);
    num_batches.fetch_add(1);
    int prev = max_seen.load();
    while (prev < batch.size && !max_seen.compare_exchange_weak(prev, batch.size)) {
    }
    return absl::OkStatus();
  };
  // A queue smaller than the callers' burst, so that both paths are exercised.
  auto batcher = MustCreate(MakeOptions(kMaxBatch, absl::Microseconds(200), 256), fn,
                            RealClock::Get());
  ASSERT_NE(batcher, nullptr);

  std::vector<std::shared_ptr<TestTask>> tasks(kThreads * kPerThread);
  for (int i = 0; i < kThreads * kPerThread; ++i) tasks[i] = MakeTask(i, 1);
  std::vector<char> accepted(tasks.size(), 0);
  std::atomic<int> ok{0}, rejected{0}, wrong_code{0};
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      for (int i = 0; i < kPerThread; ++i) {
        const int index = t * kPerThread + i;
        absl::Status status = batcher->Schedule(tasks[index]);
        if (status.ok()) {
          accepted[index] = 1;
          ok.fetch_add(1);
        } else {
          rejected.fetch_add(1);
          if (status.code() != absl::StatusCode::kResourceExhausted) wrong_code.fetch_add(1);
          std::this_thread::yield();  // back off as a client would
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  batcher->Shutdown();

  EXPECT_EQ(ok.load() + rejected.load(), kThreads * kPerThread);
  EXPECT_EQ(wrong_code.load(), 0);
  EXPECT_GT(ok.load(), 0);
  for (size_t i = 0; i < tasks.size(); ++i) {
    ASSERT_EQ(tasks[i]->done_calls.load(), accepted[i] ? 1 : 0) << i;
    if (accepted[i]) {
      ASSERT_TRUE(tasks[i]->result().ok()) << i;
      ASSERT_EQ(tasks[i]->outputs[0], static_cast<int>(i) * 10) << i;
    }
  }
  EXPECT_EQ(items_in_batches.load(), ok.load());
  EXPECT_LE(max_seen.load(), kMaxBatch);
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.tasks_accepted, ok.load());
  EXPECT_EQ(c.tasks_succeeded, ok.load());
  EXPECT_EQ(c.rejected_queue_full, rejected.load());
  EXPECT_EQ(c.items_batched, ok.load());
  EXPECT_EQ(c.batches, num_batches.load());
  std::printf("accepted %d, rejected %d, %d batches (mean %.1f items)\n", ok.load(),
              rejected.load(), num_batches.load(),
              num_batches.load() ? double(ok.load()) / num_batches.load() : 0.0);
}

// 64 threads schedule live, expiring, expired, cancelled and later-cancelled tasks while another
// thread moves the fake clock, so sweeps (at deadlines and polls) race with Schedule(), staging
// and hand-overs. Each task ends once with an outcome its kind allows, and the counters add up
// exactly to the tasks' own tallies.
TEST(DynamicBatcherConcurrency, ExpiringCancelledAndLiveTasksExactAccounting) {
  constexpr int kThreads = 64;
  constexpr int kPerThread = 40;
  constexpr int kTasks = kThreads * kPerThread;
  enum Kind { kLive, kExpiring, kExpired, kCancelLater, kCancelled, kKinds };
  FakeClock clock;
  std::atomic<int64_t> items_in_batches{0};
  auto fn = [&](Batch& batch) {
    for (const BatchSlice& slice : batch.slices) {
      auto* task = static_cast<TestTask*>(slice.task);
      for (int i = 0; i < slice.num_items; ++i) {
        task->outputs[slice.first_item + i] = task->ids[slice.first_item + i] * 10;
      }
    }
    items_in_batches.fetch_add(batch.size);
    std::this_thread::yield();
    return absl::OkStatus();
  };
  auto options = MakeOptions(16, absl::Microseconds(200), 256);
  options.cancel_poll_interval = absl::Microseconds(500);
  auto batcher = MustCreate(options, fn, &clock);
  ASSERT_NE(batcher, nullptr);

  std::vector<std::shared_ptr<TestTask>> tasks(kTasks);
  std::vector<std::atomic<bool>> cancel(kTasks);
  for (int i = 0; i < kTasks; ++i) {
    tasks[i] = MakeTask(i * 10, 1 + i % 3);
    if (i % kKinds == kCancelLater || i % kKinds == kCancelled) {
      std::atomic<bool>* flag = &cancel[i];
      tasks[i]->is_cancelled = [flag] { return flag->load(); };
    }
  }
  std::vector<char> accepted(kTasks, 0);
  std::atomic<bool> stop{false};
  std::thread ticker([&] {
    while (!stop.load()) {
      clock.Advance(absl::Microseconds(50));
      std::this_thread::yield();
    }
  });
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      for (int i = 0; i < kPerThread; ++i) {
        const int index = t * kPerThread + i;
        TestTask& task = *tasks[index];
        switch (index % kKinds) {
          case kExpiring: task.deadline = clock.Now() + absl::Microseconds(300); break;
          case kExpired: task.deadline = clock.Now(); break;
          case kCancelled: cancel[index].store(true); break;
          default: break;
        }
        absl::Status status = batcher->Schedule(tasks[index]);
        if (index % kKinds == kCancelLater) cancel[index].store(true);
        if (status.ok()) {
          accepted[index] = 1;
        } else {
          ASSERT_EQ(status.code(), absl::StatusCode::kResourceExhausted) << status;
          std::this_thread::yield();
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  stop.store(true);
  ticker.join();
  batcher->Shutdown();

  int64_t n_accepted = 0, n_rejected = 0, ok = 0, expired = 0, cancelled = 0, items = 0;
  for (int i = 0; i < kTasks; ++i) {
    TestTask& task = *tasks[i];
    if (!accepted[i]) {
      ++n_rejected;
      ASSERT_EQ(task.done_calls.load(), 0) << i;
      ASSERT_FALSE(task.done) << i;  // released at the rejection
      continue;
    }
    ++n_accepted;
    items += task.num_items;
    ASSERT_EQ(task.done_calls.load(), 1) << i;
    const absl::StatusCode code = task.result().code();
    switch (i % kKinds) {
      case kLive: ASSERT_EQ(code, absl::StatusCode::kOk) << i; break;
      case kExpiring:
        ASSERT_TRUE(code == absl::StatusCode::kOk || code == absl::StatusCode::kDeadlineExceeded)
            << i << " " << task.result();
        break;
      case kExpired: ASSERT_EQ(code, absl::StatusCode::kDeadlineExceeded) << i; break;
      case kCancelLater:
        ASSERT_TRUE(code == absl::StatusCode::kOk || code == absl::StatusCode::kCancelled)
            << i << " " << task.result();
        break;
      case kCancelled: ASSERT_EQ(code, absl::StatusCode::kCancelled) << i; break;
    }
    if (i % kKinds == kExpired || i % kKinds == kCancelled) {
      ASSERT_EQ(task.outputs, std::vector<int>(task.num_items, -1)) << i;  // never ran
    }
    if (code == absl::StatusCode::kOk) {
      ++ok;
      for (int j = 0; j < task.num_items; ++j) ASSERT_EQ(task.outputs[j], task.ids[j] * 10) << i;
    }
    if (code == absl::StatusCode::kDeadlineExceeded) ++expired;
    if (code == absl::StatusCode::kCancelled) ++cancelled;
  }
  EXPECT_GT(expired, 0);
  EXPECT_GT(cancelled, 0);
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.tasks_accepted, n_accepted);
  EXPECT_EQ(c.rejected_queue_full, n_rejected);
  EXPECT_EQ(c.tasks_succeeded, ok);
  EXPECT_EQ(c.tasks_expired, expired);
  EXPECT_EQ(c.tasks_cancelled, cancelled);
  EXPECT_EQ(c.tasks_failed, 0);
  EXPECT_EQ(c.items_accepted, items);
  EXPECT_EQ(c.items_batched, items_in_batches.load());
  EXPECT_EQ(c.items_accepted, c.items_batched + c.items_dropped);
  EXPECT_EQ(batcher->queue_depth(), 0);
  std::printf("accepted %lld (ok %lld, expired %lld, cancelled %lld), rejected %lld\n",
              static_cast<long long>(n_accepted), static_cast<long long>(ok),
              static_cast<long long>(expired), static_cast<long long>(cancelled),
              static_cast<long long>(n_rejected));
}

TEST(DynamicBatcherConcurrency, ShutdownRacingWithSchedulers) {
  constexpr int kThreads = 16;
  std::atomic<int64_t> items_in_batches{0};
  auto fn = [&](Batch& batch) {
    items_in_batches.fetch_add(batch.size);
    return absl::OkStatus();
  };
  auto batcher = MustCreate(MakeOptions(8, absl::Microseconds(100), 256), fn, RealClock::Get());
  ASSERT_NE(batcher, nullptr);
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, unavailable{0}, full{0}, other{0};
  std::vector<std::shared_ptr<TestTask>> per_thread_tasks[kThreads];
  std::vector<std::thread> threads;
  absl::Notification started;
  std::atomic<int> scheduled_any{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      int i = 0;
      while (!stop.load()) {
        auto task = MakeTask(t * 1'000'000 + i, 1 + i % 3);
        ++i;
        absl::Status status = batcher->Schedule(task);
        if (status.ok()) {
          ok.fetch_add(1);
          per_thread_tasks[t].push_back(task);
          if (scheduled_any.fetch_add(1) == 100) started.Notify();
        } else if (status.code() == absl::StatusCode::kUnavailable) {
          unavailable.fetch_add(1);
          if (task->done_calls.load() != 0) other.fetch_add(1);
          break;
        } else if (status.code() == absl::StatusCode::kResourceExhausted) {
          full.fetch_add(1);
          std::this_thread::yield();
        } else {
          other.fetch_add(1);
        }
      }
    });
  }
  ASSERT_TRUE(started.WaitForNotificationWithTimeout(kSafety));
  batcher->Shutdown();
  stop.store(true);
  for (auto& th : threads) th.join();

  EXPECT_EQ(other.load(), 0);
  int64_t accepted_items = 0;
  for (auto& tasks : per_thread_tasks) {
    for (auto& task : tasks) {
      ASSERT_EQ(task->done_calls.load(), 1);
      ASSERT_TRUE(task->result().ok());
      accepted_items += task->num_items;
    }
  }
  EXPECT_EQ(items_in_batches.load(), accepted_items);
  BatcherCounters c = batcher->counters();
  EXPECT_EQ(c.tasks_accepted, ok.load());
  EXPECT_EQ(c.tasks_succeeded, ok.load());
  EXPECT_EQ(c.rejected_shutting_down, unavailable.load());
}

// ---------------------------------------------------------------------------------------------
// FakeClock itself

TEST(FakeClock, WaitReturnsOnlyWhenTheDeadlineIsReached) {
  FakeClock clock;
  absl::Mutex mu;
  absl::CondVar cv;
  std::atomic<bool> returned{false};
  const absl::Time deadline = clock.Now() + absl::Milliseconds(5);
  std::thread waiter([&] {
    absl::MutexLock lock(&mu);
    while (clock.Now() < deadline) clock.WaitUntil(mu, cv, deadline);
    returned.store(true);
  });
  // Wait for the waiter to block, without sleeping.
  while (clock.num_waiters() == 0) std::this_thread::yield();
  clock.Advance(absl::Milliseconds(5) - absl::Nanoseconds(1));
  EXPECT_EQ(clock.num_waiters(), 1);  // still blocked: not due
  EXPECT_FALSE(returned.load());
  clock.Advance(absl::Nanoseconds(1));
  waiter.join();
  EXPECT_TRUE(returned.load());
  EXPECT_EQ(clock.num_waiters(), 0);
}

TEST(FakeClock, TimeNeverGoesBackwards) {
  FakeClock clock;
  const absl::Time start = clock.Now();
  clock.SetTime(start - absl::Seconds(1));
  EXPECT_EQ(clock.Now(), start);
  clock.Advance(-absl::Seconds(1));
  EXPECT_EQ(clock.Now(), start);
  clock.SetTime(start + absl::Seconds(1));
  EXPECT_EQ(clock.Now(), start + absl::Seconds(1));
}

}  // namespace
}  // namespace arcface::batching
