// EmbedStream: one EmbedResponse per request message, in order, request_id echoed (see the
// service's contract, face_embedding_service.h, for what a client sees). Each message's work is
// an Embed (embed_call.h); this is the reactor around it: reading, backpressure, ordering of the
// answers, cancellation and the drain.
//
// Contract
// - Ownership: OpenEmbedStream() returns a reactor that gRPC drives and that deletes itself in
//   OnDone (releasing its admitted call then). `env` is copied; what it points to outlives
//   every stream.
// - Blocking: nothing blocks. Reactions take the stream's short mutex and start gRPC operations
//   with it released (gRPC may run a reaction inline).
// - Errors: a message's error travels in its EmbedResponse.error and the stream goes on; the
//   stream itself ends UNAVAILABLE when refused at admission or drained before the client
//   half-closed, CANCELLED when cancelled or a write failed.
// - Memory: a stream reads while the bytes it holds (messages read and not answered, answers
//   not written) stay under stream_max_held_bytes and those of all streams under
//   streams_max_held_bytes, or while it holds nothing; at most stream_max_in_flight messages
//   are in work at once.
// - Thread safety: reactions, message completions (pool or batch threads) and the drain may run
//   concurrently.
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
