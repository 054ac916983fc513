// The work of one Embed: a unary call, or one message of an EmbedStream. Its faces are decoded,
// cropped and aligned on the preprocessing pool, their crops go through the Embedder's batcher,
// and the embeddings are written into the response in face order.
//
// Contract
// - Ownership: `request` and `response` are borrowed until `done` is called, and not touched
//   after it (a stream frees them in its done). `env` is copied; what it points to outlives
//   the call.
// - Blocking: StartEmbed() never blocks; `done` is called exactly once, possibly before it
//   returns (an early error, an empty request), else from the pool or the batch thread.
// - Model: request.model names the served model (empty: the default); an unknown one is
//   NOT_FOUND naming the served ones. The response's model_id is that model's.
// - Errors: RESOURCE_EXHAUSTED for too many faces or a full pool or batcher, INVALID_ARGUMENT
//   naming the face ("face 3: ..."), DEADLINE_EXCEEDED / CANCELLED (see the service's contract).
// - Thread safety: calls are independent; each may start from any thread.
#ifndef ARCFACE_SERVER_SERVICE_EMBED_CALL_H_
#define ARCFACE_SERVER_SERVICE_EMBED_CALL_H_

#include "absl/status/status.h"
#include "arcface/v1/face_embedding.pb.h"
#include "server/service/call_context.h"

namespace arcface::service {

// One row of the model (`dim` raw floats and its norm) into `e`: the values raw, or divided by
// the norm with `normalize`; Embed's and Detect's embeddings alike.
void FillEmbedding(const float* row, int dim, float norm, bool normalize,
                   arcface::v1::Embedding* e);

// Fills *response and calls `done` (see the contract). The request_id is not checked here.
void StartEmbed(const CallEnv& env, const arcface::v1::EmbedRequest* request,
                arcface::v1::EmbedResponse* response, CallContext call, DoneFn done);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_EMBED_CALL_H_
