// ServiceOptions: the limits of FaceEmbeddingService (face_embedding_service.h), in a header of
// their own so that the calls (embed_call.h, embed_stream.h, compare_call.h) see them without
// seeing the service class that wires them. Plain values: copied into the service at
// construction, never changed afterwards. The ranges are those ParseServerFlags enforces for
// the flags named; the service itself does not check them.
#ifndef ARCFACE_SERVER_SERVICE_SERVICE_OPTIONS_H_
#define ARCFACE_SERVER_SERVICE_SERVICE_OPTIONS_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "server/image/image.h"

namespace arcface::service {

// The longest request_id accepted (Embed, EmbedStream); it is echoed in every answer.
inline constexpr size_t kMaxRequestIdBytes = 1024;

struct ServiceOptions {
  // Faces in one Embed request (or EmbedStream message), face probes (queries and references
  // together) in one Compare; more is RESOURCE_EXHAUSTED. 1..1000000, default 256
  // (--max-faces-per-request).
  int max_faces_per_request = 256;
  // Compare: queries (rows) and references (columns) at most; more is RESOURCE_EXHAUSTED.
  // 1..65536 each, default 4096 (--max-compare-rows, --max-compare-cols).
  int max_compare_rows = 4096;
  int max_compare_cols = 4096;
  // EmbedStream: messages of one stream processed at once (read and not yet answered). >= 1,
  // default 16.
  int stream_max_in_flight = 16;
  // Bytes held by one stream, and by all streams together, beyond which streams stop reading
  // (a stream holding nothing still reads one message). >= 1 each, defaults 16 MiB and 256 MiB.
  int64_t stream_max_held_bytes = int64_t{16} << 20;
  int64_t streams_max_held_bytes = int64_t{256} << 20;
  // Decoding caps of every face (see image::Limits; defaults there, --max-image-pixels).
  image::Limits image_limits;
  // Requests: enforced by the gRPC server (reported by GetModelInfo). Replies: a Compare whose
  // reply would exceed it is refused (RESOURCE_EXHAUSTED) up front. 1024..2^31-1, default 64 MiB
  // (--max-message-bytes).
  uint64_t max_message_bytes = uint64_t{64} << 20;
  // Reported by GetModelInfo as is; default empty.
  std::string server_version;
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_SERVICE_OPTIONS_H_
