// GalleryStore: where galleries are durable. The server keeps every gallery in memory (Galleries,
// galleries.h) and the store is its source of truth: writes go to the store first and reach
// memory as the GalleryDelta the store answers; a shared store (PostgreSQL) also tells each
// replica when others wrote, and the replica catches up with ChangesSince().
//
// Contract
// - Versions: each gallery has a version, 0 before its first write, raised by exactly 1 by every
//   committed Enroll or Forget of that gallery. A delta takes a gallery from `from_version` to
//   `version`; applied in version order to the state at from_version it gives the state at
//   version. Deltas are net: a face added and removed within one delta's span appears in
//   neither list; removing an id that is not there is a no-op for whoever applies it.
// - Durability: Enroll() and Forget() return only after their transaction is committed and
//   durable (SQLite: WAL with synchronous=FULL; PostgreSQL: a committed transaction). A failed
//   write changed nothing (one transaction).
// - Errors (absl::Status, with the reason in the message):
//   FAILED_PRECONDITION  the gallery is bound to another model_id (the message names both);
//   NOT_FOUND            Forget of a gallery, subject or face that is not there (names it);
//   ALREADY_EXISTS       an Enroll's request_id was used before for another subject;
//   UNAVAILABLE          the store cannot be reached (transient: PostgreSQL down), the reason;
//   INTERNAL             the store's content is not what this server wrote (names the row).
//   Inputs are validated by the caller (ids, dimensions, finiteness); the store trusts them.
// - Blocking: every method blocks on I/O. Thread safety: all methods may be called from any
//   thread at once (implementations serialize what they must).
// - Ownership: the listener given to Follow() is called on the store's own thread until the
//   store is destroyed; it must not call back into the store on that thread for long.
#ifndef ARCFACE_SERVER_GALLERY_GALLERY_STORE_H_
#define ARCFACE_SERVER_GALLERY_GALLERY_STORE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace arcface::gallery {

// ArcFace's embedding size: the default dimension of an index. A store keeps embeddings of any
// size (a gallery's are all of its model's: 512 for ArcFace, 128 for dlib) as they are, so
// stores written before several models were served read the same.
inline constexpr int kDim = 512;

using Labels = std::map<std::string, std::string>;

struct SubjectRecord {
  std::string subject_id;
  Labels labels;  // the subject's labels after the delta
};

struct GalleryDelta {
  std::string gallery;
  std::string model_id;
  uint64_t from_version = 0;
  uint64_t version = 0;
  // When the newest write in the delta was committed, on the store's clock (sync lag).
  absl::Time committed = absl::InfinitePast();
  // Applied in this order: faces removed, subjects removed, subjects upserted, faces added.
  std::vector<std::string> removed_faces;
  std::vector<std::string> removed_subjects;
  std::vector<SubjectRecord> subjects;
  std::vector<std::string> face_ids;       // faces added
  std::vector<std::string> face_subjects;  // the subject of each added face
  std::vector<float> embeddings;           // face_ids.size() × dim unit vectors, row-major
};

struct EnrollWrite {
  std::string gallery;
  std::string model_id;  // the model that computed `embeddings`
  std::string subject_id;
  Labels labels;           // set on the subject: keys given replace their values, others are kept
  std::string request_id;  // idempotency key; empty: none
  std::vector<std::string> face_ids;  // new, unique ids chosen by the caller, one per face
  // face_ids.size() × dim unit vectors, dim the model's (one size for all faces of a gallery)
  std::vector<float> embeddings;
};

struct EnrollResult {
  // The faces' ids: the write's, or, when `replayed`, those of the earlier Enroll with the same
  // request_id (which added them; this one added nothing and did not raise the version).
  std::vector<std::string> face_ids;
  uint64_t version = 0;
  bool replayed = false;
  GalleryDelta delta;  // the write's change (empty when replayed)
};

// Either a subject (with all its faces) or faces (of `subject_id` when it is not empty). A
// subject whose last face is removed is removed with it.
struct ForgetWrite {
  std::string gallery;
  std::string subject_id;
  std::vector<std::string> face_ids;
};

struct ForgetResult {
  uint32_t faces_removed = 0;
  uint64_t version = 0;
  GalleryDelta delta;
};

// Told by a shared store about the others' writes and about its own connection.
struct StoreListener {
  // Others committed (or the connection came back): call ChangesSince() to catch up.
  std::function<void()> changed;
  // The store went down (`up` false, with the reason) or came back.
  std::function<void(bool up, const std::string& reason)> availability;
};

class GalleryStore {
 public:
  virtual ~GalleryStore() = default;

  // "sqlite:/data/gallery.db", "postgres://host:5432/db": what GalleryInfo.store reports (never
  // a password).
  virtual std::string Describe() const = 0;
  // One delta per gallery whose version is above its version in `known` (a gallery absent from
  // `known` counts as version 0, so an empty `known` loads everything).
  virtual absl::StatusOr<std::vector<GalleryDelta>> ChangesSince(
      const absl::flat_hash_map<std::string, uint64_t>& known) = 0;
  virtual absl::StatusOr<EnrollResult> Enroll(const EnrollWrite& write) = 0;
  virtual absl::StatusOr<ForgetResult> Forget(const ForgetWrite& write) = 0;
  // A store that others write too starts telling `listener` about it; the default (a store
  // only this process writes) never calls it.
  virtual void Follow(StoreListener listener) { (void)listener; }
  // Whether the store is reachable now, and why not.
  virtual std::pair<bool, std::string> Health() const { return {true, ""}; }
};

// The delta of a committed Enroll: `write`'s faces added to its subject (whose labels, after the
// merge, are `labels`), taking the gallery from `version` - 1 to `version`. What both stores
// answer for their own writes.
GalleryDelta EnrollDelta(const EnrollWrite& write, Labels labels, uint64_t version,
                         absl::Time committed);

// Opens the store `uri` names: "sqlite:PATH" or "postgres://..." / "postgresql://..." (libpq's
// URI); the schema is created or migrated to this server's version. Errors: INVALID_ARGUMENT
// for a URI of no known kind, the store's own error (UNAVAILABLE, FAILED_PRECONDITION for a
// schema newer than this server) otherwise. "none" is not a store (the caller handles it).
absl::StatusOr<std::unique_ptr<GalleryStore>> OpenGalleryStore(const std::string& uri);

}  // namespace arcface::gallery

#endif  // ARCFACE_SERVER_GALLERY_GALLERY_STORE_H_
