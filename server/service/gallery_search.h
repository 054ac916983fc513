// GallerySearch: Identify's search, shared by FaceGallery.Identify and Detect with a gallery:
// the top_k rule, and the search itself on the gallery's own WorkQueue (so that a large search
// never holds the threads that decode other callers' faces), timed into GalleryMetrics.
//
// Contract
// - Ownership: the queue and the metrics are borrowed and must outlive every search; so must
//   the galleries set by SetGalleries() (null until then, and for good with --gallery-store
//   none).
// - Search(): `done` is called exactly once: on the queue's thread with the results, or with
//   the call's DEADLINE_EXCEEDED / CANCELLED (checked before searching), the galleries' error
//   (NOT_FOUND for an unknown gallery, FAILED_PRECONDITION for one bound to another model), or,
//   on the caller's thread before Search() returns, the queue's refusal.
// - Thread safety: every method may be called from any thread.
#ifndef ARCFACE_SERVER_SERVICE_GALLERY_SEARCH_H_
#define ARCFACE_SERVER_SERVICE_GALLERY_SEARCH_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "arcface/v1/face_embedding.pb.h"
#include "server/gallery/galleries.h"
#include "server/service/gallery_metrics.h"
#include "server/service/service_metrics.h"
#include "server/service/work_queue.h"

namespace arcface::service {

// What a gallery method answers without galleries (UNIMPLEMENTED, saying how to enable them).
absl::Status NoGalleryError();

// A request's gallery name; empty names the default gallery.
std::string GalleryName(const std::string& name);

struct GalleryQuery {
  std::string gallery;
  std::string model_id;      // of the probes
  std::vector<float> units;  // n rows of the model's embedding_dim unit vectors
  int n = 0;
  int top_k = 1;
  std::optional<float> threshold;
  absl::Time deadline = absl::InfiniteFuture();
  std::function<bool()> is_cancelled;
};

struct GalleryMatches {
  std::vector<std::vector<gallery::Candidate>> results;  // one per probe
  uint64_t version = 0;
};

class GallerySearch {
 public:
  using Done = absl::AnyInvocable<void(absl::StatusOr<GalleryMatches>)>;

  // `max_top_k`: --gallery-max-top-k. `service_metrics` counts the calls found dead.
  GallerySearch(WorkQueue* queue, GalleryMetrics* metrics, ServiceMetrics* service_metrics,
                int max_top_k)
      : queue_(queue), metrics_(metrics), service_metrics_(service_metrics),
        max_top_k_(max_top_k) {}

  void SetGalleries(gallery::Galleries* galleries) { galleries_.store(galleries); }
  gallery::Galleries* galleries() const { return galleries_.load(); }

  // A request's top_k: 0 means 1; above --gallery-max-top-k is INVALID_ARGUMENT naming it.
  absl::StatusOr<int> TopK(uint32_t requested) const;

  // Searches on the gallery queue (see the contract). The galleries must be set.
  void Search(GalleryQuery query, Done done);

 private:
  WorkQueue* const queue_;
  GalleryMetrics* const metrics_;
  ServiceMetrics* const service_metrics_;
  const int max_top_k_;
  std::atomic<gallery::Galleries*> galleries_{nullptr};
};

// One probe's candidates into the wire's Identification.
void FillIdentification(std::vector<gallery::Candidate> found, arcface::v1::Identification* out);

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_GALLERY_SEARCH_H_
