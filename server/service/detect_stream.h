// DetectStream: one DetectResponse per frame, in order, request_id echoed; a frame's error
// travels in its DetectResponse.error (with request_id and detector_id) and the stream goes on,
// also for a message that does not parse as a DetectRequest. Each frame's work is a Detect
// (detect_call.h); the reactor around it is EmbedStream's (stream_reactor.h: reading,
// backpressure, at most ServiceOptions::stream_max_in_flight frames in work at once, ordering,
// cancellation and the drain).
//
// Contract: as stream_reactor.h's. With --detector none every frame is answered UNIMPLEMENTED
// in its error, saying how to enable the detector.
#ifndef ARCFACE_SERVER_SERVICE_DETECT_STREAM_H_
#define ARCFACE_SERVER_SERVICE_DETECT_STREAM_H_

#include <grpcpp/grpcpp.h>

#include "server/service/call_context.h"

namespace arcface::service {

// Admits the stream (or answers it with the refusal) and starts reading.
grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* OpenDetectStream(
    const CallEnv& env, grpc::CallbackServerContext* context);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_DETECT_STREAM_H_
