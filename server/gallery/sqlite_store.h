// The SQLite GalleryStore (sqlite:PATH): the embedded default, one file on a volume, written by
// this server alone.
//
// Contract: GalleryStore's (gallery_store.h), plus
// - Durability: WAL journal with synchronous=FULL, one transaction per write; a write is
//   acknowledged after its commit reached the disk, so `kill -9` (or a power cut) right after
//   loses nothing and a torn write is never visible.
// - One writer: the file is locked exclusively (a second server on the same file is refused
//   with FAILED_PRECONDITION naming the file), so no other process's change can be missed.
// - Schema: created and migrated by the server (PRAGMA user_version); a file of a newer schema
//   is FAILED_PRECONDITION. Embeddings are raw little-endian float32 blobs with their model_id.
// - Thread safety: one connection behind a mutex.
#ifndef ARCFACE_SERVER_GALLERY_SQLITE_STORE_H_
#define ARCFACE_SERVER_GALLERY_SQLITE_STORE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/gallery/gallery_store.h"

namespace arcface::gallery {

// `path`: the database file, created (with its folder's existing permissions) when missing.
absl::StatusOr<std::unique_ptr<GalleryStore>> OpenSqliteStore(const std::string& path);

}  // namespace arcface::gallery

#endif  // ARCFACE_SERVER_GALLERY_SQLITE_STORE_H_
