// ModelReloader (model_reloader.h) over real ServedModels and Embedders of fake models: a reload
// swaps a new version in while the old one is held in its model, new calls go to the new one,
// the calls queued on the old one are answered by it once it runs again, and only then does it
// retire; a failed or unchanged load leaves the serving version as it is; refusals; and many
// client threads through five reloads, every answer the one its version computes.
#include "server/service/model_reloader.h"

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/service/embedder.h"
#include "server/service/served_models.h"
#include "server/service/service_metrics.h"
#include "tests/service/fake_model.h"
#include "tests/test_util/exposition.h"

namespace arcface::service {
namespace {

using ::testing::HasSubstr;

// The fake model of one version: the fake's rows times `scale`, so each version's answers are
// told apart by their norms.
class ScaledModel final : public EmbeddingModel {
 public:
  explicit ScaledModel(float scale) : scale_(scale) {}
  const model::CropGeometry& geometry() const override { return inner_.geometry(); }
  int embedding_dim() const override { return inner_.embedding_dim(); }
  absl::StatusOr<EmbeddingBatch> Run(absl::Span<const uint8_t> crops) override {
    absl::StatusOr<EmbeddingBatch> out = inner_.Run(crops);
    if (!out.ok()) return out;
    for (float& v : out->values) v *= scale_;
    for (float& n : out->norms) n *= scale_;
    return out;
  }
  FakeModel& gate() { return inner_; }

 private:
  FakeModel inner_;
  const float scale_;
};

// One version's parts, as the server's ServedModel::resources holds them.
struct Version {
  explicit Version(float scale) : model(scale) {}
  ScaledModel model;
  std::unique_ptr<Embedder> embedder;
};

class ModelReloaderTest : public ::testing::Test {
 protected:
  ModelReloaderTest() : metrics_(8, {"m"}) {}

  // A version of model "m" with rows scaled by `scale` (its model_id says which).
  ServedModel Make(float scale, std::shared_ptr<Version>* out = nullptr) {
    auto version = std::make_shared<Version>(scale);
    EmbedderOptions options;
    options.batching.max_batch_size = 4;
    options.batching.max_queue_size = 256;
    options.batching.max_queue_delay = absl::Milliseconds(1);
    options.batching.observer = metrics_.ForModel("m");
    version->embedder = *Embedder::Create(options, &version->model);
    ServedModel served;
    served.description.name = "m";
    served.description.model_id = absl::StrCat("fake@", scale);
    served.description.weights_sha256 = served.description.model_id;
    served.embedder = version->embedder.get();
    if (out != nullptr) *out = version;
    served.resources = std::move(version);
    return served;
  }

  void Serve(ServedModel first) {
    std::vector<ServedModel> list;
    list.push_back(std::move(first));
    models_.Set(std::move(list));
    reloader_ = std::make_unique<ModelReloader>(
        &models_,
        [this](const ServedModel& current) -> absl::StatusOr<std::optional<ServedModel>> {
          absl::MutexLock lock(&mu_);
          if (!next_.ok()) return next_.status();
          if (*next_ == 0) return std::nullopt;
          return std::optional<ServedModel>(Make(*next_));
        },
        [this](const ServedModel& now, const ServedModel& before) {
          swaps_.push_back(before.model_id() + "->" + now.model_id());
        },
        &metrics_);
  }

  void TearDown() override {
    if (reloader_) reloader_->Stop();
    for (const ModelRef& m : models_.all()) m->embedder->Shutdown();
  }

  // The next load builds a version of this scale (0: unchanged), or fails.
  void NextLoad(absl::StatusOr<float> next) {
    absl::MutexLock lock(&mu_);
    next_ = std::move(next);
  }

  // Reloads every model and waits for the results.
  absl::StatusOr<std::vector<ModelReload>> Reload(std::vector<std::string> names = {}) {
    absl::StatusOr<std::vector<ModelReload>> results;
    absl::Notification done;
    reloader_->Request(std::move(names), "test", [&](absl::StatusOr<std::vector<ModelReload>> r) {
      results = std::move(r);
      done.Notify();
    });
    EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(60)));
    return results;
  }

  // A call as the service makes one: find the serving version, hand it a crop, let go of it.
  // `done` gets the row's norm and the model_id of the version found.
  void Call(uint8_t fill, absl::AnyInvocable<void(absl::StatusOr<float>, std::string)> done) {
    ModelRef model = *models_.Find("m");
    std::string id = model->model_id();
    absl::Status s = model->embedder->Submit(
        std::vector<uint8_t>(kCropBytes, fill), absl::InfiniteFuture(), nullptr,
        [done = std::move(done), id](absl::StatusOr<EmbeddingBatch> rows) mutable {
          if (!rows.ok()) return done(rows.status(), id);
          done(rows->norms[0], id);
        });
    ASSERT_TRUE(s.ok()) << s;
  }

  double Metric(const std::string& name, const std::map<std::string, std::string>& labels) {
    std::map<std::string, std::string> types;
    for (const test_util::Sample& s : test_util::ParseExposition(metrics_.Render(), &types)) {
      if (s.name == name && s.labels == labels) return s.value;
    }
    return 0;
  }

  // Whether the version `model_id` serves within 30 s (the reloader swaps on its own thread).
  bool WaitForServing(const std::string& model_id) {
    const absl::Time end = absl::Now() + absl::Seconds(30);
    while ((*models_.Find("m"))->model_id() != model_id && absl::Now() < end) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    return (*models_.Find("m"))->model_id() == model_id;
  }

  // The norm version `scale` gives a crop filled with `fill`.
  static float NormOf(uint8_t fill, float scale) {
    const std::vector<uint8_t> crop(kCropBytes, fill);
    return static_cast<float>(Norm(FakeEmbedding(crop.data()))) * scale;  // as the fakes round
  }

  ServiceMetrics metrics_;
  ServedModels models_;
  absl::Mutex mu_;
  absl::StatusOr<float> next_ ABSL_GUARDED_BY(mu_) = 0.0f;
  std::vector<std::string> swaps_;  // written by the reloader's thread, read after its reloads
  std::unique_ptr<ModelReloader> reloader_;
};

TEST_F(ModelReloaderTest, CallsQueuedOnTheOldVersionFinishOnItWhileNewCallsGetTheNew) {
  std::shared_ptr<Version> first;
  Serve(Make(1.0f, &first));
  first->model.gate().Hold();
  struct Answer {
    absl::StatusOr<float> norm = absl::UnknownError("none");
    std::string id;
    absl::Notification done;
  };
  Answer old_calls[3];
  for (int i = 0; i < 3; ++i) {
    Call(uint8_t(10 + i), [a = &old_calls[i]](absl::StatusOr<float> norm, std::string id) {
      a->norm = norm;
      a->id = std::move(id);
      a->done.Notify();
    });
  }
  ASSERT_TRUE(first->model.gate().WaitForBatches(1));  // the first batch is held in the model

  NextLoad(2.0f);
  absl::StatusOr<std::vector<ModelReload>> results;
  absl::Notification reloaded;
  reloader_->Request({}, "test", [&](absl::StatusOr<std::vector<ModelReload>> r) {
    results = std::move(r);
    reloaded.Notify();
  });
  // Swapped while the old version is still held: new calls go to the new one at once...
  ASSERT_TRUE(WaitForServing("fake@2"));
  Answer fresh;
  Call(50, [&fresh](absl::StatusOr<float> norm, std::string id) {
    fresh.norm = norm;
    fresh.id = std::move(id);
    fresh.done.Notify();
  });
  ASSERT_TRUE(fresh.done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(fresh.id, "fake@2");
  ASSERT_TRUE(fresh.norm.ok()) << fresh.norm.status();
  EXPECT_FLOAT_EQ(*fresh.norm, NormOf(50, 2.0f));
  // ...and the old one cannot retire (nor the reload answer) until its queued calls are done.
  EXPECT_FALSE(reloaded.WaitForNotificationWithTimeout(absl::Milliseconds(50)));
  for (Answer& a : old_calls) EXPECT_FALSE(a.done.HasBeenNotified());

  first->model.gate().Release();
  ASSERT_TRUE(reloaded.WaitForNotificationWithTimeout(absl::Seconds(30)));
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(old_calls[i].done.HasBeenNotified());
    EXPECT_EQ(old_calls[i].id, "fake@1");
    ASSERT_TRUE(old_calls[i].norm.ok()) << old_calls[i].norm.status();
    EXPECT_FLOAT_EQ(*old_calls[i].norm, NormOf(uint8_t(10 + i), 1.0f));
  }
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), 1u);
  const ModelReload& r = results->front();
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(r.result, ModelReload::Result::kReloaded);
  EXPECT_EQ(r.previous_model_id, "fake@1");
  EXPECT_EQ(r.model_id, "fake@2");
  EXPECT_EQ(swaps_, std::vector<std::string>{"fake@1->fake@2"});
  // The old version's batcher answered all three and has stopped; this test's reference is the
  // last one, the version's parts are freed with it.
  const batching::BatcherCounters c = first->embedder->batcher().counters();
  EXPECT_EQ(c.tasks_succeeded, 3);
  EXPECT_EQ(c.tasks_accepted, 3);
  EXPECT_EQ(first.use_count(), 1);
  EXPECT_EQ(Metric("arcface_model_reloads_total", {{"model", "m"}, {"result", "reloaded"}}), 1);
}

TEST_F(ModelReloaderTest, AFailedOrUnchangedLoadLeavesTheServingVersion) {
  Serve(Make(1.0f));
  const ModelRef serving = *models_.Find("m");
  NextLoad(absl::InvalidArgumentError("model.safetensors: truncated"));
  absl::StatusOr<std::vector<ModelReload>> r = Reload();
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 1u);
  EXPECT_EQ(r->front().result, ModelReload::Result::kFailed);
  EXPECT_EQ(r->front().error, "model.safetensors: truncated");
  EXPECT_EQ(r->front().model_id, "fake@1");
  EXPECT_EQ(*models_.Find("m"), serving);

  NextLoad(0.0f);
  r = Reload({"m"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->front().result, ModelReload::Result::kUnchanged);
  EXPECT_EQ(*models_.Find("m"), serving);
  EXPECT_TRUE(swaps_.empty());
  EXPECT_EQ(Metric("arcface_model_reloads_total", {{"model", "m"}, {"result", "failed"}}), 1);
  EXPECT_EQ(Metric("arcface_model_reloads_total", {{"model", "m"}, {"result", "unchanged"}}), 1);

  // Refusals come through `done`, at once.
  r = Reload({"x"});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(r.status().message(), "model 'x' is not served here; this server serves: m (default)");
  r = Reload({""});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  reloader_->Stop();
  r = Reload();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(ModelReloaderTest, ARequestQueuedBehindAReloadWhenStoppingIsAnsweredUnavailable) {
  std::shared_ptr<Version> first;
  Serve(Make(1.0f, &first));
  first->model.gate().Hold();
  absl::Notification queued_done;
  Call(1, [&](absl::StatusOr<float> norm, std::string) {
    EXPECT_TRUE(norm.ok()) << norm.status();
    queued_done.Notify();
  });
  ASSERT_TRUE(first->model.gate().WaitForBatches(1));
  NextLoad(3.0f);
  absl::Notification first_done, second_done;
  absl::StatusOr<std::vector<ModelReload>> first_result, second_result;
  reloader_->Request({}, "test", [&](absl::StatusOr<std::vector<ModelReload>> r) {
    first_result = std::move(r);
    first_done.Notify();
  });
  reloader_->Request({}, "test", [&](absl::StatusOr<std::vector<ModelReload>> r) {
    second_result = std::move(r);
    second_done.Notify();
  });
  // The first reload swapped and waits for the held old version to retire; Stop() ends that
  // wait (the old version shuts down, which runs its held batch) and refuses the second.
  ASSERT_TRUE(WaitForServing("fake@3"));
  std::thread stop([this] { reloader_->Stop(); });
  // Stop() has begun once a request is refused at once (those queued before are refused too).
  std::atomic<int> refused{0};
  for (bool stopping = false; !stopping;) {
    // Probes queued before Stop() began are answered later, when the loop is over.
    auto answered = std::make_shared<std::atomic<bool>>(false);
    reloader_->Request({}, "probe",
                       [&refused, answered](absl::StatusOr<std::vector<ModelReload>> r) {
                         EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
                         *answered = true;
                         refused++;
                       });
    stopping = answered->load();
    if (!stopping) absl::SleepFor(absl::Milliseconds(1));
  }
  first->model.gate().Release();
  stop.join();
  ASSERT_TRUE(first_done.HasBeenNotified() && second_done.HasBeenNotified());
  ASSERT_TRUE(first_result.ok()) << first_result.status();
  EXPECT_EQ(first_result->front().result, ModelReload::Result::kReloaded);
  EXPECT_EQ(second_result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(queued_done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_GE(refused.load(), 1);
}

TEST_F(ModelReloaderTest, AtMostkMaxPendingRequestsWait) {
  std::shared_ptr<Version> first;
  Serve(Make(1.0f, &first));
  first->model.gate().Hold();
  Call(1, [](absl::StatusOr<float>, std::string) {});
  ASSERT_TRUE(first->model.gate().WaitForBatches(1));
  NextLoad(2.0f);
  absl::Notification busy_done;
  reloader_->Request({}, "test",
                     [&](absl::StatusOr<std::vector<ModelReload>>) { busy_done.Notify(); });
  // Swapped; the old version cannot retire while its batch is held, so this reload goes on.
  ASSERT_TRUE(WaitForServing("fake@2"));
  NextLoad(0.0f);
  std::atomic<int> unchanged{0};
  for (size_t i = 0; i < ModelReloader::kMaxPending; ++i) {
    reloader_->Request({"m"}, "test", [&](absl::StatusOr<std::vector<ModelReload>> r) {
      if (r.ok() && r->front().result == ModelReload::Result::kUnchanged) unchanged++;
    });
  }
  absl::StatusOr<std::vector<ModelReload>> refused;
  reloader_->Request({}, "test",
                     [&](absl::StatusOr<std::vector<ModelReload>> r) { refused = std::move(r); });
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(), HasSubstr("8 reloads are already waiting"));
  first->model.gate().Release();
  ASSERT_TRUE(busy_done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  // The queued requests then run, one after the other.
  const absl::Time end = absl::Now() + absl::Seconds(30);
  while (unchanged.load() < int(ModelReloader::kMaxPending) && absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(unchanged.load(), int(ModelReloader::kMaxPending));
}

TEST_F(ModelReloaderTest, ManyCallersThroughFiveReloadsAllAnsweredByTheirOwnVersion) {
  Serve(Make(1.0f));
  constexpr int kThreads = 8;
  constexpr int kCallsPerThread = 150;
  std::atomic<int> answered{0}, wrong{0}, failed{0};
  absl::Mutex mu;
  std::map<std::string, int> by_version;
  std::vector<std::thread> clients;
  for (int t = 0; t < kThreads; ++t) {
    clients.emplace_back([&, t] {
      for (int i = 0; i < kCallsPerThread; ++i) {
        absl::Notification done;
        const uint8_t fill = uint8_t(t * 31 + i);
        Call(fill, [&](absl::StatusOr<float> norm, std::string id) {
          if (!norm.ok()) {
            failed++;
          } else if (*norm != NormOf(fill, std::stof(id.substr(5)))) {
            wrong++;
          }
          {
            absl::MutexLock lock(&mu);
            by_version[id]++;
          }
          answered++;
          done.Notify();
        });
        done.WaitForNotification();
      }
    });
  }
  for (int k = 2; k <= 6; ++k) {
    // Each version answers some calls before the next replaces it.
    const int before = answered.load();
    const absl::Time end = absl::Now() + absl::Seconds(30);
    while (answered.load() < before + 40 && absl::Now() < end) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    NextLoad(float(k));
    absl::StatusOr<std::vector<ModelReload>> r = Reload();
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->front().result, ModelReload::Result::kReloaded);
  }
  for (std::thread& c : clients) c.join();
  EXPECT_EQ(answered.load(), kThreads * kCallsPerThread);
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(swaps_.size(), 5u);
  absl::MutexLock lock(&mu);
  for (int k = 1; k <= 5; ++k) EXPECT_GE(by_version[absl::StrCat("fake@", k)], 40) << k;
  EXPECT_EQ((*models_.Find("m"))->model_id(), "fake@6");
  EXPECT_EQ(Metric("arcface_model_reloads_total", {{"model", "m"}, {"result", "reloaded"}}), 5);
}

}  // namespace
}  // namespace arcface::service
