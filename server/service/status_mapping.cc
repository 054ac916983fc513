#include "server/service/status_mapping.h"

#include <string>

namespace arcface::service {
namespace {

// absl::StatusCode and grpc::StatusCode both run 0 (OK) .. 16 (UNAUTHENTICATED).
constexpr int kMaxCode = 16;

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  int code = static_cast<int>(status.code());
  if (code < 0 || code > kMaxCode) code = static_cast<int>(grpc::StatusCode::UNKNOWN);
  return grpc::Status(static_cast<grpc::StatusCode>(code), std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  int code = static_cast<int>(status.error_code());
  if (code < 0 || code > kMaxCode) code = static_cast<int>(absl::StatusCode::kUnknown);
  return absl::Status(static_cast<absl::StatusCode>(code), status.error_message());
}

void ToProtoStatus(const absl::Status& status, arcface::v1::Status* out) {
  grpc::Status g = ToGrpcStatus(status);
  out->set_code(static_cast<int32_t>(g.error_code()));
  out->set_message(g.error_message());
}

}  // namespace arcface::service
