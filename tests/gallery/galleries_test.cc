// The SQLite store and the in-memory galleries, on real database files: round trips through
// the store, reloads, exact search against a brute-force scan, paging, ids, concurrency.
#include "server/gallery/galleries.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/gallery/gallery_store.h"
#include "server/gallery/hnsw_index.h"
#include "server/gallery/ids.h"
#include "server/gallery/sqlite_store.h"
#include "server/gallery/vector_index.h"
#include "tests/gallery/random_units.h"

namespace arcface::gallery {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAreArray;

constexpr char kModel[] = "arcface-r50@000000000000";

class TempDir {
 public:
  TempDir() {
    path_ = std::filesystem::temp_directory_path() /
            absl::StrCat("gallery_test_", ::getpid(), "_", counter_++);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  static inline int counter_ = 0;
  std::filesystem::path path_;
};

using testing::RandomUnits;

EnrollWrite Write(const std::string& gallery, const std::string& subject, std::vector<float> units,
                  const std::string& request_id = "") {
  EnrollWrite w;
  w.gallery = gallery;
  w.model_id = kModel;
  w.subject_id = subject;
  w.request_id = request_id;
  const size_t n = units.size() / kDim;
  for (size_t i = 0; i < n; ++i) w.face_ids.push_back(NewFaceId());
  w.embeddings = std::move(units);
  return w;
}

std::unique_ptr<Galleries> OpenGalleries(const std::string& path) {
  auto store = OpenSqliteStore(path);
  EXPECT_TRUE(store.ok()) << store.status();
  auto galleries = Galleries::Open(*std::move(store), {});
  EXPECT_TRUE(galleries.ok()) << galleries.status();
  return *std::move(galleries);
}

// What Identify must answer: per probe, the best face of each subject, best subjects first.
struct Face {
  std::string face_id;
  std::string subject_id;
  const float* unit;
};

std::vector<Candidate> BruteForce(const std::vector<Face>& faces, const float* probe, int top_k,
                                  std::optional<float> threshold) {
  std::map<std::string, Candidate> best;
  for (const Face& f : faces) {
    const double dot = testing::Dot(probe, f.unit);
    auto it = best.find(f.subject_id);
    if (it == best.end() || dot > it->second.similarity) {
      best[f.subject_id] = Candidate{f.subject_id, f.face_id, static_cast<float>(dot)};
    }
  }
  std::vector<Candidate> all;
  for (auto& [s, c] : best) {
    if (!threshold || c.similarity >= *threshold) all.push_back(c);
  }
  std::sort(all.begin(), all.end(),
            [](const Candidate& a, const Candidate& b) { return a.similarity > b.similarity; });
  if (static_cast<int>(all.size()) > top_k) all.resize(top_k);
  return all;
}

TEST(Ids, AcceptsAndRefuses) {
  EXPECT_TRUE(CheckId("subject_id", "Ann Lee").ok());
  EXPECT_TRUE(CheckId("subject_id", "Zoë 李").ok());
  EXPECT_TRUE(CheckId("subject_id", std::string(kMaxIdBytes, 'a')).ok());
  EXPECT_THAT(CheckId("subject_id", "").message(), HasSubstr("subject_id is empty"));
  EXPECT_THAT(CheckId("subject_id", std::string(kMaxIdBytes + 1, 'a')).message(),
              HasSubstr("257 bytes, the limit is 256"));
  EXPECT_THAT(CheckId("face_ids 3", "a\nb").message(),
              HasSubstr("face_ids 3: control character U+000A at byte 1"));
  EXPECT_THAT(CheckId("gallery", "a\x7f").message(), HasSubstr("U+007F"));
  EXPECT_THAT(CheckId("gallery", "a\xc2\x85").message(), HasSubstr("U+0085"));
  EXPECT_THAT(CheckId("gallery", "bad\xff").message(), HasSubstr("not valid UTF-8 at byte 3"));
  EXPECT_THAT(CheckId("gallery", "\xc0\xaf").message(), HasSubstr("not valid UTF-8"));
  const std::string a = NewFaceId(), b = NewFaceId();
  EXPECT_EQ(a.size(), 32u);
  EXPECT_NE(a, b);
}

TEST(SqliteStore, EnrollForgetAndReloadRoundTrip) {
  TempDir dir;
  const std::string path = dir.file("g.db");
  std::vector<std::string> kept;
  {
    auto store = OpenSqliteStore(path);
    ASSERT_TRUE(store.ok()) << store.status();
    EnrollWrite w = Write("g", "ann", RandomUnits(3, 1));
    w.labels = {{"team", "red"}};
    auto enrolled = (*store)->Enroll(w);
    ASSERT_TRUE(enrolled.ok()) << enrolled.status();
    EXPECT_EQ(enrolled->version, 1u);
    EXPECT_EQ(enrolled->face_ids, w.face_ids);
    EXPECT_EQ(enrolled->delta.from_version, 0u);
    EXPECT_EQ(enrolled->delta.embeddings, w.embeddings);
    // Labels merge: a new key is added, a given one replaced, the others kept.
    EnrollWrite more = Write("g", "ann", RandomUnits(1, 2));
    more.labels = {{"team", "blue"}, {"city", "Oslo"}};
    auto second = (*store)->Enroll(more);
    ASSERT_TRUE(second.ok());
    ASSERT_EQ(second->delta.subjects.size(), 1u);
    EXPECT_EQ(second->delta.subjects[0].labels, (Labels{{"team", "blue"}, {"city", "Oslo"}}));
    ForgetWrite f{"g", "", {w.face_ids[1]}};
    auto forgot = (*store)->Forget(f);
    ASSERT_TRUE(forgot.ok()) << forgot.status();
    EXPECT_EQ(forgot->faces_removed, 1u);
    EXPECT_EQ(forgot->version, 3u);
    EXPECT_THAT(forgot->delta.removed_faces, ElementsAre(w.face_ids[1]));
    kept = {w.face_ids[0], w.face_ids[2], more.face_ids[0]};
  }
  auto store = OpenSqliteStore(path);
  ASSERT_TRUE(store.ok()) << store.status();
  auto all = (*store)->ChangesSince({});
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 1u);
  const GalleryDelta& d = (*all)[0];
  EXPECT_EQ(d.gallery, "g");
  EXPECT_EQ(d.model_id, kModel);
  EXPECT_EQ(d.version, 3u);
  EXPECT_THAT(d.face_ids, UnorderedElementsAreArray(kept));
  EXPECT_EQ(d.embeddings.size(), kept.size() * kDim);
  // Since version 1: the face added at 2, the face removed at 3.
  auto since = (*store)->ChangesSince({{"g", 1}});
  ASSERT_TRUE(since.ok());
  ASSERT_EQ(since->size(), 1u);
  EXPECT_EQ((*since)[0].face_ids, std::vector<std::string>{kept[2]});
  EXPECT_EQ((*since)[0].removed_faces.size(), 1u);
  // Up to date: nothing.
  auto none = (*store)->ChangesSince({{"g", 3}});
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST(SqliteStore, ErrorsNameWhatIsWrong) {
  TempDir dir;
  auto store = OpenSqliteStore(dir.file("g.db"));
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->Enroll(Write("g", "ann", RandomUnits(1, 1), "req-1")).ok());
  EnrollWrite other = Write("g", "bob", RandomUnits(1, 2));
  other.model_id = "arcface-r100@111111111111";
  auto s = (*store)->Enroll(other).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr(kModel));
  EXPECT_THAT(s.message(), HasSubstr("arcface-r100@111111111111"));
  s = (*store)->Enroll(Write("g", "bob", RandomUnits(1, 3), "req-1")).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(s.message(), HasSubstr("subject 'ann'"));
  EXPECT_EQ((*store)->Forget({"nope", "ann", {}}).status().code(), absl::StatusCode::kNotFound);
  s = (*store)->Forget({"g", "zed", {}}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("subject 'zed'"));
  s = (*store)->Forget({"g", "", {"0123"}}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("face '0123'"));
  // Nothing above raised the version.
  auto all = (*store)->ChangesSince({});
  ASSERT_TRUE(all.ok());
  EXPECT_EQ((*all)[0].version, 1u);
}

TEST(SqliteStore, RequestIdReplaysTheFirstEnrollment) {
  TempDir dir;
  auto store = OpenSqliteStore(dir.file("g.db"));
  ASSERT_TRUE(store.ok());
  EnrollWrite w = Write("g", "ann", RandomUnits(2, 1), "req-7");
  auto first = (*store)->Enroll(w);
  ASSERT_TRUE(first.ok());
  EnrollWrite again = Write("g", "ann", RandomUnits(2, 1), "req-7");
  auto second = (*store)->Enroll(again);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(second->replayed);
  EXPECT_EQ(second->face_ids, w.face_ids);
  EXPECT_EQ(second->version, 1u);
  auto all = (*store)->ChangesSince({});
  ASSERT_TRUE(all.ok());
  EXPECT_EQ((*all)[0].face_ids.size(), 2u);
}

TEST(SqliteStore, OneServerPerFileAndNewerSchemasAreRefused) {
  TempDir dir;
  const std::string path = dir.file("g.db");
  {
    auto first = OpenSqliteStore(path);
    ASSERT_TRUE(first.ok()) << first.status();
    auto second = OpenSqliteStore(path);
    ASSERT_FALSE(second.ok());
    EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(second.status().message(), HasSubstr("in use by another process"));
  }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "PRAGMA user_version=99", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  auto newer = OpenSqliteStore(path);
  ASSERT_FALSE(newer.ok());
  EXPECT_EQ(newer.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(newer.status().message(), HasSubstr("schema version 99"));
  auto missing_dir = OpenSqliteStore(dir.file("no/such/dir/g.db"));
  ASSERT_FALSE(missing_dir.ok());
  EXPECT_EQ(missing_dir.status().code(), absl::StatusCode::kUnavailable);
}

TEST(SqliteStore, CorruptRowsAreReportedNotLoaded) {
  TempDir dir;
  const std::string path = dir.file("g.db");
  {
    auto store = OpenSqliteStore(path);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->Enroll(Write("g", "ann", RandomUnits(1, 1))).ok());
  }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "UPDATE faces SET embedding=x'00010203'", nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto store = OpenSqliteStore(path);
  ASSERT_TRUE(store.ok());
  auto all = (*store)->ChangesSince({});
  ASSERT_FALSE(all.ok());
  EXPECT_EQ(all.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(all.status().message(), HasSubstr("has 4 bytes of embedding"));
}

TEST(Galleries, IdentifyEqualsABruteForceScanAcrossForgetsAndReloads) {
  TempDir dir;
  const std::string path = dir.file("g.db");
  std::vector<float> units = RandomUnits(600, 11);
  std::vector<Face> faces;
  {
    auto g = OpenGalleries(path);
    // 120 subjects of 1..9 faces: several faces per subject, so distinct subjects matter.
    size_t at = 0;
    std::mt19937 rng(5);
    for (int s = 0; at < 600; ++s) {
      const size_t n = std::min<size_t>(1 + rng() % 9, 600 - at);
      std::vector<float> part(units.begin() + at * kDim, units.begin() + (at + n) * kDim);
      EnrollWrite w = Write("g", absl::StrCat("s", s), part);
      auto r = g->Enroll(w);
      ASSERT_TRUE(r.ok()) << r.status();
      for (size_t i = 0; i < n; ++i) {
        faces.push_back({w.face_ids[i], w.subject_id, units.data() + (at + i) * kDim});
      }
      at += n;
    }
    // Forget a whole subject and single faces.
    ASSERT_TRUE(g->Forget({"g", "s3", {}}).ok());
    std::vector<std::string> single = {faces[100].face_id, faces[250].face_id};
    ASSERT_TRUE(g->Forget({"g", "", single}).ok());
    faces.erase(std::remove_if(faces.begin(), faces.end(),
                               [&](const Face& f) {
                                 return f.subject_id == "s3" || f.face_id == single[0] ||
                                        f.face_id == single[1];
                               }),
                faces.end());
  }
  auto g = OpenGalleries(path);  // everything again from the file
  auto stats = g->Stats("g");
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->num_faces, faces.size());
  // Probes: some random, some exactly an enrolled face (a tie-free best match).
  std::vector<float> probes = RandomUnits(24, 99);
  std::copy(faces[7].unit, faces[7].unit + kDim, probes.begin());
  for (int top_k : {1, 3, 10}) {
    for (std::optional<float> threshold : {std::optional<float>(), std::optional<float>(0.05f)}) {
      std::vector<std::vector<Candidate>> results;
      uint64_t version = 0;
      ASSERT_TRUE(
          g->Identify("g", kModel, probes.data(), 24, top_k, threshold, &results, &version).ok());
      EXPECT_EQ(version, stats->version);
      for (int p = 0; p < 24; ++p) {
        std::vector<Candidate> want =
            BruteForce(faces, probes.data() + size_t(p) * kDim, top_k, threshold);
        ASSERT_EQ(results[p].size(), want.size()) << "probe " << p << " top_k " << top_k;
        for (size_t i = 0; i < want.size(); ++i) {
          EXPECT_EQ(results[p][i].subject_id, want[i].subject_id) << p << "/" << i;
          EXPECT_EQ(results[p][i].face_id, want[i].face_id);
          EXPECT_NEAR(results[p][i].similarity, want[i].similarity, 1e-5);
        }
      }
    }
  }
  std::vector<std::vector<Candidate>> results;
  uint64_t version = 0;
  ASSERT_TRUE(g->Identify("g", kModel, probes.data(), 1, 1, std::nullopt, &results, &version).ok());
  EXPECT_EQ(results[0][0].face_id, faces[7].face_id);
  EXPECT_NEAR(results[0][0].similarity, 1.0, 1e-5);
}

TEST(Galleries, ErrorsPagingAndStats) {
  TempDir dir;
  auto g = OpenGalleries(dir.file("g.db"));
  std::vector<float> probe = RandomUnits(1, 1);
  std::vector<std::vector<Candidate>> results;
  uint64_t version;
  auto s = g->Identify("none", kModel, probe.data(), 1, 1, std::nullopt, &results, &version);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  for (int i = 0; i < 25; ++i) {
    EnrollWrite w = Write("g", absl::StrCat("subject-", 100 + i), RandomUnits(1 + i % 3, i));
    w.labels = {{"i", absl::StrCat(i)}};
    ASSERT_TRUE(g->Enroll(w).ok());
  }
  s = g->Identify("g", "arcface-r100@111111111111", probe.data(), 1, 1, std::nullopt, &results,
                  &version);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr(kModel));
  EnrollWrite other = Write("g", "x", RandomUnits(1, 3));
  other.model_id = "arcface-r100@111111111111";
  EXPECT_EQ(g->Enroll(other).status().code(), absl::StatusCode::kFailedPrecondition);
  // Paging: every subject once, in order, the last page with no token.
  std::vector<std::string> seen;
  std::string token;
  int pages = 0;
  do {
    std::string next;
    auto page = g->ListSubjects("g", 10, token, &next);
    ASSERT_TRUE(page.ok()) << page.status();
    for (const SubjectInfo& info : *page) {
      seen.push_back(info.subject_id);
      const int i = std::stoi(info.subject_id.substr(8)) - 100;
      EXPECT_EQ(info.num_faces, uint32_t(1 + i % 3));
      EXPECT_EQ(info.labels.at("i"), absl::StrCat(i));
    }
    token = next;
    ++pages;
  } while (!token.empty());
  EXPECT_EQ(pages, 3);
  ASSERT_EQ(seen.size(), 25u);
  EXPECT_TRUE(std::is_sorted(seen.begin(), seen.end()));
  std::string next;
  EXPECT_EQ(g->ListSubjects("g", 10, "not-a-token!", &next).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto stats = g->Stats("g");
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->num_subjects, 25u);
  EXPECT_EQ(stats->version, 25u);
  EXPECT_EQ(stats->index, "flat");
  EXPECT_EQ(g->AllStats().size(), 1u);
}

// 16 threads enrolling and 4 identifying at once: every acknowledged face is there exactly
// once, in memory and after a reload, and every Identify saw a consistent gallery.
TEST(Galleries, ConcurrentEnrollAndIdentifyLoseNothing) {
  TempDir dir;
  const std::string path = dir.file("g.db");
  constexpr int kWriters = 16, kPerWriter = 12, kReaders = 4;
  std::set<std::string> acknowledged;
  {
    auto g = OpenGalleries(path);
    ASSERT_TRUE(g->Enroll(Write("g", "seed", RandomUnits(1, 7))).ok());
    absl::Mutex mu;
    std::atomic<bool> done{false};
    std::atomic<int> searches{0}, failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kWriters; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < kPerWriter; ++i) {
          EnrollWrite w = Write("g", absl::StrCat("w", t, "-", i % 3), RandomUnits(2, t * 100 + i));
          auto r = g->Enroll(w);
          if (!r.ok()) {
            ++failures;
            continue;
          }
          absl::MutexLock lock(&mu);
          acknowledged.insert(r->face_ids.begin(), r->face_ids.end());
        }
      });
    }
    for (int t = 0; t < kReaders; ++t) {
      threads.emplace_back([&, t] {
        std::vector<float> probes = RandomUnits(4, 5000 + t);
        // While the writers run (a bounded number of times, so the writers are not starved).
        for (int i = 0; i < 40 && !done; ++i) {
          std::vector<std::vector<Candidate>> results;
          uint64_t version;
          if (!g->Identify("g", kModel, probes.data(), 4, 5, std::nullopt, &results, &version)
                   .ok()) {
            ++failures;
          }
          for (const auto& r : results) {
            std::set<std::string> subjects;
            for (const Candidate& c : r) subjects.insert(c.subject_id);
            if (subjects.size() != r.size()) ++failures;  // a subject twice
          }
          ++searches;
        }
      });
    }
    for (int t = 0; t < kWriters; ++t) threads[t].join();
    done = true;
    for (size_t t = kWriters; t < threads.size(); ++t) threads[t].join();
    EXPECT_EQ(failures.load(), 0);
    EXPECT_GT(searches.load(), 0);
    auto stats = g->Stats("g");
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->num_faces, 1u + kWriters * kPerWriter * 2);
    EXPECT_EQ(stats->version, 1u + kWriters * kPerWriter);
  }
  EXPECT_EQ(acknowledged.size(), size_t(kWriters * kPerWriter * 2));
  auto store = OpenSqliteStore(path);
  ASSERT_TRUE(store.ok());
  auto all = (*store)->ChangesSince({});
  ASSERT_TRUE(all.ok());
  const std::set<std::string> stored((*all)[0].face_ids.begin(), (*all)[0].face_ids.end());
  EXPECT_EQ(stored.size(), (*all)[0].face_ids.size());  // no face twice
  EXPECT_EQ(stored.size(), acknowledged.size() + 1);    // the seed and every acknowledged one
  for (const std::string& id : acknowledged) EXPECT_EQ(stored.count(id), 1u) << id;
}

// Above hnsw_min_faces a gallery gets an HNSW graph in the background; then Identify is
// approximate but close to exact, and faces enrolled or removed afterwards count at once.
TEST(Galleries, ApproximateSearchAboveTheSizeFlag) {
  TempDir dir;
  auto store = OpenSqliteStore(dir.file("g.db"));
  ASSERT_TRUE(store.ok());
  GalleriesOptions options;
  options.hnsw_min_faces = 400;
  options.hnsw.ef_search = 64;
  auto opened = Galleries::Open(*std::move(store), options);
  ASSERT_TRUE(opened.ok()) << opened.status();
  std::unique_ptr<Galleries> g = *std::move(opened);
  std::vector<float> units = RandomUnits(500, 21);
  std::vector<Face> faces;
  for (int s = 0; s < 100; ++s) {
    std::vector<float> part(units.begin() + s * 5 * kDim, units.begin() + (s + 1) * 5 * kDim);
    EnrollWrite w = Write("big", absl::StrCat("s", s), part);
    ASSERT_TRUE(g->Enroll(w).ok());
    for (int i = 0; i < 5; ++i) {
      faces.push_back({w.face_ids[i], w.subject_id, units.data() + (s * 5 + i) * kDim});
    }
  }
  // The graph is built on its own thread; exact search serves until it is in.
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (g->Stats("big")->index == "flat" && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_EQ(g->Stats("big")->index, "hnsw(M=48,efSearch=64)");
  std::vector<float> probes = RandomUnits(50, 77);
  std::vector<std::vector<Candidate>> results;
  uint64_t version;
  ASSERT_TRUE(
      g->Identify("big", kModel, probes.data(), 50, 10, std::nullopt, &results, &version).ok());
  int hits = 0;
  for (int p = 0; p < 50; ++p) {
    std::set<std::string> want;
    for (const Candidate& c : BruteForce(faces, probes.data() + p * kDim, 10, std::nullopt)) {
      want.insert(c.subject_id);
    }
    for (const Candidate& c : results[p]) hits += want.count(c.subject_id);
  }
  EXPECT_GE(hits, 50 * 10 * 95 / 100) << "recall@10 of subjects below 0.95";
  // A face removed is never answered; one enrolled after the build is found.
  ASSERT_TRUE(g->Forget({"big", "", {faces[42].face_id}}).ok());
  EnrollWrite late = Write("big", "late", RandomUnits(1, 4242));
  ASSERT_TRUE(g->Enroll(late).ok());
  std::vector<float> two(faces[42].unit, faces[42].unit + kDim);
  two.insert(two.end(), late.embeddings.begin(), late.embeddings.end());
  ASSERT_TRUE(g->Identify("big", kModel, two.data(), 2, 3, std::nullopt, &results, &version).ok());
  for (const Candidate& c : results[0]) EXPECT_NE(c.face_id, faces[42].face_id);
  EXPECT_EQ(results[1][0].face_id, late.face_ids[0]);
  EXPECT_NEAR(results[1][0].similarity, 1.0, 1e-4);
}

// Several models: each gallery holds its model's embeddings at their own size (a dlib-like
// 128 beside ArcFace's 512) in one store, through a reload; an embedding of another size is
// refused naming both, never mixed in; both indexes (exact and HNSW) search any size.
TEST(Galleries, GalleriesOfTwoSizesSideBySideAcrossReloads) {
  TempDir dir;
  const std::string path = dir.file("two.db");
  constexpr char kSmall[] = "dlib-resnet@000000000000";
  constexpr int kSmallDim = 128;
  const std::vector<float> big = RandomUnits(6, 11);
  const std::vector<float> small = RandomUnits(6, 12, kSmallDim);
  auto check = [&](const Galleries& g) {
    std::vector<std::vector<Candidate>> results;
    uint64_t version = 0;
    ASSERT_TRUE(g.Identify("small", kSmall, small.data() + 4 * kSmallDim, 1, 1, std::nullopt,
                           &results, &version, kSmallDim)
                    .ok());
    ASSERT_EQ(results[0].size(), 1u);
    EXPECT_EQ(results[0][0].subject_id, "s");
    EXPECT_NEAR(results[0][0].similarity, 1.0, 1e-5);
    ASSERT_TRUE(
        g.Identify("big", kModel, big.data() + 2 * kDim, 1, 1, std::nullopt, &results, &version)
            .ok());
    EXPECT_NEAR(results[0][0].similarity, 1.0, 1e-5);
    // Probes of the other size: refused, naming both sizes.
    absl::Status s =
        g.Identify("small", kSmall, big.data(), 1, 1, std::nullopt, &results, &version, kDim);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(s.message(), HasSubstr("holds embeddings of 128 values; these probes have 512"));
    absl::StatusOr<GalleryStats> stats = g.Stats("small");
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->dim, kSmallDim);
    EXPECT_EQ(stats->num_faces, 6u);
    EXPECT_EQ(g.Stats("big")->dim, kDim);
  };
  {
    std::unique_ptr<Galleries> g = OpenGalleries(path);
    ASSERT_TRUE(g->Enroll(Write("big", "b", big)).ok());
    EnrollWrite w = Write("small", "s", small);
    w.model_id = kSmall;
    w.face_ids.resize(6);  // Write() counted faces of 512
    for (std::string& id : w.face_ids) id = NewFaceId();
    ASSERT_TRUE(g->Enroll(w).ok());
    check(*g);
    // 512-wide faces under the small gallery's model: refused, naming both.
    EnrollWrite wrong = Write("small", "s", RandomUnits(1, 13));
    wrong.model_id = kSmall;
    absl::StatusOr<EnrollResult> refused = g->Enroll(wrong);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(refused.status().message(),
                HasSubstr("holds embeddings of 128 values (model dlib-resnet@000000000000); "
                          "these have 512"));
  }
  std::unique_ptr<Galleries> reopened = OpenGalleries(path);
  check(*reopened);

  const std::vector<float> many = RandomUnits(300, 14, kSmallDim);
  std::vector<int64_t> slots(300);
  for (int i = 0; i < 300; ++i) slots[i] = i;
  auto hnsw = HnswIndex::Build(HnswOptions{}, many.data(), slots.data(), 300, kSmallDim);
  ASSERT_TRUE(hnsw.ok()) << hnsw.status();
  auto flat = MakeFlatIndex(kSmallDim);
  ASSERT_TRUE(flat->Add(many.data(), 300).ok());
  for (int q : {0, 123, 299}) {
    float sim = 0;
    int64_t found = -1;
    ASSERT_TRUE((*hnsw)->Search(many.data() + q * kSmallDim, 1, 1, &sim, &found).ok());
    EXPECT_EQ(found, q);
    EXPECT_NEAR(sim, 1.0, 1e-5);
    ASSERT_TRUE(flat->Search(many.data() + q * kSmallDim, 1, 1, &sim, &found).ok());
    EXPECT_EQ(found, q);
  }
}

// A file written before galleries knew their embedding size (schema version 1: every gallery
// ArcFace's 512) is migrated in place and reads as before.
TEST(SqliteStore, SchemaVersion1FilesAreMigratedAndRead) {
  TempDir dir;
  const std::string path = dir.file("v1.db");
  const std::vector<float> unit = RandomUnits(1, 21);
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    // Version 1's tables, as that server created them.
    const char* v1 =
        "CREATE TABLE galleries(name TEXT PRIMARY KEY, model_id TEXT NOT NULL, version INTEGER "
        "NOT NULL, committed_us INTEGER NOT NULL);"
        "CREATE TABLE subjects(gallery TEXT NOT NULL, subject_id TEXT NOT NULL, labels TEXT NOT "
        "NULL, updated_version INTEGER NOT NULL, removed_version INTEGER, PRIMARY KEY(gallery, "
        "subject_id));"
        "CREATE TABLE faces(gallery TEXT NOT NULL, face_id TEXT NOT NULL, subject_id TEXT NOT "
        "NULL, model_id TEXT NOT NULL, embedding BLOB, request_id TEXT, request_seq INTEGER, "
        "added_version INTEGER NOT NULL, removed_version INTEGER);"
        "CREATE UNIQUE INDEX faces_id ON faces(gallery, face_id);"
        "INSERT INTO galleries VALUES('old', 'arcface-r50@000000000000', 1, 0);"
        "INSERT INTO subjects VALUES('old', 'ann', '{}', 1, NULL);"
        "PRAGMA user_version=1;";
    ASSERT_EQ(sqlite3_exec(db, v1, nullptr, nullptr, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
    sqlite3_stmt* insert = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db,
                                 "INSERT INTO faces VALUES('old', 'f1', 'ann', "
                                 "'arcface-r50@000000000000', ?, NULL, NULL, 1, NULL)",
                                 -1, &insert, nullptr),
              SQLITE_OK);
    sqlite3_bind_blob(insert, 1, unit.data(), kDim * sizeof(float), SQLITE_TRANSIENT);
    ASSERT_EQ(sqlite3_step(insert), SQLITE_DONE);
    sqlite3_finalize(insert);
    sqlite3_close(db);
  }
  {
    std::unique_ptr<Galleries> g = OpenGalleries(path);
    absl::StatusOr<GalleryStats> stats = g->Stats("old");
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_EQ(stats->dim, kDim);
    EXPECT_EQ(stats->num_faces, 1u);
    std::vector<std::vector<Candidate>> results;
    uint64_t version = 0;
    ASSERT_TRUE(
        g->Identify("old", kModel, unit.data(), 1, 1, std::nullopt, &results, &version).ok());
    ASSERT_EQ(results[0].size(), 1u);
    EXPECT_EQ(results[0][0].face_id, "f1");
    // The migrated gallery takes more 512-wide faces, and no others.
    ASSERT_TRUE(g->Enroll(Write("old", "bob", RandomUnits(2, 22))).ok());
  }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* read = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &read, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(read), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(read, 0), 2);
  sqlite3_finalize(read);
  sqlite3_close(db);
  EXPECT_EQ(OpenGalleries(path)->Stats("old")->num_faces, 3u);
}

TEST(FlatIndex, SwapRemoveKeepsRowsDense) {
  std::unique_ptr<VectorIndex> index = MakeFlatIndex();
  std::vector<float> units = RandomUnits(5, 3);
  ASSERT_TRUE(index->Adopt(units).ok());
  index->SwapRemove(1);  // row 4 moves to 1
  ASSERT_EQ(index->size(), 4u);
  std::vector<float> row(kDim);
  index->Row(1, row.data());
  EXPECT_TRUE(std::equal(row.begin(), row.end(), units.begin() + 4 * kDim));
  index->SwapRemove(3);  // the last: nothing moves
  EXPECT_EQ(index->size(), 3u);
  std::vector<float> sims(3);
  std::vector<int64_t> rows(3);
  ASSERT_TRUE(index->Search(units.data() + 4 * kDim, 1, 3, sims.data(), rows.data()).ok());
  EXPECT_EQ(rows[0], 1);
  EXPECT_NEAR(sims[0], 1.0, 1e-5);
}

// A gallery large enough to be searched in shards (one thread each, merged) answers as one scan:
// the k best rows of all, wherever they are, with rows counted from the whole matrix.
TEST(FlatIndex, ShardedSearchEqualsABruteForceScan) {
  constexpr int kRows = 70000, kProbes = 3, kK = 7;
  std::unique_ptr<VectorIndex> index = MakeFlatIndex();
  std::vector<float> units = RandomUnits(kRows, 8);
  std::vector<float> probes = RandomUnits(kProbes, 9);
  // One probe is a row of the second half: its own row must come first.
  std::copy(units.begin() + 65000 * kDim, units.begin() + 65001 * kDim, probes.begin());
  ASSERT_TRUE(index->Adopt(units).ok());
  std::vector<float> sims(kProbes * kK);
  std::vector<int64_t> rows(kProbes * kK);
  ASSERT_TRUE(index->Search(probes.data(), kProbes, kK, sims.data(), rows.data()).ok());
  EXPECT_EQ(rows[0], 65000);
  for (int q = 0; q < kProbes; ++q) {
    std::vector<std::pair<double, int64_t>> all(kRows);
    for (int r = 0; r < kRows; ++r) {
      all[r] = {testing::Dot(probes.data() + q * kDim, units.data() + size_t(r) * kDim), r};
    }
    std::partial_sort(all.begin(), all.begin() + kK, all.end(), std::greater<>());
    for (int j = 0; j < kK; ++j) {
      EXPECT_EQ(rows[q * kK + j], all[j].second) << q << "/" << j;
      EXPECT_NEAR(sims[q * kK + j], all[j].first, 1e-5);
    }
  }
}

}  // namespace
}  // namespace arcface::gallery
