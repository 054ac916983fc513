// Placeholder until the PostgreSQL store lands (branch gallery-pg).
#include "server/gallery/postgres_store.h"

namespace arcface::gallery {

absl::StatusOr<std::unique_ptr<GalleryStore>> OpenPostgresStore(const std::string&) {
  return absl::UnimplementedError("the PostgreSQL gallery store is not built yet");
}

}  // namespace arcface::gallery
