#include "server/service/gallery_search.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/gallery/ids.h"
#include "server/service/call_context.h"

namespace arcface::service {

absl::Status NoGalleryError() {
  return absl::UnimplementedError(
      "this server runs without a face gallery (--gallery-store none); start it with "
      "--gallery-store sqlite:PATH or postgres://... to enable FaceGallery");
}

std::string GalleryName(const std::string& name) {
  return name.empty() ? std::string(gallery::kDefaultGallery) : name;
}

absl::StatusOr<int> GallerySearch::TopK(uint32_t requested) const {
  const int top_k =
      requested == 0 ? 1 : static_cast<int>(std::min<uint32_t>(requested, uint32_t{1} << 30));
  if (top_k > max_top_k_) {
    return absl::InvalidArgumentError(absl::StrCat("top_k is ", requested, ", the limit is ",
                                                   max_top_k_, " (--gallery-max-top-k)"));
  }
  return top_k;
}

void GallerySearch::Search(GalleryQuery query, Done done) {
  const int64_t cost = query.n;
  // The job owns `done` until it runs; a refused job is destroyed unrun, so the refusal is
  // reported through a handle that outlives it.
  auto shared_done = std::make_shared<Done>(std::move(done));
  absl::Status queued = queue_->Submit(
      [this, query = std::move(query), shared_done]() mutable {
        Done done = std::move(*shared_done);
        absl::Status alive = CheckAlive(query.is_cancelled, query.deadline, service_metrics_);
        if (!alive.ok()) {
          done(std::move(alive));
          return false;
        }
        GalleryMatches matches;
        const absl::Time start = absl::Now();
        absl::Status searched =
            galleries()->Identify(query.gallery, query.model_id, query.units.data(), query.n,
                                  query.top_k, query.threshold, &matches.results, &matches.version,
                                  static_cast<int>(query.units.size() / std::max(1, query.n)));
        if (!searched.ok()) {
          done(std::move(searched));
          return false;
        }
        metrics_->RecordSearch(query.n, SecondsSince(start));
        done(std::move(matches));
        return false;
      },
      cost);
  if (!queued.ok()) (*shared_done)(std::move(queued));
}

void FillIdentification(std::vector<gallery::Candidate> found, arcface::v1::Identification* out) {
  for (gallery::Candidate& c : found) {
    auto* candidate = out->add_candidates();
    candidate->set_subject_id(std::move(c.subject_id));
    candidate->set_face_id(std::move(c.face_id));
    candidate->set_similarity(c.similarity);
  }
}

}  // namespace arcface::service
