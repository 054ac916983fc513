// ModelAdminService: the arcface.v1.ModelAdmin gRPC service (ReloadModels), on the callback API.
//
// Contract
// - Off unless the server runs with --admin-rpc: until SetReloader() (and for good without it),
//   ReloadModels answers UNIMPLEMENTED naming the flag and SIGHUP. The server accepts the flag
//   only where the port cannot be reached by others (a loopback --listen) or with mutual TLS
//   (server_config.h), so only the operator's own tools reach it.
// - Calls are admitted, drained and metered with FaceEmbeddingService's (the CallEnv it
//   shares): UNAVAILABLE before the models are ready and after a drain began.
// - ReloadModels answers once every named model is reloaded (seconds: a new version is built
//   and warmed up); a deadline or a cancellation does not stop a reload once begun, it only
//   drops the answer. Errors: NOT_FOUND for a model not served (naming those that are),
//   INVALID_ARGUMENT for an empty name or more names than models; a model whose new file fails
//   is a FAILED result in an OK answer, not an error of the call.
// - Lifetime: the env's parts and the reloader are borrowed and outlive every call (the server
//   shuts gRPC down first). Thread safety: any method from any thread.
#ifndef ARCFACE_SERVER_SERVICE_MODEL_ADMIN_SERVICE_H_
#define ARCFACE_SERVER_SERVICE_MODEL_ADMIN_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>

#include "arcface/v1/face_embedding.grpc.pb.h"
#include "server/service/call_context.h"
#include "server/service/model_reloader.h"

namespace arcface::service {

class ModelAdminService final : public arcface::v1::ModelAdmin::CallbackService {
 public:
  explicit ModelAdminService(const CallEnv& env) : env_(env) {}

  // --admin-rpc: reloads go to `reloader` from now on.
  void SetReloader(ModelReloader* reloader) { reloader_.store(reloader); }

  grpc::ServerUnaryReactor* ReloadModels(grpc::CallbackServerContext* context,
                                         const arcface::v1::ReloadModelsRequest* request,
                                         arcface::v1::ReloadModelsResponse* response) override;

 private:
  const CallEnv env_;
  std::atomic<ModelReloader*> reloader_{nullptr};
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_MODEL_ADMIN_SERVICE_H_
