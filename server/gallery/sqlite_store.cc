#include "server/gallery/sqlite_store.h"

#include <sqlite3.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"

namespace arcface::gallery {
namespace {

// PRAGMA user_version of the schema this server writes. 2: galleries.dim, the size of the
// gallery's embeddings (its model's); galleries of version 1 were all ArcFace's 512.
constexpr int kSchemaVersion = 2;
constexpr char kMigrateTo2[] = "ALTER TABLE galleries ADD COLUMN dim INTEGER NOT NULL DEFAULT 512";

constexpr char kSchema[] = R"sql(
CREATE TABLE galleries(
  name TEXT PRIMARY KEY,
  model_id TEXT NOT NULL,
  version INTEGER NOT NULL,
  committed_us INTEGER NOT NULL);
CREATE TABLE subjects(
  gallery TEXT NOT NULL,
  subject_id TEXT NOT NULL,
  labels TEXT NOT NULL,
  updated_version INTEGER NOT NULL,
  removed_version INTEGER,
  PRIMARY KEY(gallery, subject_id));
CREATE TABLE faces(
  gallery TEXT NOT NULL,
  face_id TEXT NOT NULL,
  subject_id TEXT NOT NULL,
  model_id TEXT NOT NULL,
  embedding BLOB,
  request_id TEXT,
  request_seq INTEGER,
  added_version INTEGER NOT NULL,
  removed_version INTEGER);
CREATE UNIQUE INDEX faces_id ON faces(gallery, face_id);
CREATE INDEX faces_subject ON faces(gallery, subject_id) WHERE removed_version IS NULL;
CREATE INDEX faces_request ON faces(gallery, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX faces_added ON faces(gallery, added_version);
CREATE INDEX faces_removed ON faces(gallery, removed_version) WHERE removed_version IS NOT NULL;
)sql";

absl::Status SqliteError(sqlite3* db, int rc, absl::string_view doing) {
  const std::string message = absl::StrCat("gallery store (SQLite): ", doing, ": ",
                                           db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_FULL:
    case SQLITE_IOERR:
    case SQLITE_CANTOPEN:
    case SQLITE_READONLY:
    case SQLITE_PERM:
      return absl::UnavailableError(message);
    default:
      return absl::InternalError(message);
  }
}

// A prepared statement; finalized when it goes.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~Stmt() { sqlite3_finalize(stmt_); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  absl::Status prepared(absl::string_view doing) const {
    return rc_ == SQLITE_OK ? absl::OkStatus() : SqliteError(db_, rc_, doing);
  }
  Stmt& Bind(int i, absl::string_view text) {
    sqlite3_bind_text(stmt_, i, text.data(), static_cast<int>(text.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& Bind(int i, int64_t value) {
    sqlite3_bind_int64(stmt_, i, value);
    return *this;
  }
  Stmt& BindBlob(int i, const void* data, size_t bytes) {
    sqlite3_bind_blob(stmt_, i, data, static_cast<int>(bytes), SQLITE_STATIC);
    return *this;
  }
  Stmt& BindNull(int i) {
    sqlite3_bind_null(stmt_, i);
    return *this;
  }
  // SQLITE_ROW: true; SQLITE_DONE: false; else the error in *status.
  bool Step(absl::Status* status, absl::string_view doing) {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc != SQLITE_DONE) *status = SqliteError(db_, rc, doing);
    return false;
  }
  absl::Status Run(absl::string_view doing) {
    absl::Status status;
    while (Step(&status, doing)) {
    }
    return status;
  }
  void Reset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  std::string Text(int col) const {
    const auto* p = sqlite3_column_text(stmt_, col);
    return p ? std::string(reinterpret_cast<const char*>(p), sqlite3_column_bytes(stmt_, col))
             : std::string();
  }
  int64_t Int(int col) const { return sqlite3_column_int64(stmt_, col); }
  bool IsNull(int col) const { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }
  const void* Blob(int col, size_t* bytes) const {
    const void* p = sqlite3_column_blob(stmt_, col);
    *bytes = static_cast<size_t>(sqlite3_column_bytes(stmt_, col));
    return p;
  }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
};

// One transaction: begun by the constructor, rolled back by the destructor unless committed.
class Transaction {
 public:
  Transaction(sqlite3* db, const char* begin, absl::string_view doing) : db_(db) {
    const int rc = sqlite3_exec(db_, begin, nullptr, nullptr, nullptr);
    if (rc == SQLITE_OK) {
      open_ = true;
    } else {
      status_ = SqliteError(db_, rc, doing);
    }
  }
  ~Transaction() {
    if (open_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;

  const absl::Status& begun() const { return status_; }
  absl::Status Commit(absl::string_view doing) {
    const int rc = sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) return SqliteError(db_, rc, doing);
    open_ = false;
    return absl::OkStatus();
  }

 private:
  sqlite3* const db_;
  bool open_ = false;
  absl::Status status_;
};

Labels ParseLabels(const std::string& json) {
  Labels labels;
  const nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return labels;
  for (const auto& [k, v] : j.items()) {
    if (v.is_string()) labels[k] = v.get<std::string>();
  }
  return labels;
}

std::string LabelsJson(const Labels& labels) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [k, v] : labels) j[k] = v;
  // Labels come from proto strings (valid UTF-8, checked by the caller): dump cannot throw.
  return j.dump();
}

class SqliteStore final : public GalleryStore {
 public:
  SqliteStore(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  ~SqliteStore() override { sqlite3_close_v2(db_); }

  std::string Describe() const override { return absl::StrCat("sqlite:", path_); }

  absl::StatusOr<std::vector<GalleryDelta>> ChangesSince(
      const absl::flat_hash_map<std::string, uint64_t>& known) override {
    absl::MutexLock lock(&mu_);
    std::vector<GalleryDelta> deltas;
    absl::Status status;
    // One read transaction: the deltas are of one consistent state.
    Transaction read(db_, "BEGIN", "begin a read");
    if (!read.begun().ok()) return read.begun();
    Stmt galleries(db_, "SELECT name, model_id, version, committed_us, dim FROM galleries");
    if (absl::Status s = galleries.prepared("list the galleries"); !s.ok()) return s;
    while (galleries.Step(&status, "list the galleries")) {
      GalleryDelta d;
      d.gallery = galleries.Text(0);
      d.model_id = galleries.Text(1);
      d.version = static_cast<uint64_t>(galleries.Int(2));
      d.committed = absl::FromUnixMicros(galleries.Int(3));
      const size_t dim = static_cast<size_t>(galleries.Int(4));
      auto it = known.find(d.gallery);
      d.from_version = it == known.end() ? 0 : it->second;
      if (d.version <= d.from_version) continue;
      if (absl::Status s = ReadDelta(&d, dim); !s.ok()) return s;
      deltas.push_back(std::move(d));
    }
    if (!status.ok()) return status;
    return deltas;
  }

  absl::StatusOr<EnrollResult> Enroll(const EnrollWrite& write) override {
    absl::MutexLock lock(&mu_);
    Transaction tx(db_, "BEGIN IMMEDIATE", "begin an enrollment");
    if (!tx.begun().ok()) return tx.begun();
    const size_t dim = write.embeddings.size() / std::max<size_t>(1, write.face_ids.size());
    absl::StatusOr<uint64_t> from = BoundVersion(write.gallery, write.model_id, dim);
    if (!from.ok()) return from.status();
    EnrollResult result;
    if (!write.request_id.empty()) {
      if (absl::Status s = Replay(write, &result); !s.ok()) return s;
      if (result.replayed) return result;
    }
    const uint64_t version = *from + 1;
    const absl::Time now = absl::Now();
    Labels labels;  // the subject's, merged with the write's
    {
      Stmt read(db_,
                "SELECT labels, removed_version FROM subjects WHERE gallery=? AND subject_id=?");
      if (absl::Status s = read.prepared("read the subject"); !s.ok()) return s;
      read.Bind(1, write.gallery).Bind(2, write.subject_id);
      absl::Status status;
      if (read.Step(&status, "read the subject") && read.IsNull(1)) {
        labels = ParseLabels(read.Text(0));
      }
      if (!status.ok()) return status;
    }
    for (const auto& [k, v] : write.labels) labels[k] = v;
    {
      Stmt upsert(db_,
                  "INSERT INTO subjects(gallery, subject_id, labels, updated_version, "
                  "removed_version) VALUES(?,?,?,?,NULL) ON CONFLICT(gallery, subject_id) DO "
                  "UPDATE SET labels=excluded.labels, updated_version=excluded.updated_version, "
                  "removed_version=NULL");
      if (absl::Status s = upsert.prepared("write the subject"); !s.ok()) return s;
      upsert.Bind(1, write.gallery).Bind(2, write.subject_id).Bind(3, LabelsJson(labels));
      upsert.Bind(4, static_cast<int64_t>(version));
      if (absl::Status s = upsert.Run("write the subject"); !s.ok()) return s;
    }
    {
      Stmt insert(db_,
                  "INSERT INTO faces(gallery, face_id, subject_id, model_id, embedding, "
                  "request_id, request_seq, added_version) VALUES(?,?,?,?,?,?,?,?)");
      if (absl::Status s = insert.prepared("add the faces"); !s.ok()) return s;
      const size_t dim = write.embeddings.size() / std::max<size_t>(1, write.face_ids.size());
      for (size_t i = 0; i < write.face_ids.size(); ++i) {
        insert.Reset();
        insert.Bind(1, write.gallery).Bind(2, write.face_ids[i]).Bind(3, write.subject_id);
        insert.Bind(4, write.model_id);
        insert.BindBlob(5, write.embeddings.data() + i * dim, dim * sizeof(float));
        if (write.request_id.empty()) {
          insert.BindNull(6).BindNull(7);
        } else {
          insert.Bind(6, write.request_id).Bind(7, static_cast<int64_t>(i));
        }
        insert.Bind(8, static_cast<int64_t>(version));
        if (absl::Status s = insert.Run("add the faces"); !s.ok()) return s;
      }
    }
    if (absl::Status s = SetVersion(write.gallery, write.model_id, version, now, dim); !s.ok()) {
      return s;
    }
    if (absl::Status s = tx.Commit("commit the enrollment"); !s.ok()) return s;
    result.face_ids = write.face_ids;
    result.version = version;
    result.delta = EnrollDelta(write, std::move(labels), version, now);
    return result;
  }

  absl::StatusOr<ForgetResult> Forget(const ForgetWrite& write) override {
    absl::MutexLock lock(&mu_);
    Transaction tx(db_, "BEGIN IMMEDIATE", "begin a removal");
    if (!tx.begun().ok()) return tx.begun();
    std::string model_id;
    uint64_t from = 0;
    {
      Stmt read(db_, "SELECT model_id, version FROM galleries WHERE name=?");
      if (absl::Status s = read.prepared("read the gallery"); !s.ok()) return s;
      read.Bind(1, write.gallery);
      absl::Status status;
      if (!read.Step(&status, "read the gallery")) {
        if (!status.ok()) return status;
        return absl::NotFoundError(absl::StrCat("gallery '", write.gallery, "' does not exist"));
      }
      model_id = read.Text(0);
      from = static_cast<uint64_t>(read.Int(1));
    }
    // The live faces to remove, with their subjects.
    std::vector<std::pair<std::string, std::string>> faces;
    if (write.face_ids.empty()) {
      Stmt list(db_,
                "SELECT face_id, subject_id FROM faces WHERE gallery=? AND subject_id=? AND "
                "removed_version IS NULL");
      if (absl::Status s = list.prepared("list the subject's faces"); !s.ok()) return s;
      list.Bind(1, write.gallery).Bind(2, write.subject_id);
      absl::Status status;
      while (list.Step(&status, "list the subject's faces")) {
        faces.emplace_back(list.Text(0), list.Text(1));
      }
      if (!status.ok()) return status;
      if (faces.empty()) {
        return absl::NotFoundError(absl::StrCat("subject '", write.subject_id,
                                                "' is not in gallery '", write.gallery, "'"));
      }
    } else {
      Stmt find(db_,
                "SELECT subject_id FROM faces WHERE gallery=? AND face_id=? AND "
                "removed_version IS NULL");
      if (absl::Status s = find.prepared("find a face"); !s.ok()) return s;
      absl::flat_hash_set<std::string> seen;
      for (const std::string& face_id : write.face_ids) {
        if (!seen.insert(face_id).second) continue;
        find.Reset();
        find.Bind(1, write.gallery).Bind(2, face_id);
        absl::Status status;
        const bool found = find.Step(&status, "find a face");
        if (!status.ok()) return status;
        if (!found || (!write.subject_id.empty() && find.Text(0) != write.subject_id)) {
          return absl::NotFoundError(absl::StrCat(
              "face '", face_id, "' is not in gallery '", write.gallery, "'",
              write.subject_id.empty() ? ""
                                       : absl::StrCat(" under subject '", write.subject_id, "'")));
        }
        faces.emplace_back(face_id, find.Text(0));
      }
    }
    const uint64_t version = from + 1;
    const absl::Time now = absl::Now();
    ForgetResult result;
    GalleryDelta& d = result.delta;
    {
      Stmt remove(db_,
                  "UPDATE faces SET removed_version=?, embedding=NULL WHERE gallery=? AND "
                  "face_id=?");
      if (absl::Status s = remove.prepared("remove a face"); !s.ok()) return s;
      for (const auto& [face_id, subject_id] : faces) {
        remove.Reset();
        remove.Bind(1, static_cast<int64_t>(version)).Bind(2, write.gallery).Bind(3, face_id);
        if (absl::Status s = remove.Run("remove a face"); !s.ok()) return s;
        d.removed_faces.push_back(face_id);
      }
    }
    // Subjects left with no face go too.
    absl::flat_hash_set<std::string> subjects;
    for (const auto& face : faces) subjects.insert(face.second);
    {
      Stmt count(db_,
                 "SELECT COUNT(*) FROM faces WHERE gallery=? AND subject_id=? AND "
                 "removed_version IS NULL");
      Stmt drop(db_, "UPDATE subjects SET removed_version=? WHERE gallery=? AND subject_id=?");
      if (absl::Status s = count.prepared("count a subject's faces"); !s.ok()) return s;
      if (absl::Status s = drop.prepared("remove a subject"); !s.ok()) return s;
      for (const std::string& subject : subjects) {
        count.Reset();
        count.Bind(1, write.gallery).Bind(2, subject);
        absl::Status status;
        if (!count.Step(&status, "count a subject's faces")) {
          return status.ok() ? absl::InternalError("COUNT(*) gave no row") : status;
        }
        if (count.Int(0) != 0) continue;
        drop.Reset();
        drop.Bind(1, static_cast<int64_t>(version)).Bind(2, write.gallery).Bind(3, subject);
        if (absl::Status s = drop.Run("remove a subject"); !s.ok()) return s;
        d.removed_subjects.push_back(subject);
      }
    }
    if (absl::Status s = SetVersion(write.gallery, model_id, version, now); !s.ok()) return s;
    if (absl::Status s = tx.Commit("commit the removal"); !s.ok()) return s;
    result.faces_removed = static_cast<uint32_t>(faces.size());
    result.version = version;
    d.gallery = write.gallery;
    d.model_id = model_id;
    d.from_version = from;
    d.version = version;
    d.committed = now;
    return result;
  }

 private:
  // The gallery's version, after checking that `model_id`'s embeddings of `dim` values may be
  // written to it (0: a new gallery).
  absl::StatusOr<uint64_t> BoundVersion(const std::string& gallery, const std::string& model_id,
                                        size_t dim) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Stmt read(db_, "SELECT model_id, version, dim FROM galleries WHERE name=?");
    if (absl::Status s = read.prepared("read the gallery"); !s.ok()) return s;
    read.Bind(1, gallery);
    absl::Status status;
    if (!read.Step(&status, "read the gallery")) {
      if (!status.ok()) return status;
      return 0;
    }
    if (read.Text(0) != model_id) {
      return absl::FailedPreconditionError(absl::StrCat("gallery '", gallery,
                                                        "' is bound to model ", read.Text(0),
                                                        "; these faces are from model ", model_id));
    }
    if (static_cast<size_t>(read.Int(2)) != dim) {
      return absl::FailedPreconditionError(absl::StrCat("gallery '", gallery,
                                                        "' holds embeddings of ", read.Int(2),
                                                        " values; these have ", dim));
    }
    return static_cast<uint64_t>(read.Int(1));
  }

  // An earlier Enroll with write.request_id: its faces into *result (replayed), or nothing.
  absl::Status Replay(const EnrollWrite& write, EnrollResult* result)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Stmt read(db_,
              "SELECT face_id, subject_id, added_version FROM faces WHERE gallery=? AND "
              "request_id=? ORDER BY request_seq");
    if (absl::Status s = read.prepared("look up the request_id"); !s.ok()) return s;
    read.Bind(1, write.gallery).Bind(2, write.request_id);
    absl::Status status;
    while (read.Step(&status, "look up the request_id")) {
      if (read.Text(1) != write.subject_id) {
        return absl::AlreadyExistsError(absl::StrCat(
            "request_id '", write.request_id, "' was used by an earlier Enroll of subject '",
            read.Text(1), "' in gallery '", write.gallery, "'"));
      }
      result->face_ids.push_back(read.Text(0));
      result->version = static_cast<uint64_t>(read.Int(2));
      result->replayed = true;
    }
    return status;
  }

  // `dim` is written for a new gallery only (a Forget's is 0 and never creates one).
  absl::Status SetVersion(const std::string& gallery, const std::string& model_id, uint64_t version,
                          absl::Time now, size_t dim = 0) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Stmt write(db_,
               "INSERT INTO galleries(name, model_id, version, committed_us, dim) "
               "VALUES(?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET version=excluded.version, "
               "committed_us=excluded.committed_us");
    if (absl::Status s = write.prepared("write the gallery's version"); !s.ok()) return s;
    write.Bind(1, gallery).Bind(2, model_id).Bind(3, static_cast<int64_t>(version));
    write.Bind(4, absl::ToUnixMicros(now)).Bind(5, static_cast<int64_t>(dim));
    return write.Run("write the gallery's version");
  }

  // Fills the lists of d (gallery, from_version and version set) from the tables; every face's
  // embedding has the gallery's `dim` values.
  absl::Status ReadDelta(GalleryDelta* d, size_t dim) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int64_t since = static_cast<int64_t>(d->from_version);
    absl::Status status;
    if (since > 0) {
      Stmt removed(db_,
                   "SELECT face_id FROM faces WHERE gallery=? AND removed_version>? AND "
                   "added_version<=?");
      if (absl::Status s = removed.prepared("read removed faces"); !s.ok()) return s;
      removed.Bind(1, d->gallery).Bind(2, since).Bind(3, since);
      while (removed.Step(&status, "read removed faces"))
        d->removed_faces.push_back(removed.Text(0));
      if (!status.ok()) return status;
      Stmt gone(db_, "SELECT subject_id FROM subjects WHERE gallery=? AND removed_version>?");
      if (absl::Status s = gone.prepared("read removed subjects"); !s.ok()) return s;
      gone.Bind(1, d->gallery).Bind(2, since);
      while (gone.Step(&status, "read removed subjects"))
        d->removed_subjects.push_back(gone.Text(0));
      if (!status.ok()) return status;
    }
    Stmt subjects(db_,
                  "SELECT subject_id, labels FROM subjects WHERE gallery=? AND "
                  "updated_version>? AND removed_version IS NULL");
    if (absl::Status s = subjects.prepared("read subjects"); !s.ok()) return s;
    subjects.Bind(1, d->gallery).Bind(2, since);
    while (subjects.Step(&status, "read subjects")) {
      d->subjects.push_back({subjects.Text(0), ParseLabels(subjects.Text(1))});
    }
    if (!status.ok()) return status;
    {
      Stmt count(db_,
                 "SELECT COUNT(*) FROM faces WHERE gallery=? AND added_version>? AND "
                 "removed_version IS NULL");
      if (absl::Status s = count.prepared("count faces"); !s.ok()) return s;
      count.Bind(1, d->gallery).Bind(2, since);
      if (count.Step(&status, "count faces")) {
        const size_t n = static_cast<size_t>(count.Int(0));
        d->face_ids.reserve(n);
        d->face_subjects.reserve(n);
        d->embeddings.reserve(n * dim);
      }
      if (!status.ok()) return status;
    }
    Stmt faces(db_,
               "SELECT face_id, subject_id, embedding, model_id FROM faces WHERE gallery=? AND "
               "added_version>? AND removed_version IS NULL ORDER BY rowid");
    if (absl::Status s = faces.prepared("read faces"); !s.ok()) return s;
    faces.Bind(1, d->gallery).Bind(2, since);
    const size_t want_bytes = dim * sizeof(float);
    while (faces.Step(&status, "read faces")) {
      size_t bytes = 0;
      const void* blob = faces.Blob(2, &bytes);
      if (bytes != want_bytes || faces.Text(3) != d->model_id) {
        return absl::InternalError(absl::StrCat("gallery store (SQLite): face '", faces.Text(0),
                                                "' of gallery '", d->gallery, "' has ", bytes,
                                                " bytes of embedding from model ", faces.Text(3),
                                                ", expected ", want_bytes, " from ", d->model_id));
      }
      d->face_ids.push_back(faces.Text(0));
      d->face_subjects.push_back(faces.Text(1));
      const size_t at = d->embeddings.size();
      d->embeddings.resize(at + dim);
      std::memcpy(d->embeddings.data() + at, blob, bytes);
    }
    return status;
  }

  absl::Mutex mu_;
  sqlite3* const db_ ABSL_PT_GUARDED_BY(mu_);
  const std::string path_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GalleryStore>> OpenSqliteStore(const std::string& path) {
  sqlite3* db = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    absl::Status s =
        absl::UnavailableError(absl::StrCat("gallery store: cannot open SQLite file '", path,
                                            "': ", db ? sqlite3_errmsg(db) : sqlite3_errstr(rc)));
    sqlite3_close_v2(db);
    return s;
  }
  auto close = absl::MakeCleanup([&db] { sqlite3_close_v2(db); });
  const auto exec = [&](const char* sql, absl::string_view doing) -> absl::Status {
    const int rc = sqlite3_exec(db, sql, nullptr, nullptr, nullptr);
    if (rc == SQLITE_OK) return absl::OkStatus();
    if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED) {
      return absl::FailedPreconditionError(absl::StrCat(
          "gallery store: SQLite file '", path,
          "' is in use by another process (one server per file; share a gallery between "
          "replicas with postgres://)"));
    }
    return SqliteError(db, rc, absl::StrCat(doing, " of '", path, "'"));
  };
  // The exclusive lock is taken by the first write below and held for the store's life.
  if (absl::Status s = exec("PRAGMA locking_mode=EXCLUSIVE", "set the locking mode"); !s.ok())
    return s;
  if (absl::Status s = exec("PRAGMA journal_mode=WAL", "enable WAL"); !s.ok()) return s;
  if (absl::Status s = exec("PRAGMA synchronous=FULL", "set synchronous=FULL"); !s.ok()) return s;
  if (absl::Status s = exec("BEGIN IMMEDIATE", "lock"); !s.ok()) return s;
  int version = 0;
  {
    Stmt read(db, "PRAGMA user_version");
    absl::Status status;
    if (read.Step(&status, "read the schema version")) version = static_cast<int>(read.Int(0));
    if (!status.ok()) return status;
  }
  if (version > kSchemaVersion) {
    exec("ROLLBACK", "roll back").IgnoreError();
    return absl::FailedPreconditionError(absl::StrCat(
        "gallery store: SQLite file '", path, "' has schema version ", version,
        ", newer than this server's ", kSchemaVersion, " (written by a newer server)"));
  }
  if (version < 1) {
    if (absl::Status s = exec(kSchema, "create the schema"); !s.ok()) return s;
  }
  if (version < 2) {
    if (absl::Status s = exec(kMigrateTo2, "migrate the schema to version 2"); !s.ok()) return s;
  }
  if (absl::Status s = exec(absl::StrCat("PRAGMA user_version=", kSchemaVersion).c_str(),
                            "set the schema version");
      !s.ok()) {
    return s;
  }
  if (absl::Status s = exec("COMMIT", "commit the schema"); !s.ok()) return s;
  std::move(close).Cancel();
  return std::unique_ptr<GalleryStore>(new SqliteStore(db, path));
}

}  // namespace arcface::gallery
