// Status mapping: the one place where the service's absl::Status becomes a grpc::Status.
//
// Contract
// - Inside the service everything speaks absl::Status; handlers convert only when they finish a
//   call (or fill EmbedResponse.error in a stream). absl::StatusCode and grpc::StatusCode share
//   their numeric values (both are google.rpc.Code), so the mapping keeps code and message
//   unchanged; an out-of-range code becomes UNKNOWN rather than an invalid enum value.
// - Pure functions; thread-safe.
#ifndef ARCFACE_SERVER_SERVICE_STATUS_MAPPING_H_
#define ARCFACE_SERVER_SERVICE_STATUS_MAPPING_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "arcface/v1/face_embedding.pb.h"

namespace arcface::service {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);
// For EmbedStream responses: the error travels as data inside the stream.
void ToProtoStatus(const absl::Status& status, arcface::v1::Status* out);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_STATUS_MAPPING_H_
