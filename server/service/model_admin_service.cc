#include "server/service/model_admin_service.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/service/admission.h"

namespace arcface::service {
namespace {

arcface::v1::ModelReload::Result ToProto(ModelReload::Result result) {
  switch (result) {
    case ModelReload::Result::kReloaded:
      return arcface::v1::ModelReload::RELOADED;
    case ModelReload::Result::kUnchanged:
      return arcface::v1::ModelReload::UNCHANGED;
    case ModelReload::Result::kFailed:
      return arcface::v1::ModelReload::FAILED;
  }
  return arcface::v1::ModelReload::FAILED;
}

}  // namespace

grpc::ServerUnaryReactor* ModelAdminService::ReloadModels(
    grpc::CallbackServerContext* context, const arcface::v1::ReloadModelsRequest* request,
    arcface::v1::ReloadModelsResponse* response) {
  return ServeUnary(
      env_, context, "ReloadModels", [this, request, response](CallContext, DoneFn done) {
        ModelReloader* reloader = reloader_.load();
        if (reloader == nullptr) {
          return done(absl::UnimplementedError(
              "model administration is off: start the server with --admin-rpc (a loopback --listen "
              "address or mutual TLS), or send the server process SIGHUP to reload every model"));
        }
        const size_t served = env_.admission->models().all().size();
        if (size_t(request->models_size()) > served) {
          return done(absl::InvalidArgumentError(absl::StrCat(
              "models: ", request->models_size(), " names, but this server serves ", served)));
        }
        std::vector<std::string> names(request->models().begin(), request->models().end());
        reloader->Request(std::move(names), "ReloadModels",
                          [response, done = std::move(done)](
                              absl::StatusOr<std::vector<ModelReload>> results) mutable {
                            if (!results.ok()) return done(results.status());
                            for (const ModelReload& r : *results) {
                              arcface::v1::ModelReload* out = response->add_models();
                              out->set_model(r.model);
                              out->set_result(ToProto(r.result));
                              out->set_model_id(r.model_id);
                              out->set_previous_model_id(r.previous_model_id);
                              out->set_error(r.error);
                              out->set_seconds(r.seconds);
                            }
                            done(absl::OkStatus());
                          });
      });
}

}  // namespace arcface::service
