#include "server/service/served_models.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace arcface::service {
namespace {

// "arcface (default), dlib": for errors.
std::string Names(const std::vector<ModelRef>& models) {
  std::string names;
  for (const ModelRef& m : models) {
    absl::StrAppend(&names, names.empty() ? "" : ", ", m->name(),
                    m == models.front() ? " (default)" : "");
  }
  return names;
}

}  // namespace

void ServedModels::Set(std::vector<ServedModel> models) {
  std::vector<ModelRef> refs;
  refs.reserve(models.size());
  for (ServedModel& m : models) refs.push_back(std::make_shared<const ServedModel>(std::move(m)));
  absl::MutexLock lock(&mu_);
  models_.swap(refs);
}

absl::StatusOr<ModelRef> ServedModels::Replace(ModelRef ref) {
  absl::MutexLock lock(&mu_);
  for (ModelRef& m : models_) {
    if (m->name() == ref->name()) {
      m.swap(ref);
      return ref;
    }
  }
  return absl::NotFoundError(absl::StrCat("model '", ref->name(), "' is not served here"));
}

absl::StatusOr<ModelRef> ServedModels::Find(absl::string_view name) const {
  absl::ReaderMutexLock lock(&mu_);
  if (name.empty() && !models_.empty()) return models_.front();
  for (const ModelRef& m : models_) {
    if (m->name() == name) return m;
  }
  return absl::NotFoundError(
      absl::StrCat("model '", name, "' is not served here; this server serves: ", Names(models_)));
}

ModelRef ServedModels::ByModelId(absl::string_view model_id) const {
  absl::ReaderMutexLock lock(&mu_);
  for (const ModelRef& m : models_) {
    if (m->model_id() == model_id) return m;
  }
  return nullptr;
}

ModelRef ServedModels::default_model() const {
  absl::ReaderMutexLock lock(&mu_);
  return models_.empty() ? nullptr : models_.front();
}

std::vector<ModelRef> ServedModels::all() const {
  absl::ReaderMutexLock lock(&mu_);
  return models_;
}

}  // namespace arcface::service
