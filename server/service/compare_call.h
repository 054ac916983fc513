// The work of one Compare: the cosine similarity matrix of queries × references, each probe an
// embedding or a face. Face probes are embedded first (preprocessing pool, then the batcher);
// a small matrix is then computed where the embeddings are, a large one on the pool a block of
// rows at a time.
//
// Contract
// - Ownership: `request` and `response` are borrowed until `done` is called. `env` is copied;
//   what it points to outlives the call.
// - Blocking: StartCompare() never blocks; `done` is called exactly once, possibly before it
//   returns, else from the pool or the batch thread.
// - Errors: RESOURCE_EXHAUSTED for a matrix over the caps or whose reply would exceed
//   max_message_bytes, too many face probes, a full pool or batcher (all before any work but
//   the last); INVALID_ARGUMENT naming the probe ("query 2: embedding has 128 values, expected
//   512"); NOT_FOUND for an unknown request.model; FAILED_PRECONDITION for an embedding probe
//   of another model than the request's (Probe.model_id); DEADLINE_EXCEEDED / CANCELLED,
//   checked before each block of rows.
// - Model: request.model (empty: the default) embeds the face probes and fixes the embeddings'
//   size; the response's model_id is its.
// - Thread safety: calls are independent; each may start from any thread.
#ifndef ARCFACE_SERVER_SERVICE_COMPARE_CALL_H_
#define ARCFACE_SERVER_SERVICE_COMPARE_CALL_H_

#include <cstddef>
#include <cstdint>

#include "arcface/v1/face_embedding.pb.h"
#include "server/service/call_context.h"

namespace arcface::service {

// Fills *response and calls `done` (see the contract).
void StartCompare(const CallEnv& env, const arcface::v1::CompareRequest* request,
                  arcface::v1::CompareResponse* response, CallContext call, DoneFn done);

// An upper bound on the serialized size of a CompareResponse of rows × cols (with `matches` when
// a threshold is given): a Compare whose reply would exceed ServiceOptions::max_message_bytes is
// refused before any work.
uint64_t CompareReplyBytes(int rows, int cols, bool with_matches, size_t model_id_bytes);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_COMPARE_CALL_H_
