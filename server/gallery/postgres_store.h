// The PostgreSQL GalleryStore (postgres://... URIs): one store shared by several replicas. Each
// replica keeps its galleries in memory and follows the others' writes: a committed write
// NOTIFYs the channel `arcface_gallery` (payload: the gallery and its new version), and a
// listening connection on the store's own thread calls the listener, which catches up with
// ChangesSince(); after a reconnect it catches up once, whatever it missed meanwhile.
//
// Contract: GalleryStore's (gallery_store.h), plus
// - Schema: created and migrated by the server in one transaction under an advisory lock
//   (replicas starting together migrate once); a schema newer than this server is
//   FAILED_PRECONDITION. Embeddings are raw little-endian float32 (bytea) with their model_id.
// - Outage: a write while the database is unreachable fails UNAVAILABLE with libpq's reason,
//   at once or within the connect timeout; Health() says down, the listener's availability() is
//   called on each change, and the store reconnects in the background (backoff up to 2 s).
// - Follow(): changed() is also called once each time LISTEN is (re)established, the first
//   time included (so nothing committed between the caller's load and LISTEN is missed), and
//   for this store's own writes too (NOTIFY reaches every listener): the catch-up then finds
//   versions the caller may already hold. A connection that breaks and reconnects at once is
//   no outage (no availability() calls, one catch-up).
// - Replay: an Enroll whose request_id was used before answers the earlier write's face_ids
//   and version (the same answer as then).
// - Connection: libpq's URI, plus connect_timeout=2 and TCP keepalives unless the URI sets
//   them (an outage is noticed and refused within seconds). Describe() is
//   postgres://user@host:port/db; no message or log line carries the password.
// - Destruction stops the follower (waiting at most one connect timeout).
// - Thread safety: writes and reads use a pool of up to 8 connections (callers beyond wait);
//   a pooled connection found broken (the server restarted) is replaced once, transparently.
//   All methods may be called from any thread.
#ifndef ARCFACE_SERVER_GALLERY_POSTGRES_STORE_H_
#define ARCFACE_SERVER_GALLERY_POSTGRES_STORE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/gallery/gallery_store.h"

namespace arcface::gallery {

// `uri`: libpq's connection URI (postgres:// or postgresql://). Fails UNAVAILABLE when the
// database cannot be reached at start-up (the server then refuses to start, naming it).
absl::StatusOr<std::unique_ptr<GalleryStore>> OpenPostgresStore(const std::string& uri);

}  // namespace arcface::gallery

#endif  // ARCFACE_SERVER_GALLERY_POSTGRES_STORE_H_
