#include "server/service/gallery_metrics.h"

#include <vector>

#include "absl/status/status.h"

namespace arcface::service {

GalleryMetrics::GalleryMetrics(MetricsRegistry* registry)
    : faces_(
          registry->AddGauge("arcface_gallery_faces", "Faces enrolled, by gallery.", {"gallery"})),
      subjects_(registry->AddGauge("arcface_gallery_subjects", "Subjects enrolled, by gallery.",
                                   {"gallery"})),
      version_(registry->AddGauge("arcface_gallery_version",
                                  "The version of each gallery held in memory.", {"gallery"})),
      search_seconds_(registry
                          ->AddHistogram("arcface_gallery_identify_search_seconds",
                                         "Identify: the search of one call's probes.",
                                         {0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                                          0.5, 1, 2, 5})
                          .WithLabels({})),
      probes_(
          registry
              ->AddCounter("arcface_gallery_identify_probes_total", "Probes searched by Identify.")
              .WithLabels({})),
      store_errors_(registry->AddCounter(
          "arcface_gallery_store_errors_total",
          "Gallery writes the store failed (not the caller's errors), by operation and code.",
          {"op", "code"})),
      store_up_(registry
                    ->AddGauge("arcface_gallery_store_up",
                               "1 when the gallery store is reachable, else 0.")
                    .WithLabels({})),
      sync_lag_(registry
                    ->AddGauge("arcface_gallery_sync_lag_seconds",
                               "From another replica's commit to its change applied here, for "
                               "the last change caught up (shared stores).")
                    .WithLabels({})),
      load_seconds_(registry
                        ->AddGauge("arcface_gallery_load_seconds",
                                   "Time to load every gallery from the store at start-up.")
                        .WithLabels({})) {
  registry->AddRenderHook([this] { Refresh(); });
}

void GalleryMetrics::SetGalleries(const gallery::Galleries* galleries) {
  galleries_ = galleries;
  if (galleries) load_seconds_.Set(galleries->load_seconds());
}

void GalleryMetrics::RecordSearch(int probes, double seconds) {
  search_seconds_.Observe(seconds);
  probes_.Inc(probes);
}

void GalleryMetrics::RecordStoreResult(const std::string& op, const absl::Status& status) {
  const absl::StatusCode code = status.code();
  if (code != absl::StatusCode::kUnavailable && code != absl::StatusCode::kInternal) return;
  store_errors_.WithLabels({op, absl::StatusCodeToString(code)}).Inc();
}

void GalleryMetrics::Refresh() {
  const gallery::Galleries* galleries = galleries_.load();
  if (galleries == nullptr) return;
  for (const gallery::GalleryStats& s : galleries->AllStats()) {
    faces_.WithLabels({s.gallery}).Set(static_cast<double>(s.num_faces));
    subjects_.WithLabels({s.gallery}).Set(static_cast<double>(s.num_subjects));
    version_.WithLabels({s.gallery}).Set(static_cast<double>(s.version));
  }
  const gallery::SyncStats sync = galleries->sync();
  store_up_.Set(sync.store_up ? 1 : 0);
  sync_lag_.Set(sync.last_lag_seconds);
}

}  // namespace arcface::service
