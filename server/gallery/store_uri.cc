#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/gallery/gallery_store.h"
#include "server/gallery/postgres_store.h"
#include "server/gallery/sqlite_store.h"

namespace arcface::gallery {

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
