// Galleries: every gallery of the server, in memory, kept equal to the store. Enroll and Forget
// write to the store first and change memory only with what the store committed; Identify
// searches memory. A shared store's other writers are followed (GalleryStore::Follow).
//
// Contract
// - Ownership: owns the store and the indexes. Open() loads every gallery (blocking; the server
//   reports ready only after it) and then starts following the store.
// - Consistency: memory moves from version to version of each gallery, in order; a write is
//   visible to Identify when Enroll()/Forget() return (deletions included). A delta that does
//   not start at the version held (another replica wrote in between) makes Galleries catch up
//   from the store first. Identify answers from memory even while the store is down.
// - Identify: exact by default (the answer of a brute-force scan, up to ties and float rounding
//   of dot products); for each probe, up to top_k distinct subjects, each with its best face,
//   by similarity descending, only those >= threshold when one is given. A gallery with at
//   least options.hnsw_min_faces faces is searched approximately once its graph is built (in
//   the background; exact meanwhile) — GalleryStats.index says which.
// - Errors: NOT_FOUND (unknown gallery), FAILED_PRECONDITION (gallery bound to another model,
//   naming both), the store's errors for writes (UNAVAILABLE when it is down), INVALID_ARGUMENT
//   for a page token this server did not give. Inputs are validated by the caller: ids
//   (ids.h), unit vectors of finite floats, top_k >= 1; Identify's probes of the gallery's dim
//   (GalleryStats::dim: a gallery holds one model's embeddings, of one size, set by its first
//   faces; an Enroll of another size is FAILED_PRECONDITION naming both).
// - Blocking: writes block on the store; Identify on the search (FAISS's OpenMP threads).
// - Thread safety: every method may be called from any thread at once. Writes are serialized;
//   Identify calls run concurrently with each other and wait only for a write to the same
//   gallery (its in-memory apply, not its store commit).
#ifndef ARCFACE_SERVER_GALLERY_GALLERIES_H_
#define ARCFACE_SERVER_GALLERY_GALLERIES_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/gallery/gallery_store.h"
#include "server/gallery/hnsw_index.h"
#include "server/gallery/vector_index.h"

namespace arcface::gallery {

struct GalleriesOptions {
  // A new gallery's exact index; empty: MakeFlatIndex().
  VectorIndexFactory index_factory;
  // Galleries with at least this many faces are also searched by HNSW; 0: never.
  uint64_t hnsw_min_faces = 0;
  HnswOptions hnsw;
};

struct Candidate {
  std::string subject_id;
  std::string face_id;
  float similarity = 0;
};

struct GalleryStats {
  std::string gallery;
  std::string model_id;
  uint64_t num_subjects = 0;
  uint64_t num_faces = 0;
  uint64_t version = 0;
  std::string index;  // "flat", "hnsw(M=32,efSearch=128)", "torch:cuda:0"
  int dim = kDim;     // the embeddings' size (the model's)
};

struct SubjectInfo {
  std::string subject_id;
  uint32_t num_faces = 0;
  Labels labels;
};

// What a store's followers see: how late the last applied change was, and the store's health.
struct SyncStats {
  bool store_up = true;
  std::string store_down_reason;
  double last_lag_seconds = 0;  // commit (store clock) to applied here, for others' writes
  uint64_t catch_ups = 0;
};

class Galleries {
 public:
  // Loads everything from `store` (load time in load_seconds()). Errors: the store's.
  static absl::StatusOr<std::unique_ptr<Galleries>> Open(std::unique_ptr<GalleryStore> store,
                                                         GalleriesOptions options);
  ~Galleries();
  Galleries(const Galleries&) = delete;
  Galleries& operator=(const Galleries&) = delete;

  absl::StatusOr<EnrollResult> Enroll(const EnrollWrite& write);
  absl::StatusOr<ForgetResult> Forget(const ForgetWrite& write);

  // `probes`: nq unit vectors of `dim` floats from model `model_id`; results: one list per
  // probe. Probes of another size than the gallery's are FAILED_PRECONDITION naming both.
  absl::Status Identify(const std::string& gallery, const std::string& model_id,
                        const float* probes, int nq, int top_k, std::optional<float> threshold,
                        std::vector<std::vector<Candidate>>* results, uint64_t* version,
                        int dim = kDim) const;

  // Subjects by id, after the one `page_token` names (empty: from the first); up to page_size.
  // *next_page_token: empty after the last.
  absl::StatusOr<std::vector<SubjectInfo>> ListSubjects(const std::string& gallery, int page_size,
                                                        const std::string& page_token,
                                                        std::string* next_page_token) const;

  absl::StatusOr<GalleryStats> Stats(const std::string& gallery) const;
  std::vector<GalleryStats> AllStats() const;
  SyncStats sync() const;
  std::string store_description() const { return store_description_; }
  double load_seconds() const { return load_seconds_; }

 private:
  struct Gallery;
  Galleries(std::unique_ptr<GalleryStore> store, GalleriesOptions options);

  // Applies `delta` when it starts at the gallery's version (true); else false (a gap: the
  // caller catches up). A delta at or below the version held is already in: true.
  bool Apply(GalleryDelta delta) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  absl::Status CatchUp() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // Applies a write's own delta, catching up when others wrote in between.
  absl::Status ApplyOwn(GalleryDelta delta) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  Gallery* Find(const std::string& name) const;
  void OnStoreChanged();
  void OnAvailability(bool up, const std::string& reason);
  void MaybeBuildHnsw(Gallery* g) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  void BuildHnsw(Gallery* g);

  // Reset first by the destructor: a shared store's follower thread calls OnStoreChanged() and
  // OnAvailability(), which use the members below, until the store is gone.
  std::unique_ptr<GalleryStore> store_;
  const GalleriesOptions options_;
  const std::string store_description_;
  double load_seconds_ = 0;

  // Serializes writes (store commit + apply) and catch-ups, so that memory follows the store's
  // versions in order.
  absl::Mutex write_mu_;
  mutable absl::Mutex map_mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<Gallery>> galleries_ ABSL_GUARDED_BY(map_mu_);

  mutable absl::Mutex sync_mu_;
  SyncStats sync_ ABSL_GUARDED_BY(sync_mu_);

  // Background HNSW builds (one at a time); joined by the destructor.
  absl::Mutex builds_mu_;
  std::vector<std::thread> builds_ ABSL_GUARDED_BY(builds_mu_);
  std::atomic<bool> stopping_{false};
};

}  // namespace arcface::gallery

#endif  // ARCFACE_SERVER_GALLERY_GALLERIES_H_
