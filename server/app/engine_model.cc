#include "server/app/engine_model.h"

#include <exception>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace arcface::app {

absl::StatusOr<engine::EmbeddingBatch> EngineModel::Run(absl::Span<const uint8_t> crops) {
  try {
    if (faults_ != nullptr) {
      if (absl::Status injected = faults_->BeforeBatch(); !injected.ok()) return injected;
    }
    return engine_->Run(crops);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("the engine threw: ", e.what()));
  }
}

}  // namespace arcface::app
