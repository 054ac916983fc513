#include "server/service/model_reloader.h"

#include <spdlog/spdlog.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace arcface::service {

const char* ReloadResultName(ModelReload::Result result) {
  switch (result) {
    case ModelReload::Result::kReloaded:
      return "reloaded";
    case ModelReload::Result::kUnchanged:
      return "unchanged";
    case ModelReload::Result::kFailed:
      return "failed";
  }
  return "failed";
}

ModelReloader::ModelReloader(ServedModels* models, LoadFn load, SwappedFn swapped,
                             ServiceMetrics* metrics)
    : models_(models),
      load_(std::move(load)),
      swapped_(std::move(swapped)),
      metrics_(metrics),
      thread_([this] { Loop(); }) {}

ModelReloader::~ModelReloader() { Stop(); }

void ModelReloader::Request(std::vector<std::string> names, std::string source, Done done) {
  for (const std::string& name : names) {
    // An empty name would mean the default model to Find(); here every name must be served.
    if (name.empty()) return done(absl::InvalidArgumentError("models: an empty model name"));
    absl::StatusOr<ModelRef> found = models_->Find(name);
    if (!found.ok()) return done(found.status());
  }
  absl::Status refused;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) {
      refused = absl::UnavailableError("the server is stopping: no reload now");
    } else if (pending_.size() >= kMaxPending) {
      refused = absl::ResourceExhaustedError(absl::StrCat(
          pending_.size(), " reloads are already waiting; try again once they are done"));
    } else {
      pending_.push_back({std::move(names), std::move(source), std::move(done)});
      return;
    }
  }
  spdlog::warn("reload ({}) refused: {}", source, std::string(refused.message()));
  done(std::move(refused));
}

void ModelReloader::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void ModelReloader::Loop() {
  while (true) {
    Pending next;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &ModelReloader::HasWork));
      if (stopping_) break;
      next = std::move(pending_.front());
      pending_.pop_front();
    }
    // Names, not versions: a version held here could not retire.
    if (next.names.empty()) {
      for (const ModelRef& m : models_->all()) next.names.push_back(m->name());
    }
    spdlog::info("reload ({}): {} model(s)", next.source, next.names.size());
    std::vector<ModelReload> results;
    for (const std::string& name : next.names) results.push_back(ReloadOne(name));
    next.done(std::move(results));
  }
  std::deque<Pending> refused;
  {
    absl::MutexLock lock(&mu_);
    refused.swap(pending_);
  }
  for (Pending& p : refused) {
    spdlog::warn("reload ({}) not done: the server is stopping", p.source);
    p.done(absl::UnavailableError("the server stopped before the reload began"));
  }
}

ModelReload ModelReloader::ReloadOne(const std::string& name) {
  ModelReload out;
  out.model = name;
  ModelRef old;  // the version replaced, to retire
  {
    ModelRef current = *models_->Find(name);  // the names served are fixed
    out.previous_model_id = out.model_id = current->model_id();
    const absl::Time start = absl::Now();
    absl::StatusOr<std::optional<ServedModel>> loaded = load_(*current);
    out.seconds = absl::ToDoubleSeconds(absl::Now() - start);
    if (!loaded.ok()) {
      out.result = ModelReload::Result::kFailed;
      out.error = std::string(loaded.status().message());
      spdlog::error("reload of model {} failed after {:.2f} s, {} keeps serving: {}", name,
                    out.seconds, out.model_id, out.error);
    } else if (!loaded->has_value()) {
      spdlog::info("reload of model {}: unchanged ({})", name, out.model_id);
    } else {
      const ModelRef now = std::make_shared<const ServedModel>(**std::move(loaded));
      old = *models_->Replace(now);  // served: Find() found it
      out.result = ModelReload::Result::kReloaded;
      out.model_id = now->model_id();
      swapped_(*now, *old);
      spdlog::info("reload of model {}: {} serves now (was {}), loaded and warmed up in {:.2f} s",
                   name, out.model_id, out.previous_model_id, out.seconds);
    }
  }  // `current` and `now` let go: Retire() must hold the old version alone
  metrics_->RecordReload(name, ReloadResultName(out.result));
  if (old != nullptr) Retire(std::move(old));
  return out;
}

void ModelReloader::Retire(ModelRef old) {
  const absl::Time start = absl::Now();
  // Calls let go of the version once their crops are queued in its Embedder, a few ms after
  // the swap; they are not told to, so this polls (Stop() ends the wait at once).
  {
    absl::MutexLock lock(&mu_);
    while (old.use_count() > 1 && !stopping_) {
      mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Milliseconds(5));
    }
  }
  old->embedder->Shutdown();
  spdlog::info("model {}: {} retired after {:.3f} s", old->name(), old->model_id(),
               absl::ToDoubleSeconds(absl::Now() - start));
}

}  // namespace arcface::service
