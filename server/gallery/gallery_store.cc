#include "server/gallery/gallery_store.h"

#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/gallery/postgres_store.h"
#include "server/gallery/sqlite_store.h"

namespace arcface::gallery {

GalleryDelta EnrollDelta(const EnrollWrite& write, Labels labels, uint64_t version,
                         absl::Time committed) {
  GalleryDelta d;
  d.gallery = write.gallery;
  d.model_id = write.model_id;
  d.from_version = version - 1;
  d.version = version;
  d.committed = committed;
  d.subjects.push_back(SubjectRecord{write.subject_id, std::move(labels)});
  d.face_ids = write.face_ids;
  d.face_subjects.assign(write.face_ids.size(), write.subject_id);
  d.embeddings = write.embeddings;
  return d;
}

absl::StatusOr<std::unique_ptr<GalleryStore>> OpenGalleryStore(const std::string& uri) {
  if (absl::StartsWith(uri, "sqlite:")) {
    const std::string path = uri.substr(7);
    if (path.empty()) {
      return absl::InvalidArgumentError("gallery store 'sqlite:' names no file (sqlite:PATH)");
    }
    return OpenSqliteStore(path);
  }
  if (absl::StartsWith(uri, "postgres://") || absl::StartsWith(uri, "postgresql://")) {
    return OpenPostgresStore(uri);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "gallery store '", uri, "' is of no known kind: sqlite:PATH, postgres://... or none"));
}

}  // namespace arcface::gallery
