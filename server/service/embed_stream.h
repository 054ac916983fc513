// EmbedStream: one EmbedResponse per request message, in order, request_id echoed (see the
// service's contract, face_embedding_service.h, for what a client sees). Each message's work is
// an Embed (embed_call.h); the reactor around it (reading, backpressure, ordering of the
// answers, cancellation and the drain) is stream_reactor.h's, whose contract this is.
#ifndef ARCFACE_SERVER_SERVICE_EMBED_STREAM_H_
#define ARCFACE_SERVER_SERVICE_EMBED_STREAM_H_

#include <grpcpp/grpcpp.h>

#include "server/service/call_context.h"

namespace arcface::service {

// Admits the stream (or answers it with the refusal) and starts reading.
grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* OpenEmbedStream(
    const CallEnv& env, grpc::CallbackServerContext* context);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_EMBED_STREAM_H_
