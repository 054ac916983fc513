#include "server/gallery/postgres_store.h"

#include <libpq-fe.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <pqxx/pqxx>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

// Embeddings are stored as raw little-endian float32 and copied as they are.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the byte order of stored embeddings");

namespace arcface::gallery {
namespace {

// The schema this server writes. Migrations[i] takes the schema from version i to i + 1.
constexpr int kSchemaVersion = 2;
const char* const kMigrations[kSchemaVersion] = {
    // 1: galleries, subjects and faces. Rows are never deleted: a removed subject or face keeps
    // its row with `removed_version` (a tombstone, so that a catch-up from any older version
    // sees the removal, and request_id replays keep answering); a removed face drops its
    // embedding. Faces rows (~2.1 KB) stay in the heap uncompressed (toast_tuple_target),
    // which is what a start-up load reads fastest.
    R"sql(
CREATE TABLE arcface_schema (
  id int PRIMARY KEY CHECK (id = 1),
  version int NOT NULL
);
CREATE TABLE arcface_galleries (
  name text PRIMARY KEY,
  model_id text NOT NULL,
  version bigint NOT NULL,
  updated_at timestamptz NOT NULL
);
CREATE TABLE arcface_subjects (
  gallery text NOT NULL REFERENCES arcface_galleries (name),
  subject_id text NOT NULL,
  labels jsonb NOT NULL,
  created_version bigint NOT NULL,
  updated_version bigint NOT NULL,
  removed_version bigint,
  PRIMARY KEY (gallery, subject_id)
);
CREATE INDEX arcface_subjects_updated ON arcface_subjects (gallery, updated_version);
CREATE INDEX arcface_subjects_removed ON arcface_subjects (gallery, removed_version)
  WHERE removed_version IS NOT NULL;
CREATE TABLE arcface_faces (
  gallery text NOT NULL,
  face_id text NOT NULL,
  subject_id text NOT NULL,
  model_id text NOT NULL,
  embedding bytea,
  request_id text,
  request_seq int NOT NULL,
  added_version bigint NOT NULL,
  removed_version bigint,
  PRIMARY KEY (gallery, face_id),
  FOREIGN KEY (gallery, subject_id) REFERENCES arcface_subjects (gallery, subject_id)
) WITH (toast_tuple_target = 8160);
ALTER TABLE arcface_faces ALTER COLUMN embedding SET STORAGE EXTERNAL;
CREATE INDEX arcface_faces_added ON arcface_faces (gallery, added_version);
CREATE INDEX arcface_faces_removed ON arcface_faces (gallery, removed_version)
  WHERE removed_version IS NOT NULL;
CREATE INDEX arcface_faces_live_subject ON arcface_faces (gallery, subject_id)
  WHERE removed_version IS NULL;
CREATE UNIQUE INDEX arcface_faces_request ON arcface_faces (gallery, request_id, request_seq)
  WHERE request_id IS NOT NULL;
)sql",
    // 2: the size of a gallery's embeddings (its model's); galleries of version 1 were all
    // ArcFace's 512.
    "ALTER TABLE arcface_galleries ADD COLUMN dim int NOT NULL DEFAULT 512;",
};

// pg_advisory_xact_lock's key for migrations ("arcface" in ASCII).
constexpr int64_t kMigrationLock = 0x61726366616365;
constexpr char kChannel[] = "arcface_gallery";
// Connections for reads and writes; callers beyond it wait for one to come back.
constexpr int kPoolSize = 8;
// Rows of faces per FETCH of a load (about 4 MB).
constexpr int kFetchRows = 2048;
constexpr size_t kFetchesAhead = 4;
constexpr absl::Duration kFirstBackoff = absl::Milliseconds(100);
constexpr absl::Duration kMaxBackoff = absl::Seconds(2);

// Options that libpq leaves off by default and that an outage needs: a bounded connect, and a
// dead peer noticed by keepalives. The URI's own values win.
constexpr std::pair<const char*, const char*> kDefaultOptions[] = {
    {"connect_timeout", "2"},      {"keepalives_idle", "5"},
    {"keepalives_interval", "2"},  {"keepalives_count", "3"},
    {"tcp_user_timeout", "10000"}, {"fallback_application_name", "arcface-server"},
};

// SQLSTATEs that mean the server went away rather than that the statement was wrong (class 08
// connection exceptions; 57P01..57P03 shutdowns and start-up).
bool IsConnectionState(const std::string& sqlstate) {
  return sqlstate.rfind("08", 0) == 0 || sqlstate == "57P01" || sqlstate == "57P02" ||
         sqlstate == "57P03";
}

std::string QuoteConninfo(const std::string& value) {
  std::string out = "'";
  for (char c : value) {
    if (c == '\'' || c == '\\') out += '\\';
    out += c;
  }
  return out + "'";
}

// PostgreSQL's array literal of text values: every element quoted, '"' and '\' escaped.
std::string TextArray(const std::vector<std::string>& values) {
  std::string out = "{";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ',';
    out += '"';
    for (char c : values[i]) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    out += '"';
  }
  return out + "}";
}

// The password of a URI's userinfo (scheme://user:password@...) as written, percent-encoding
// and all; empty when there is none.
std::string RawUriPassword(const std::string& uri) {
  const size_t scheme = uri.find("://");
  if (scheme == std::string::npos) return "";
  const size_t start = scheme + 3;
  const size_t at = uri.find('@', start);
  const size_t end = uri.find_first_of("/?", start);
  if (at == std::string::npos || (end != std::string::npos && end < at)) return "";
  const size_t colon = uri.find(':', start);
  if (colon == std::string::npos || colon > at) return "";
  return uri.substr(colon + 1, at - colon - 1);
}

// libpq's messages span lines ("...failed: Connection refused\n\tIs the server running...");
// a reason goes into one log line and one status message.
std::string OneLine(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\t') c = ' ';
  }
  absl::StrReplaceAll({{"  ", " "}}, &text);
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

std::string LabelsJson(const Labels& labels) {
  nlohmann::json object = nlohmann::json::object();
  for (const auto& [key, value] : labels) object[key] = value;
  return object.dump();
}

absl::StatusOr<Labels> ParseLabels(const std::string& text, const std::string& gallery,
                                   const std::string& subject) {
  const nlohmann::json object = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  Labels labels;
  bool ok = object.is_object();
  if (ok) {
    for (const auto& [key, value] : object.items()) {
      if (!value.is_string()) {
        ok = false;
        break;
      }
      labels[key] = value.get<std::string>();
    }
  }
  if (!ok) {
    return absl::InternalError(
        absl::StrCat("subject '", subject, "' of gallery '", gallery,
                     "' has labels that are not an object of strings: ", text.substr(0, 200)));
  }
  return labels;
}

class PostgresStore final : public GalleryStore {
 public:
  // Takes `stop_fd`, an eventfd.
  PostgresStore(std::string conninfo, std::string password, std::string described, int stop_fd)
      : conninfo_(std::move(conninfo)),
        password_(std::move(password)),
        described_(std::move(described)),
        stop_fd_(stop_fd) {}

  ~PostgresStore() override {
    if (follower_.joinable()) {
      const uint64_t one = 1;
      // The follower polls stop_fd_ beside its socket and its backoff.
      while (write(stop_fd_, &one, sizeof(one)) < 0 && errno == EINTR) {
      }
      follower_.join();
    }
    close(stop_fd_);
  }

  // Opens the first connection and brings the schema to kSchemaVersion.
  absl::Status Migrate();

  std::string Describe() const override { return described_; }
  absl::StatusOr<std::vector<GalleryDelta>> ChangesSince(
      const absl::flat_hash_map<std::string, uint64_t>& known) override;
  absl::StatusOr<EnrollResult> Enroll(const EnrollWrite& write) override;
  absl::StatusOr<ForgetResult> Forget(const ForgetWrite& write) override;
  void Follow(StoreListener listener) override;
  std::pair<bool, std::string> Health() const override {
    absl::MutexLock lock(&mu_);
    return {up_, down_reason_};
  }

 private:
  using Body = std::function<absl::Status(pqxx::connection&)>;

  // Runs `body` on a pooled connection, mapping libpq's and libpqxx's exceptions to statuses
  // (this is the only place that catches them). A connection from the pool that turns out to
  // be broken (the server restarted since it was last used) is dropped with the rest of the
  // idle ones, and the body runs once more on a new connection: nothing was committed (a
  // failed COMMIT throws in_doubt_error, which is not retried).
  absl::Status Run(const char* what, const Body& body);
  std::unique_ptr<pqxx::connection> Acquire(bool* reused);
  void Release(std::unique_ptr<pqxx::connection> conn);
  void SetHealth(bool up, const std::string& reason);
  // The message without the URI's password, should libpq ever quote it.
  std::string Redact(std::string message) const;
  absl::Status Unavailable(const std::string& reason) const {
    return absl::UnavailableError(
        Redact(absl::StrCat("gallery store ", described_, " is unavailable: ", reason)));
  }

  // The gallery's changes since `from_version`; its faces' embeddings have `dim` values.
  absl::StatusOr<GalleryDelta> LoadDelta(pqxx::dbtransaction& tx, const std::string& gallery,
                                         uint64_t from_version, size_t dim);
  void FollowLoop(StoreListener listener);
  // Waits for the socket (or stop_fd_ alone when `sock` < 0) up to `timeout`; false once
  // stopping.
  bool WaitReadable(int sock, absl::Duration timeout);

  const std::string conninfo_;
  const std::string password_;
  const std::string described_;
  const int stop_fd_;
  std::thread follower_;

  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<pqxx::connection>> idle_ ABSL_GUARDED_BY(mu_);
  int in_use_ ABSL_GUARDED_BY(mu_) = 0;
  bool up_ ABSL_GUARDED_BY(mu_) = true;
  std::string down_reason_ ABSL_GUARDED_BY(mu_);
};

std::string PostgresStore::Redact(std::string message) const {
  if (!password_.empty()) absl::StrReplaceAll({{password_, "***"}}, &message);
  return OneLine(std::move(message));
}

void PostgresStore::SetHealth(bool up, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  up_ = up;
  down_reason_ = up ? "" : Redact(reason);
}

// An idle connection has nothing to read: when its socket is readable, the server closed it
// (a restart or a crash; it sends the reason and EOF). Such a connection is not used: libpqxx
// would reconnect it inside BEGIN, and that path of libpqxx 6.4 leaks libpq's first result.
bool ClosedByServer(const pqxx::connection& conn) {
  pollfd fd = {conn.sock(), POLLIN, 0};
  return fd.fd < 0 || poll(&fd, 1, 0) != 0;
}

std::unique_ptr<pqxx::connection> PostgresStore::Acquire(bool* reused) {
  std::vector<std::unique_ptr<pqxx::connection>> closed;  // dropped outside the lock
  {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](int* in_use) { return *in_use < kPoolSize; }, &in_use_));
    ++in_use_;
    while (!idle_.empty()) {
      std::unique_ptr<pqxx::connection> conn = std::move(idle_.back());
      idle_.pop_back();
      if (ClosedByServer(*conn)) {
        closed.push_back(std::move(conn));
        continue;
      }
      *reused = true;
      return conn;
    }
  }
  *reused = false;
  // The slot goes back if the connection cannot be opened (the exception goes on to Run()).
  struct SlotGuard {
    PostgresStore* store;
    bool armed = true;
    ~SlotGuard() {
      if (armed) store->Release(nullptr);
    }
  } guard{this};
  auto conn = std::make_unique<pqxx::connection>(conninfo_);
  guard.armed = false;
  return conn;
}

void PostgresStore::Release(std::unique_ptr<pqxx::connection> conn) {
  absl::MutexLock lock(&mu_);
  --in_use_;
  if (conn != nullptr && conn->is_open()) idle_.push_back(std::move(conn));
}

absl::Status PostgresStore::Run(const char* what, const Body& body) {
  for (int attempt = 0;; ++attempt) {
    bool reused = false;
    std::unique_ptr<pqxx::connection> conn;
    absl::Status status;
    std::string lost;  // set when the connection broke before anything was committed
    try {
      conn = Acquire(&reused);
      status = body(*conn);
    } catch (const pqxx::broken_connection& e) {
      lost = e.what();
    } catch (const pqxx::in_doubt_error& e) {
      status = Unavailable(absl::StrCat("the connection broke while committing, so whether the ",
                                        what, " was committed is unknown: ", e.what()));
    } catch (const pqxx::sql_error& e) {
      if (IsConnectionState(e.sqlstate())) {
        lost = e.what();
      } else {
        status = absl::InternalError(
            Redact(absl::StrCat("gallery store ", described_, ": ", what, " failed: ", e.what())));
      }
    } catch (const std::exception& e) {
      status = absl::InternalError(
          Redact(absl::StrCat("gallery store ", described_, ": ", what, " failed: ", e.what())));
    }
    const bool acquired = conn != nullptr;
    if (lost.empty()) {
      // A broken connection (in doubt) is not kept: Release keeps open ones only.
      if (acquired) Release(std::move(conn));
      if (absl::IsUnavailable(status)) {
        SetHealth(false, std::string(status.message()));
      } else {
        SetHealth(true, "");
      }
      return status;
    }
    // The connection is gone, and most likely so are the idle ones (a restart).
    std::vector<std::unique_ptr<pqxx::connection>> dropped;
    {
      absl::MutexLock lock(&mu_);
      if (acquired) --in_use_;
      dropped.swap(idle_);
    }
    conn.reset();
    dropped.clear();
    if (!reused || attempt > 0) {
      SetHealth(false, lost);
      return Unavailable(lost);
    }
  }
}

absl::Status PostgresStore::Migrate() {
  return Run("the schema migration", [&](pqxx::connection& conn) -> absl::Status {
    pqxx::work tx(conn);
    tx.exec_params("SELECT pg_advisory_xact_lock($1::bigint)", kMigrationLock);
    int version = 0;
    if (!tx.exec("SELECT to_regclass('arcface_schema')")[0][0].is_null()) {
      const pqxx::result rows = tx.exec("SELECT version FROM arcface_schema");
      if (!rows.empty()) version = rows[0][0].as<int>();
    }
    if (version > kSchemaVersion) {
      return absl::FailedPreconditionError(
          absl::StrCat("the gallery schema in ", described_, " is version ", version,
                       ", newer than this server's ", kSchemaVersion,
                       " (written by a newer arcface-server): upgrade this server"));
    }
    if (version == kSchemaVersion) return absl::OkStatus();
    for (int v = version; v < kSchemaVersion; ++v) tx.exec(kMigrations[v]);
    tx.exec_params(
        "INSERT INTO arcface_schema (id, version) VALUES (1, $1) "
        "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
        kSchemaVersion);
    tx.commit();
    spdlog::info("gallery store {}: schema migrated from version {} to {}", described_, version,
                 kSchemaVersion);
    return absl::OkStatus();
  });
}

absl::StatusOr<GalleryDelta> PostgresStore::LoadDelta(pqxx::dbtransaction& tx,
                                                      const std::string& gallery,
                                                      uint64_t from_version, size_t dim) {
  GalleryDelta delta;
  delta.gallery = gallery;
  delta.from_version = from_version;
  const int64_t from = static_cast<int64_t>(from_version);

  // Net: a face (or subject) added and removed after `from` is in neither list.
  for (const pqxx::row& row : tx.exec_params(
           "SELECT face_id FROM arcface_faces WHERE gallery = $1 AND removed_version > $2 "
           "AND added_version <= $2",
           gallery, from)) {
    delta.removed_faces.push_back(row[0].as<std::string>());
  }
  for (const pqxx::row& row : tx.exec_params(
           "SELECT subject_id FROM arcface_subjects WHERE gallery = $1 AND removed_version > $2 "
           "AND created_version <= $2",
           gallery, from)) {
    delta.removed_subjects.push_back(row[0].as<std::string>());
  }
  for (const pqxx::row& row :
       tx.exec_params("SELECT subject_id, labels::text FROM arcface_subjects WHERE gallery = $1 "
                      "AND updated_version > $2 AND removed_version IS NULL",
                      gallery, from)) {
    SubjectRecord subject;
    subject.subject_id = row[0].as<std::string>();
    absl::StatusOr<Labels> labels =
        ParseLabels(row[1].as<std::string>(), gallery, subject.subject_id);
    if (!labels.ok()) return labels.status();
    subject.labels = *std::move(labels);
    delta.subjects.push_back(std::move(subject));
  }

  // The added faces, streamed: a binary cursor hands the embeddings over as their raw bytes (no
  // hex text to decode), kFetchRows at a time, into storage reserved from the count. The
  // FETCHes go through a pipeline a few ahead, so the server reads the next rows while these
  // are copied.
  const std::string live = " FROM arcface_faces WHERE gallery = " + tx.quote(gallery) +
                           " AND added_version > " + std::to_string(from) +
                           " AND removed_version IS NULL";
  const size_t count = tx.exec("SELECT count(*)" + live)[0][0].as<size_t>();
  delta.face_ids.reserve(count);
  delta.face_subjects.reserve(count);
  delta.embeddings.reserve(count * dim);
  tx.exec(
      "DECLARE arcface_added BINARY NO SCROLL CURSOR FOR SELECT face_id, subject_id, embedding" +
      live);
  const std::string fetch = "FETCH " + std::to_string(kFetchRows) + " FROM arcface_added";
  const size_t fetches = (count + kFetchRows - 1) / kFetchRows;
  pqxx::pipeline pipe(tx);
  const size_t want_bytes = dim * sizeof(float);
  size_t issued = 0;
  for (; issued < fetches && issued < kFetchesAhead; ++issued) pipe.insert(fetch);
  pipe.resume();
  while (!pipe.empty()) {
    const pqxx::result rows = pipe.retrieve().second;
    if (issued < fetches) {
      pipe.insert(fetch);
      ++issued;
    }
    for (const pqxx::row& row : rows) {
      const pqxx::field embedding = row[2];
      std::string face_id(row[0].c_str(), row[0].size());
      const size_t bytes = embedding.is_null() ? 0 : embedding.size();
      if (bytes != want_bytes) {
        return absl::InternalError(absl::StrCat("face '", face_id, "' of gallery '", gallery,
                                                "' has an embedding of ", bytes, " bytes, not ",
                                                want_bytes));
      }
      delta.face_ids.push_back(std::move(face_id));
      delta.face_subjects.emplace_back(row[1].c_str(), row[1].size());
      const size_t at = delta.embeddings.size();
      delta.embeddings.resize(at + dim);
      std::memcpy(delta.embeddings.data() + at, embedding.c_str(), want_bytes);
    }
  }
  pipe.complete();
  tx.exec("CLOSE arcface_added");
  return delta;
}

absl::StatusOr<std::vector<GalleryDelta>> PostgresStore::ChangesSince(
    const absl::flat_hash_map<std::string, uint64_t>& known) {
  std::vector<GalleryDelta> deltas;
  const absl::Status status = Run("the catch-up read", [&](pqxx::connection& conn) {
    deltas.clear();
    // One snapshot for every gallery and every table.
    pqxx::transaction<pqxx::repeatable_read, pqxx::read_only> tx(conn);
    const pqxx::result galleries = tx.exec(
        "SELECT name, model_id, version, "
        "(extract(epoch FROM updated_at) * 1000000)::bigint, dim FROM arcface_galleries");
    for (const pqxx::row& row : galleries) {
      const std::string name = row[0].as<std::string>();
      const uint64_t version = row[2].as<uint64_t>();
      const auto it = known.find(name);
      const uint64_t from = it == known.end() ? 0 : it->second;
      if (version <= from) continue;
      absl::StatusOr<GalleryDelta> delta = LoadDelta(tx, name, from, row[4].as<size_t>());
      if (!delta.ok()) return delta.status();
      delta->model_id = row[1].as<std::string>();
      delta->version = version;
      delta->committed = absl::FromUnixMicros(row[3].as<int64_t>());
      deltas.push_back(*std::move(delta));
    }
    tx.commit();
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return deltas;
}

absl::StatusOr<EnrollResult> PostgresStore::Enroll(const EnrollWrite& write) {
  EnrollResult result;
  const absl::Status status = Run("Enroll", [&](pqxx::connection& conn) {
    result = EnrollResult();
    pqxx::work tx(conn);
    // The gallery's row is the lock that orders its writes (and their versions).
    const size_t dim = write.embeddings.size() / std::max<size_t>(1, write.face_ids.size());
    tx.exec_params(
        "INSERT INTO arcface_galleries (name, model_id, version, updated_at, dim) "
        "VALUES ($1, $2, 0, clock_timestamp(), $3) ON CONFLICT (name) DO NOTHING",
        write.gallery, write.model_id, static_cast<int64_t>(dim));
    const pqxx::row gallery = tx.exec_params1(
        "SELECT model_id, version, dim FROM arcface_galleries WHERE name = $1 FOR UPDATE",
        write.gallery);
    const std::string bound = gallery[0].as<std::string>();
    if (bound != write.model_id) {
      return absl::FailedPreconditionError(
          absl::StrCat("gallery '", write.gallery, "' is bound to model ", bound,
                       "; these embeddings are from model ", write.model_id));
    }
    if (gallery[2].as<size_t>() != dim) {
      return absl::FailedPreconditionError(
          absl::StrCat("gallery '", write.gallery, "' holds embeddings of ",
                       gallery[2].as<size_t>(), " values; these have ", dim));
    }
    if (!write.request_id.empty()) {
      const pqxx::result earlier = tx.exec_params(
          "SELECT face_id, subject_id, added_version FROM arcface_faces "
          "WHERE gallery = $1 AND request_id = $2 ORDER BY request_seq",
          write.gallery, write.request_id);
      if (!earlier.empty()) {
        const std::string subject = earlier[0][1].as<std::string>();
        if (subject != write.subject_id) {
          return absl::AlreadyExistsError(absl::StrCat(
              "request_id '", write.request_id, "' was used in gallery '", write.gallery,
              "' to enroll subject '", subject, "', not '", write.subject_id, "'"));
        }
        // The earlier call's answer again; nothing is written.
        for (const pqxx::row& row : earlier) result.face_ids.push_back(row[0].as<std::string>());
        result.version = earlier[0][2].as<uint64_t>();
        result.replayed = true;
        return absl::OkStatus();
      }
    }
    const int64_t version = gallery[1].as<int64_t>() + 1;
    // Labels merge into a live subject's; a removed subject comes back with these alone.
    const pqxx::row subject = tx.exec_params1(
        "INSERT INTO arcface_subjects AS s (gallery, subject_id, labels, created_version, "
        "  updated_version) VALUES ($1, $2, $3::jsonb, $4, $4) "
        "ON CONFLICT (gallery, subject_id) DO UPDATE SET "
        "  labels = CASE WHEN s.removed_version IS NULL THEN s.labels || EXCLUDED.labels "
        "                ELSE EXCLUDED.labels END, "
        "  created_version = CASE WHEN s.removed_version IS NULL THEN s.created_version "
        "                         ELSE EXCLUDED.created_version END, "
        "  updated_version = EXCLUDED.updated_version, removed_version = NULL "
        "RETURNING labels::text",
        write.gallery, write.subject_id, LabelsJson(write.labels), version);
    absl::StatusOr<Labels> labels =
        ParseLabels(subject[0].as<std::string>(), write.gallery, write.subject_id);
    if (!labels.ok()) return labels.status();
    // All faces in one statement: their ids as a text[], their embeddings as one binary
    // parameter cut into rows by the server.
    const pqxx::binarystring embeddings(write.embeddings.data(),
                                        write.embeddings.size() * sizeof(float));
    const std::string row_bytes = std::to_string(dim * sizeof(float));
    tx.exec_params(
        "INSERT INTO arcface_faces (gallery, face_id, subject_id, model_id, embedding, "
        "  request_id, request_seq, added_version) "
        "SELECT $1, f.id, $2, $3, substring($4::bytea FROM ((f.n - 1) * " +
            row_bytes + " + 1)::int FOR " + row_bytes +
            "), $5, (f.n - 1)::int, $6 "
            "FROM unnest($7::text[]) WITH ORDINALITY AS f (id, n)",
        write.gallery, write.subject_id, write.model_id, embeddings,
        write.request_id.empty() ? nullptr : write.request_id.c_str(), version,
        TextArray(write.face_ids));
    const pqxx::row updated = tx.exec_params1(
        "UPDATE arcface_galleries SET version = $2, updated_at = clock_timestamp() "
        "WHERE name = $1 RETURNING (extract(epoch FROM updated_at) * 1000000)::bigint",
        write.gallery, version);
    tx.exec_params("SELECT pg_notify($1, $2)", kChannel, absl::StrCat(version, " ", write.gallery));
    tx.commit();

    result.face_ids = write.face_ids;
    result.version = static_cast<uint64_t>(version);
    result.delta = EnrollDelta(write, *std::move(labels), result.version,
                               absl::FromUnixMicros(updated[0].as<int64_t>()));
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return result;
}

absl::StatusOr<ForgetResult> PostgresStore::Forget(const ForgetWrite& write) {
  ForgetResult result;
  const absl::Status status = Run("Forget", [&](pqxx::connection& conn) {
    result = ForgetResult();
    pqxx::work tx(conn);
    const pqxx::result gallery =
        tx.exec_params("SELECT version, model_id FROM arcface_galleries WHERE name = $1 FOR UPDATE",
                       write.gallery);
    if (gallery.empty()) {
      return absl::NotFoundError(absl::StrCat("gallery '", write.gallery, "' does not exist"));
    }
    const int64_t version = gallery[0][0].as<int64_t>() + 1;
    const std::string in_gallery = absl::StrCat(" in gallery '", write.gallery, "'");
    if (!write.subject_id.empty() &&
        tx.exec_params("SELECT 1 FROM arcface_subjects WHERE gallery = $1 AND subject_id = $2 "
                       "AND removed_version IS NULL",
                       write.gallery, write.subject_id)
            .empty()) {
      return absl::NotFoundError(
          absl::StrCat("subject '", write.subject_id, "' does not exist", in_gallery));
    }
    // Subjects whose faces went, in the order first touched.
    std::vector<std::string> touched;
    if (write.face_ids.empty()) {
      for (const pqxx::row& row :
           tx.exec_params("UPDATE arcface_faces SET removed_version = $3, embedding = NULL "
                          "WHERE gallery = $1 AND subject_id = $2 AND removed_version IS NULL "
                          "RETURNING face_id",
                          write.gallery, write.subject_id, version)) {
        result.delta.removed_faces.push_back(row[0].as<std::string>());
      }
      touched.push_back(write.subject_id);
    } else {
      std::set<std::string> seen;
      for (const std::string& face_id : write.face_ids) {
        if (!seen.insert(face_id).second) continue;  // named twice: removed once
        const pqxx::result row = tx.exec_params(
            "UPDATE arcface_faces SET removed_version = $3, embedding = NULL "
            "WHERE gallery = $1 AND face_id = $2 AND removed_version IS NULL "
            "AND ($4::text IS NULL OR subject_id = $4) RETURNING subject_id",
            write.gallery, face_id, version,
            write.subject_id.empty() ? nullptr : write.subject_id.c_str());
        if (row.empty()) {
          return absl::NotFoundError(absl::StrCat(
              "face '", face_id, "' does not exist",
              write.subject_id.empty() ? "" : absl::StrCat(" for subject '", write.subject_id, "'"),
              in_gallery));
        }
        const std::string subject = row[0][0].as<std::string>();
        if (std::find(touched.begin(), touched.end(), subject) == touched.end()) {
          touched.push_back(subject);
        }
        result.delta.removed_faces.push_back(face_id);
      }
    }
    for (const std::string& subject : touched) {
      const pqxx::result removed = tx.exec_params(
          "UPDATE arcface_subjects SET removed_version = $3, updated_version = $3, "
          "  labels = '{}'::jsonb "
          "WHERE gallery = $1 AND subject_id = $2 AND removed_version IS NULL AND NOT EXISTS ("
          "  SELECT 1 FROM arcface_faces WHERE gallery = $1 AND subject_id = $2 "
          "  AND removed_version IS NULL) RETURNING subject_id",
          write.gallery, subject, version);
      if (!removed.empty()) result.delta.removed_subjects.push_back(subject);
    }
    const pqxx::row updated = tx.exec_params1(
        "UPDATE arcface_galleries SET version = $2, updated_at = clock_timestamp() "
        "WHERE name = $1 RETURNING (extract(epoch FROM updated_at) * 1000000)::bigint",
        write.gallery, version);
    tx.exec_params("SELECT pg_notify($1, $2)", kChannel, absl::StrCat(version, " ", write.gallery));
    tx.commit();

    result.faces_removed = static_cast<uint32_t>(result.delta.removed_faces.size());
    result.version = static_cast<uint64_t>(version);
    GalleryDelta& delta = result.delta;
    delta.gallery = write.gallery;
    delta.model_id = gallery[0][1].as<std::string>();
    delta.from_version = result.version - 1;
    delta.version = result.version;
    delta.committed = absl::FromUnixMicros(updated[0].as<int64_t>());
    return absl::OkStatus();
  });
  if (!status.ok()) return status;
  return result;
}

bool PostgresStore::WaitReadable(int sock, absl::Duration timeout) {
  pollfd fds[2] = {{stop_fd_, POLLIN, 0}, {sock, POLLIN, 0}};
  const int timeout_ms = timeout == absl::InfiniteDuration()
                             ? -1
                             : static_cast<int>(absl::ToInt64Milliseconds(timeout));
  const int ready = poll(fds, sock >= 0 ? 2 : 1, timeout_ms);
  return !(ready > 0 && (fds[0].revents & POLLIN) != 0);
}

// Sets `pending` for each NOTIFY; the loop calls the listener once per batch of them.
class ChangeReceiver final : public pqxx::notification_receiver {
 public:
  ChangeReceiver(pqxx::connection_base& conn, bool* pending)
      : pqxx::notification_receiver(conn, kChannel), pending_(pending) {}
  void operator()(const std::string& payload, int backend_pid) override { *pending_ = true; }

 private:
  bool* const pending_;
};

void PostgresStore::Follow(StoreListener listener) {
  if (follower_.joinable()) return;  // one listener per store
  follower_ = std::thread([this, listener = std::move(listener)] { FollowLoop(listener); });
}

void PostgresStore::FollowLoop(StoreListener listener) {
  bool announced_down = false;
  bool just_lost = false;  // the connection broke; the next connect is tried at once
  absl::Duration backoff = kFirstBackoff;
  for (;;) {
    std::string reason;
    try {
      pqxx::connection conn(conninfo_);
      bool pending = false;
      ChangeReceiver receiver(conn, &pending);  // LISTEN, before the catch-up below
      backoff = kFirstBackoff;
      just_lost = false;
      if (announced_down) {
        announced_down = false;
        SetHealth(true, "");
        if (listener.availability) listener.availability(true, "");
      }
      // Whatever was committed before LISTEN took effect (at start-up: since the caller's
      // load; after a reconnect: meanwhile) is caught up once.
      if (listener.changed) listener.changed();
      for (;;) {
        if (!WaitReadable(conn.sock(), absl::InfiniteDuration())) return;
        conn.get_notifs();  // throws broken_connection when the server went away
        if (!conn.is_open()) break;
        if (pending) {
          pending = false;
          if (listener.changed) listener.changed();
        }
      }
      just_lost = true;
      continue;
    } catch (const pqxx::broken_connection& e) {
      reason = e.what();
    } catch (const std::exception& e) {
      reason = e.what();
    }
    if (!announced_down && !just_lost) {
      // libpqxx's "Connection lost." says less than the next attempt's reason (refused,
      // timed out, shutting down): a blip that reconnects at once is no outage at all.
      just_lost = true;
      continue;
    }
    just_lost = false;
    reason = Redact(reason);
    SetHealth(false, reason);
    if (!announced_down) {
      announced_down = true;
      if (listener.availability) listener.availability(false, reason);
    }
    if (!WaitReadable(-1, backoff)) return;
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<GalleryStore>> OpenPostgresStore(const std::string& uri) {
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(uri.c_str(), &error);
  if (options == nullptr) {
    std::string reason = error != nullptr ? error : "out of memory";
    PQfreemem(error);
    // libpq quotes the part of the URI it could not read, which may be the password.
    const std::string raw_password = RawUriPassword(uri);
    if (!raw_password.empty()) absl::StrReplaceAll({{raw_password, "***"}}, &reason);
    return absl::InvalidArgumentError(absl::StrCat(
        "gallery store URI is not a valid PostgreSQL URI: ", OneLine(std::move(reason))));
  }
  std::string conninfo, password, user, host, port, dbname;
  std::set<std::string> given;
  for (const PQconninfoOption* o = options; o->keyword != nullptr; ++o) {
    if (o->val == nullptr) continue;
    const std::string keyword = o->keyword;
    given.insert(keyword);
    absl::StrAppend(&conninfo, keyword, "=", QuoteConninfo(o->val), " ");
    if (keyword == "password") password = o->val;
    if (keyword == "user") user = o->val;
    if (keyword == "host") host = o->val;
    if (keyword == "port") port = o->val;
    if (keyword == "dbname") dbname = o->val;
  }
  PQconninfoFree(options);
  for (const auto& [keyword, value] : kDefaultOptions) {
    if (given.count(keyword) == 0) absl::StrAppend(&conninfo, keyword, "=", value, " ");
  }
  if (host.find(':') != std::string::npos) host = absl::StrCat("[", host, "]");
  std::string described = "postgres://";
  if (!user.empty()) absl::StrAppend(&described, user, "@");
  absl::StrAppend(&described, host.empty() ? "localhost" : host);
  if (!port.empty()) absl::StrAppend(&described, ":", port);
  absl::StrAppend(&described, "/", dbname);

  const int stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd < 0) {
    return absl::InternalError(
        absl::StrCat("gallery store ", described, ": eventfd failed: ", std::strerror(errno)));
  }
  auto store = std::make_unique<PostgresStore>(conninfo, password, described, stop_fd);
  if (absl::Status status = store->Migrate(); !status.ok()) return status;
  return store;
}

}  // namespace arcface::gallery
