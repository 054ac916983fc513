#include "server/service/detect_stream.h"

#include <utility>

#include "arcface/v1/face_embedding.pb.h"
#include "server/service/detect_call.h"
#include "server/service/stream_reactor.h"

namespace arcface::service {
namespace {

struct DetectStreamMethod {
  using Request = arcface::v1::DetectRequest;
  using Response = arcface::v1::DetectResponse;
  static constexpr char kRpc[] = "DetectStream";
  static void Start(const CallEnv& env, const Request* request, Response* response,
                    CallContext call, DoneFn done) {
    StartDetect(env, request, response, std::move(call), std::move(done));
  }
  static void Describe(const CallEnv& env, Response* response) {
    if (env.detection != nullptr && env.detection->detector != nullptr) {
      response->set_detector_id(env.detection->detector->description().detector_id);
    }
  }
};

}  // namespace

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* OpenDetectStream(
    const CallEnv& env, grpc::CallbackServerContext* context) {
  return OpenStream<DetectStreamMethod>(env, context);
}

}  // namespace arcface::service
