#include "server/service/served_models.h"

#include "absl/strings/str_cat.h"

namespace arcface::service {

absl::StatusOr<const ServedModel*> ServedModels::Find(absl::string_view name) const {
  if (name.empty()) return &models_.front();
  for (const ServedModel& m : models_) {
    if (m.description.name == name) return &m;
  }
  return absl::NotFoundError(
      absl::StrCat("model '", name, "' is not served here; this server serves: ", Names()));
}

const ServedModel* ServedModels::ByModelId(absl::string_view model_id) const {
  for (const ServedModel& m : models_) {
    if (m.description.model_id == model_id) return &m;
  }
  return nullptr;
}

std::string ServedModels::Names() const {
  std::string names;
  for (const ServedModel& m : models_) {
    absl::StrAppend(&names, names.empty() ? "" : ", ", m.description.name,
                    &m == &models_.front() ? " (default)" : "");
  }
  return names;
}

}  // namespace arcface::service
