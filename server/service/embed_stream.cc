#include "server/service/embed_stream.h"

#include "arcface/v1/face_embedding.pb.h"
#include "server/service/admission.h"
#include "server/service/embed_call.h"
#include "server/service/stream_reactor.h"

namespace arcface::service {
namespace {

struct EmbedStreamMethod {
  using Request = arcface::v1::EmbedRequest;
  using Response = arcface::v1::EmbedResponse;
  static constexpr char kRpc[] = "EmbedStream";
  static void Start(const CallEnv& env, const Request* request, Response* response,
                    CallContext call, DoneFn done) {
    StartEmbed(env, request, response, std::move(call), std::move(done));
  }
  static void Describe(const CallEnv& env, Response* response) {
    response->set_model_id(env.admission->models().default_model()->model_id());
  }
};

}  // namespace

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* OpenEmbedStream(
    const CallEnv& env, grpc::CallbackServerContext* context) {
  return OpenStream<EmbedStreamMethod>(env, context);
}

}  // namespace arcface::service
