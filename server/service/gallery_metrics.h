// GalleryMetrics: the gallery's metric families, in the service's registry: faces, subjects and
// version per gallery, Identify's search time, store errors, whether the store is up, how late
// others' writes arrive here (sync lag), and the start-up load time.
//
// Contract
// - Ownership: the registry and the Galleries (set by SetGalleries) are borrowed and must
//   outlive the metrics' last Render().
// - Per-gallery gauges and the store's state are read from Galleries at each scrape (a render
//   hook), so writes by other replicas show without a local write.
// - Thread safety: every method may be called from any thread.
#ifndef ARCFACE_SERVER_SERVICE_GALLERY_METRICS_H_
#define ARCFACE_SERVER_SERVICE_GALLERY_METRICS_H_

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "server/gallery/galleries.h"
#include "server/service/prometheus_registry.h"

namespace arcface::service {

class GalleryMetrics {
 public:
  explicit GalleryMetrics(MetricsRegistry* registry);

  // The galleries to report on, once loaded (null: none, the families stay empty).
  void SetGalleries(const gallery::Galleries* galleries);
  void RecordSearch(int probes, double seconds);
  // A write the store refused or failed: `op` "enroll" or "forget"; only the store's own
  // failures count (UNAVAILABLE, INTERNAL), not the caller's errors.
  void RecordStoreResult(const std::string& op, const absl::Status& status);

 private:
  void Refresh();

  Family<Gauge>& faces_;
  Family<Gauge>& subjects_;
  Family<Gauge>& version_;
  Histogram& search_seconds_;
  Counter& probes_;
  Family<Counter>& store_errors_;
  Gauge& store_up_;
  Gauge& sync_lag_;
  Gauge& load_seconds_;
  std::atomic<const gallery::Galleries*> galleries_{nullptr};
};

}  // namespace arcface::service

#endif  // ARCFACE_SERVER_SERVICE_GALLERY_METRICS_H_
