// The PostgreSQL GalleryStore against a real PostgreSQL 15 that the test starts itself
// (tests/gallery/pg_cluster.py: initdb + postgres as an unprivileged user on a free loopback
// port). Each test gets a database of its own on one shared cluster; the outage test stops and
// restarts a cluster of its own. Missing PostgreSQL binaries fail the tests (never a skip).
#include "server/gallery/postgres_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <pqxx/pqxx>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/gallery/gallery_store.h"
#include "tests/gallery/pg_cluster.h"

namespace arcface::gallery {
namespace {

using test_util::PgCluster;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::UnorderedElementsAre;
using ::testing::UnorderedElementsAreArray;

// The one cluster the tests share (started on first use, stopped at exit).
PgCluster* SharedCluster(absl::Status* status) {
  static PgCluster* cluster = nullptr;
  static absl::Status started;
  if (cluster == nullptr && started.ok()) {
    cluster = new PgCluster();
    started = cluster->Start(ARCFACE_PYTHON, ARCFACE_PG_CLUSTER_PY);
    std::atexit([] { delete cluster; });
  }
  *status = started;
  return cluster;
}

// Creates database `name` on `cluster`.
void CreateDatabase(const PgCluster& cluster, const std::string& name) {
  pqxx::connection conn(cluster.uri());
  pqxx::nontransaction tx(conn);
  tx.exec("CREATE DATABASE " + tx.quote_name(name));
}

// `n` unit vectors of kDim, reproducible from `seed`.
std::vector<float> UnitVectors(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n * kDim);
  for (size_t i = 0; i < n; ++i) {
    double norm = 0;
    for (int d = 0; d < kDim; ++d) {
      v[i * kDim + d] = normal(rng);
      norm += double(v[i * kDim + d]) * v[i * kDim + d];
    }
    for (int d = 0; d < kDim; ++d) v[i * kDim + d] /= static_cast<float>(std::sqrt(norm));
  }
  return v;
}

EnrollWrite Write(const std::string& gallery, const std::string& subject,
                  std::vector<std::string> face_ids, uint32_t seed, Labels labels = {},
                  const std::string& request_id = "", const std::string& model = "r50") {
  EnrollWrite w;
  w.gallery = gallery;
  w.model_id = model;
  w.subject_id = subject;
  w.labels = std::move(labels);
  w.request_id = request_id;
  w.embeddings = UnitVectors(face_ids.size(), seed);
  w.face_ids = std::move(face_ids);
  return w;
}

// face_id -> its embedding, from a delta.
std::map<std::string, std::vector<float>> Faces(const GalleryDelta& d) {
  std::map<std::string, std::vector<float>> faces;
  for (size_t i = 0; i < d.face_ids.size(); ++i) {
    faces[d.face_ids[i]].assign(d.embeddings.begin() + i * kDim,
                                d.embeddings.begin() + (i + 1) * kDim);
  }
  return faces;
}

std::vector<float> Row(const EnrollWrite& w, size_t i) {
  return {w.embeddings.begin() + i * kDim, w.embeddings.begin() + (i + 1) * kDim};
}

std::map<std::string, Labels> Subjects(const GalleryDelta& d) {
  std::map<std::string, Labels> subjects;
  for (const SubjectRecord& s : d.subjects) subjects[s.subject_id] = s.labels;
  return subjects;
}

class PostgresStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::Status status;
    cluster_ = SharedCluster(&status);
    ASSERT_TRUE(status.ok()) << status;
    static int counter = 0;
    const std::string db = absl::StrCat(
        "t", ++counter, "_", ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::string lower;
    for (char c : db) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    CreateDatabase(*cluster_, lower);
    uri_ = cluster_->UriOf(lower);
  }

  std::unique_ptr<GalleryStore> Open() {
    absl::StatusOr<std::unique_ptr<GalleryStore>> store = OpenPostgresStore(uri_);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? *std::move(store) : nullptr;
  }

  PgCluster* cluster_ = nullptr;
  std::string uri_;
};

TEST_F(PostgresStoreTest, EnrollChangesSinceForgetRoundTrip) {
  std::unique_ptr<GalleryStore> store = Open();
  ASSERT_NE(store, nullptr);
  absl::StatusOr<std::vector<GalleryDelta>> empty = store->ChangesSince({});
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_THAT(*empty, IsEmpty());

  const absl::Time before = absl::Now();
  const EnrollWrite a1 = Write("g", "alice", {"a0", "a1"}, 1, {{"name", "Alice"}, {"team", "a"}});
  absl::StatusOr<EnrollResult> r1 = store->Enroll(a1);
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->version, 1u);
  EXPECT_FALSE(r1->replayed);
  EXPECT_THAT(r1->face_ids, ElementsAre("a0", "a1"));
  EXPECT_EQ(r1->delta.gallery, "g");
  EXPECT_EQ(r1->delta.model_id, "r50");
  EXPECT_EQ(r1->delta.from_version, 0u);
  EXPECT_EQ(r1->delta.version, 1u);
  EXPECT_THAT(r1->delta.face_subjects, ElementsAre("alice", "alice"));
  EXPECT_EQ(r1->delta.embeddings, a1.embeddings);
  EXPECT_EQ(Subjects(r1->delta),
            (std::map<std::string, Labels>{{"alice", {{"name", "Alice"}, {"team", "a"}}}}));
  // The database's clock and this one's agree within a second here (one machine).
  EXPECT_GE(r1->delta.committed, before - absl::Seconds(1));
  EXPECT_LE(r1->delta.committed, absl::Now() + absl::Seconds(1));

  const EnrollWrite b1 = Write("g", "bob", {"b0"}, 2);
  ASSERT_TRUE(store->Enroll(b1).ok());
  // Labels merge: the given keys replace theirs, the others stay.
  const EnrollWrite a2 = Write("g", "alice", {"a2"}, 3, {{"team", "b"}, {"x", "y"}});
  absl::StatusOr<EnrollResult> r3 = store->Enroll(a2);
  ASSERT_TRUE(r3.ok()) << r3.status();
  EXPECT_EQ(r3->version, 3u);
  const Labels merged = {{"name", "Alice"}, {"team", "b"}, {"x", "y"}};
  EXPECT_EQ(Subjects(r3->delta), (std::map<std::string, Labels>{{"alice", merged}}));

  absl::StatusOr<std::vector<GalleryDelta>> all = store->ChangesSince({});
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 1u);
  const GalleryDelta& full = (*all)[0];
  EXPECT_EQ(full.gallery, "g");
  EXPECT_EQ(full.model_id, "r50");
  EXPECT_EQ(full.from_version, 0u);
  EXPECT_EQ(full.version, 3u);
  EXPECT_EQ(full.committed, r3->delta.committed);
  EXPECT_THAT(full.removed_faces, IsEmpty());
  EXPECT_THAT(full.removed_subjects, IsEmpty());
  EXPECT_EQ(Subjects(full), (std::map<std::string, Labels>{{"alice", merged}, {"bob", {}}}));
  EXPECT_EQ(Faces(full),
            (std::map<std::string, std::vector<float>>{
                {"a0", Row(a1, 0)}, {"a1", Row(a1, 1)}, {"b0", Row(b1, 0)}, {"a2", Row(a2, 0)}}));
  for (size_t i = 0; i < full.face_ids.size(); ++i) {
    EXPECT_EQ(full.face_subjects[i], full.face_ids[i][0] == 'a' ? "alice" : "bob");
  }

  // Since version 1: the two later writes only.
  absl::StatusOr<std::vector<GalleryDelta>> since1 = store->ChangesSince({{"g", 1}});
  ASSERT_TRUE(since1.ok()) << since1.status();
  ASSERT_EQ(since1->size(), 1u);
  EXPECT_EQ((*since1)[0].from_version, 1u);
  EXPECT_THAT((*since1)[0].face_ids, UnorderedElementsAre("b0", "a2"));
  EXPECT_EQ(Subjects((*since1)[0]),
            (std::map<std::string, Labels>{{"alice", merged}, {"bob", {}}}));
  absl::StatusOr<std::vector<GalleryDelta>> current = store->ChangesSince({{"g", 3}});
  ASSERT_TRUE(current.ok());
  EXPECT_THAT(*current, IsEmpty());

  // Forget one face: a tombstone for a catch-up from before it, nothing for a full load.
  absl::StatusOr<ForgetResult> f1 = store->Forget({"g", "", {"a0"}});
  ASSERT_TRUE(f1.ok()) << f1.status();
  EXPECT_EQ(f1->faces_removed, 1u);
  EXPECT_EQ(f1->version, 4u);
  EXPECT_THAT(f1->delta.removed_faces, ElementsAre("a0"));
  EXPECT_THAT(f1->delta.removed_subjects, IsEmpty());
  EXPECT_EQ(f1->delta.from_version, 3u);
  absl::StatusOr<std::vector<GalleryDelta>> since3 = store->ChangesSince({{"g", 3}});
  ASSERT_TRUE(since3.ok());
  ASSERT_EQ(since3->size(), 1u);
  EXPECT_THAT((*since3)[0].removed_faces, ElementsAre("a0"));
  EXPECT_THAT((*since3)[0].removed_subjects, IsEmpty());
  EXPECT_THAT((*since3)[0].face_ids, IsEmpty());
  EXPECT_THAT((*since3)[0].subjects, IsEmpty());
  all = store->ChangesSince({});
  ASSERT_TRUE(all.ok());
  EXPECT_THAT((*all)[0].face_ids, UnorderedElementsAre("a1", "b0", "a2"));
  EXPECT_THAT((*all)[0].removed_faces, IsEmpty());  // net: added and removed since 0

  // Forget a subject: its faces and itself.
  absl::StatusOr<ForgetResult> f2 = store->Forget({"g", "bob", {}});
  ASSERT_TRUE(f2.ok()) << f2.status();
  EXPECT_EQ(f2->faces_removed, 1u);
  EXPECT_THAT(f2->delta.removed_faces, ElementsAre("b0"));
  EXPECT_THAT(f2->delta.removed_subjects, ElementsAre("bob"));
  absl::StatusOr<std::vector<GalleryDelta>> since4 = store->ChangesSince({{"g", 4}});
  ASSERT_TRUE(since4.ok());
  EXPECT_THAT((*since4)[0].removed_faces, ElementsAre("b0"));
  EXPECT_THAT((*since4)[0].removed_subjects, ElementsAre("bob"));

  // A subject whose last faces go is removed with them.
  absl::StatusOr<ForgetResult> f3 = store->Forget({"g", "alice", {"a1", "a2"}});
  ASSERT_TRUE(f3.ok()) << f3.status();
  EXPECT_EQ(f3->faces_removed, 2u);
  EXPECT_THAT(f3->delta.removed_subjects, ElementsAre("alice"));
  EXPECT_EQ(f3->version, 6u);

  // A removed subject comes back with its new labels alone.
  ASSERT_TRUE(store->Enroll(Write("g", "bob", {"b1"}, 4, {{"k", "v"}})).ok());
  all = store->ChangesSince({});
  ASSERT_TRUE(all.ok());
  EXPECT_EQ((*all)[0].version, 7u);
  EXPECT_THAT((*all)[0].face_ids, ElementsAre("b1"));
  EXPECT_EQ(Subjects((*all)[0]), (std::map<std::string, Labels>{{"bob", {{"k", "v"}}}}));
  absl::StatusOr<std::vector<GalleryDelta>> since5 = store->ChangesSince({{"g", 5}});
  ASSERT_TRUE(since5.ok());
  EXPECT_THAT((*since5)[0].removed_faces, UnorderedElementsAre("a1", "a2"));
  EXPECT_THAT((*since5)[0].removed_subjects, ElementsAre("alice"));
  EXPECT_THAT((*since5)[0].face_ids, ElementsAre("b1"));
}

TEST_F(PostgresStoreTest, ForgetNamesWhatIsMissingAndChangesNothing) {
  std::unique_ptr<GalleryStore> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Enroll(Write("g", "alice", {"a0", "a1"}, 1)).ok());

  absl::StatusOr<ForgetResult> r = store->Forget({"nope", "alice", {}});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("gallery 'nope'"));
  r = store->Forget({"g", "carol", {}});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("subject 'carol'"));
  // One face there, one not: nothing is removed.
  r = store->Forget({"g", "", {"a0", "zz"}});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("face 'zz'"));
  EXPECT_THAT(r.status().message(), HasSubstr("gallery 'g'"));
  // A face of another subject.
  ASSERT_TRUE(store->Enroll(Write("g", "bob", {"b0"}, 2)).ok());
  r = store->Forget({"g", "alice", {"b0"}});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("subject 'alice'"));

  absl::StatusOr<std::vector<GalleryDelta>> all = store->ChangesSince({});
  ASSERT_TRUE(all.ok());
  EXPECT_EQ((*all)[0].version, 2u);
  EXPECT_THAT((*all)[0].face_ids, UnorderedElementsAre("a0", "a1", "b0"));
}

TEST_F(PostgresStoreTest, GalleryIsBoundToItsFirstModel) {
  std::unique_ptr<GalleryStore> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Enroll(Write("g", "alice", {"a0"}, 1, {}, "", "model-A")).ok());
  absl::StatusOr<EnrollResult> other =
      store->Enroll(Write("g", "bob", {"b0"}, 2, {}, "", "model-B"));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(other.status().message(),
              HasSubstr("gallery 'g' is bound to model model-A; these embeddings are from "
                        "model model-B"));
  // Another gallery binds to its own model.
  ASSERT_TRUE(store->Enroll(Write("h", "bob", {"b0"}, 2, {}, "", "model-B")).ok());
  absl::StatusOr<std::vector<GalleryDelta>> all = store->ChangesSince({});
  ASSERT_TRUE(all.ok());
  std::map<std::string, std::pair<std::string, uint64_t>> galleries;
  for (const GalleryDelta& d : *all) galleries[d.gallery] = {d.model_id, d.version};
  EXPECT_EQ(galleries, (std::map<std::string, std::pair<std::string, uint64_t>>{
                           {"g", {"model-A", 1}}, {"h", {"model-B", 1}}}));
}

TEST_F(PostgresStoreTest, RequestIdReplaysTheEarlierAnswer) {
  std::unique_ptr<GalleryStore> store = Open();
  ASSERT_NE(store, nullptr);
  absl::StatusOr<EnrollResult> first =
      store->Enroll(Write("g", "alice", {"f1", "f2", "f3"}, 1, {}, "req-1"));
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(store->Enroll(Write("g", "bob", {"b0"}, 2)).ok());

  // The retry carries new face ids (the caller makes them per call): the earlier ones come back.
  absl::StatusOr<EnrollResult> again =
      store->Enroll(Write("g", "alice", {"x1", "x2", "x3"}, 3, {}, "req-1"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->replayed);
  EXPECT_THAT(again->face_ids, ElementsAre("f1", "f2", "f3"));
  EXPECT_EQ(again->version, 1u);  // the earlier write's
  EXPECT_THAT(again->delta.face_ids, IsEmpty());

  absl::StatusOr<EnrollResult> clash = store->Enroll(Write("g", "bob", {"y1"}, 4, {}, "req-1"));
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(clash.status().message(), HasSubstr("request_id 'req-1'"));
  EXPECT_THAT(clash.status().message(), HasSubstr("'alice'"));

  // request ids are per gallery.
  absl::StatusOr<EnrollResult> elsewhere = store->Enroll(Write("h", "bob", {"y1"}, 4, {}, "req-1"));
  ASSERT_TRUE(elsewhere.ok()) << elsewhere.status();
  EXPECT_FALSE(elsewhere->replayed);

  absl::StatusOr<std::vector<GalleryDelta>> all = store->ChangesSince({{"h", 1}});
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ((*all)[0].version, 2u);  // no bump for the replay or the clash
  EXPECT_THAT((*all)[0].face_ids, UnorderedElementsAre("f1", "f2", "f3", "b0"));

  // A replay after its faces were forgotten still answers them.
  ASSERT_TRUE(store->Forget({"g", "alice", {}}).ok());
  again = store->Enroll(Write("g", "alice", {"z1"}, 5, {}, "req-1"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->replayed);
  EXPECT_THAT(again->face_ids, ElementsAre("f1", "f2", "f3"));
}

// What a listener saw, for the test thread to wait on.
struct Recorder {
  absl::Mutex mu;
  int changed ABSL_GUARDED_BY(mu) = 0;
  std::vector<std::pair<bool, std::string>> availability ABSL_GUARDED_BY(mu);
  std::vector<absl::Time> changed_at ABSL_GUARDED_BY(mu);

  StoreListener Listener() {
    return StoreListener{[this] {
                           absl::MutexLock lock(&mu);
                           ++changed;
                           changed_at.push_back(absl::Now());
                         },
                         [this](bool up, const std::string& reason) {
                           absl::MutexLock lock(&mu);
                           availability.emplace_back(up, reason);
                         }};
  }
  bool WaitChanged(int at_least, absl::Duration timeout) {
    absl::MutexLock lock(&mu);
    const auto enough = [&] {
      mu.AssertHeld();
      return changed >= at_least;
    };
    return mu.AwaitWithTimeout(absl::Condition(&enough), timeout);
  }
  bool WaitAvailability(size_t events, absl::Duration timeout) {
    absl::MutexLock lock(&mu);
    const auto enough = [&] {
      mu.AssertHeld();
      return availability.size() >= events;
    };
    return mu.AwaitWithTimeout(absl::Condition(&enough), timeout);
  }
  int Changed() {
    absl::MutexLock lock(&mu);
    return changed;
  }
};

TEST_F(PostgresStoreTest, ReplicaFollowsTheOthersWrites) {
  // The recorders outlive the stores whose followers call them.
  Recorder seen, seen_by_a;
  std::unique_ptr<GalleryStore> a = Open();
  std::unique_ptr<GalleryStore> b = Open();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  b->Follow(seen.Listener());
  ASSERT_TRUE(seen.WaitChanged(1, absl::Seconds(10)));  // the first catch-up, once listening

  absl::flat_hash_map<std::string, uint64_t> known;
  std::vector<double> latencies_ms;
  for (int i = 0; i < 5; ++i) {
    const int before = seen.Changed();
    const EnrollWrite w = Write("g", absl::StrCat("s", i), {absl::StrCat("f", i)}, 10 + i);
    absl::StatusOr<EnrollResult> r = a->Enroll(w);
    ASSERT_TRUE(r.ok()) << r.status();
    const absl::Time acknowledged = absl::Now();
    ASSERT_TRUE(seen.WaitChanged(before + 1, absl::Seconds(5))) << "no notification";
    absl::StatusOr<std::vector<GalleryDelta>> d = b->ChangesSince(known);
    const absl::Duration latency = absl::Now() - acknowledged;
    ASSERT_TRUE(d.ok()) << d.status();
    ASSERT_EQ(d->size(), 1u);
    EXPECT_EQ((*d)[0].version, r->version);
    EXPECT_THAT((*d)[0].face_ids, ElementsAre(w.face_ids[0]));
    EXPECT_EQ((*d)[0].embeddings, w.embeddings);
    known["g"] = (*d)[0].version;
    latencies_ms.push_back(absl::ToDoubleMilliseconds(latency));
    EXPECT_LT(latency, absl::Seconds(1));
  }
  std::sort(latencies_ms.begin(), latencies_ms.end());
  printf(
      "[ measure  ] A's Enroll acknowledged -> B notified and caught up: median %.2f ms, "
      "max %.2f ms (5 writes)\n",
      latencies_ms[2], latencies_ms.back());

  // Forget on B reaches A the same way.
  a->Follow(seen_by_a.Listener());
  ASSERT_TRUE(seen_by_a.WaitChanged(1, absl::Seconds(10)));
  ASSERT_TRUE(b->Forget({"g", "s0", {}}).ok());
  ASSERT_TRUE(seen_by_a.WaitChanged(2, absl::Seconds(5)));
  absl::StatusOr<std::vector<GalleryDelta>> d = a->ChangesSince(known);
  ASSERT_TRUE(d.ok());
  ASSERT_EQ(d->size(), 1u);
  EXPECT_THAT((*d)[0].removed_faces, ElementsAre("f0"));
  EXPECT_THAT((*d)[0].removed_subjects, ElementsAre("s0"));
}

TEST_F(PostgresStoreTest, SchemaNewerThanTheServerIsRefused) {
  // Replicas starting together migrate once (the advisory lock): all open, one schema row.
  std::vector<std::thread> threads;
  std::atomic<int> opened{0};
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      absl::StatusOr<std::unique_ptr<GalleryStore>> s = OpenPostgresStore(uri_);
      EXPECT_TRUE(s.ok()) << s.status();
      if (s.ok()) ++opened;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(opened.load(), 4);
  {
    pqxx::connection conn(uri_);
    pqxx::work tx(conn);
    EXPECT_EQ(tx.exec("SELECT count(*), max(version) FROM arcface_schema")[0][0].as<int>(), 1);
    tx.exec("UPDATE arcface_schema SET version = 99");
    tx.commit();
  }
  absl::StatusOr<std::unique_ptr<GalleryStore>> s = OpenPostgresStore(uri_);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.status().message(), HasSubstr("version 99"));
  EXPECT_THAT(s.status().message(), HasSubstr("newer than this server's 2"));
}

// Schema 2 records each gallery's embedding size (its model's). A store of schema 1 (every
// gallery ArcFace's 512) is migrated and reads as before; a gallery takes only its own size.
TEST_F(PostgresStoreTest, EmbeddingSizesPerGalleryAndSchema1IsMigrated) {
  EnrollWrite old = Write("old", "ann", {"f1", "f2"}, 7);
  {
    auto store = OpenPostgresStore(uri_);
    ASSERT_TRUE(store.ok()) << store.status();
    ASSERT_TRUE((*store)->Enroll(old).ok());
  }
  {
    // Back to what a schema-1 server left.
    pqxx::connection conn(uri_);
    pqxx::work tx(conn);
    tx.exec("ALTER TABLE arcface_galleries DROP COLUMN dim");
    tx.exec("UPDATE arcface_schema SET version = 1");
    tx.commit();
  }
  auto store = OpenPostgresStore(uri_);
  ASSERT_TRUE(store.ok()) << store.status();
  absl::StatusOr<std::vector<GalleryDelta>> all = (*store)->ChangesSince({});
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ(Faces((*all)[0])["f2"], Row(old, 1));

  // A 128-wide gallery beside it; 512-wide faces are refused there, naming both sizes.
  EnrollWrite small = Write("small", "bob", {"s1", "s2"}, 8, {}, "", "dlib");
  small.embeddings.resize(2 * 128);
  ASSERT_TRUE((*store)->Enroll(small).ok());
  EnrollWrite wide = Write("small", "bob", {"s3"}, 9, {}, "", "dlib");
  absl::StatusOr<EnrollResult> refused = (*store)->Enroll(wide);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("gallery 'small' holds embeddings of 128 values; these have 512"));
  all = (*store)->ChangesSince({{"old", 1}});
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 1u);
  const GalleryDelta& d = (*all)[0];
  ASSERT_EQ(d.face_ids.size(), 2u);
  ASSERT_EQ(d.embeddings.size(), 2u * 128);
  EXPECT_TRUE(std::equal(d.embeddings.begin(), d.embeddings.end(), small.embeddings.begin()));
}

TEST_F(PostgresStoreTest, ConcurrentWritersGetDenseVersionsAndExactCounts) {
  std::unique_ptr<GalleryStore> stores[2] = {Open(), Open()};
  ASSERT_NE(stores[0], nullptr);
  ASSERT_NE(stores[1], nullptr);
  constexpr int kThreads = 8, kWrites = 25, kFacesPerWrite = 2;
  absl::Mutex mu;
  std::vector<uint64_t> versions;
  std::vector<std::string> acknowledged;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      GalleryStore& store = *stores[t % 2];
      for (int i = 0; i < kWrites; ++i) {
        const std::string id = absl::StrCat("t", t, "w", i);
        absl::StatusOr<EnrollResult> r = store.Enroll(
            Write("g", absl::StrCat("subject", i % 5), {id + "a", id + "b"}, t * 100 + i + 1));
        ASSERT_TRUE(r.ok()) << r.status();
        absl::MutexLock lock(&mu);
        versions.push_back(r->version);
        acknowledged.insert(acknowledged.end(), r->face_ids.begin(), r->face_ids.end());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::sort(versions.begin(), versions.end());
  std::vector<uint64_t> dense(kThreads * kWrites);
  for (size_t i = 0; i < dense.size(); ++i) dense[i] = i + 1;
  EXPECT_EQ(versions, dense);
  absl::StatusOr<std::vector<GalleryDelta>> all = stores[1]->ChangesSince({});
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ((*all)[0].version, uint64_t{kThreads * kWrites});
  EXPECT_EQ((*all)[0].face_ids.size(), size_t{kThreads * kWrites * kFacesPerWrite});
  EXPECT_THAT((*all)[0].face_ids, UnorderedElementsAreArray(acknowledged));
  EXPECT_EQ((*all)[0].subjects.size(), 5u);
}

TEST_F(PostgresStoreTest, RowsThisServerDidNotWriteAreInternalNamingTheRow) {
  std::unique_ptr<GalleryStore> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Enroll(Write("g", "alice", {"a0", "a1"}, 1)).ok());
  {
    pqxx::connection conn(uri_);
    pqxx::work tx(conn);
    tx.exec("UPDATE arcface_faces SET embedding = '\\x0102' WHERE face_id = 'a1'");
    tx.commit();
  }
  absl::StatusOr<std::vector<GalleryDelta>> read = store->ChangesSince({});
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(read.status().message(), HasSubstr("face 'a1' of gallery 'g'"));
  EXPECT_THAT(read.status().message(), HasSubstr("2 bytes, not 2048"));
  {
    pqxx::connection conn(uri_);
    pqxx::work tx(conn);
    tx.exec("UPDATE arcface_faces SET removed_version = 1 WHERE face_id = 'a1'");
    tx.exec("UPDATE arcface_subjects SET labels = '{\"k\": 7}' WHERE subject_id = 'alice'");
    tx.commit();
  }
  read = store->ChangesSince({});
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(read.status().message(), HasSubstr("subject 'alice' of gallery 'g'"));
}

TEST_F(PostgresStoreTest, PasswordIsNeverShown) {
  const std::string secret = "S3cr3t-Pw";
  // Trust authentication ignores the password, so the URI connects.
  std::string with_password = uri_;
  with_password.replace(with_password.find("postgres@"), 9, "postgres:" + secret + "@");
  absl::StatusOr<std::unique_ptr<GalleryStore>> store = OpenPostgresStore(with_password);
  ASSERT_TRUE(store.ok()) << store.status();
  const std::string port = uri_.substr(uri_.rfind(':') + 1, uri_.rfind('/') - uri_.rfind(':') - 1);
  EXPECT_EQ((*store)->Describe(),
            absl::StrCat("postgres://postgres@127.0.0.1:", port, uri_.substr(uri_.rfind('/'))));

  // Unreachable (a port nobody listens on) and malformed URIs: errors without the secret.
  absl::StatusOr<std::unique_ptr<GalleryStore>> down =
      OpenPostgresStore("postgresql://postgres:" + secret + "@127.0.0.1:1/db");
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(down.status().message(), HasSubstr("postgres://postgres@127.0.0.1:1/db"));
  EXPECT_THAT(std::string(down.status().message()), Not(HasSubstr(secret)));
  absl::StatusOr<std::unique_ptr<GalleryStore>> bad =
      OpenPostgresStore("postgresql://postgres:" + secret + "%zz@127.0.0.1:x/db");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), Not(HasSubstr(secret)));
}

// Runs one statement as the cluster's superuser.
void Admin(const PgCluster& cluster, const std::string& sql) {
  pqxx::connection conn(cluster.uri());
  pqxx::nontransaction tx(conn);
  tx.exec(sql);
}

// Its own cluster: it stops and restarts the server. Replica A connects as a role of its own,
// so that the test can keep A from reconnecting (NOLOGIN stops new sessions only) while B
// writes: what A then catches up can only come from its catch-up after the reconnect, never
// from a notification (those reach only the sessions listening at commit time).
TEST(PostgresStoreOutageTest, WritesFailWhileDownAndTheReplicaCatchesUpAfter) {
  PgCluster cluster;
  absl::Status started = cluster.Start(ARCFACE_PYTHON, ARCFACE_PG_CLUSTER_PY);
  ASSERT_TRUE(started.ok()) << started;
  Recorder seen;  // outlives the store whose follower calls it
  const std::string secret = "S3cr3t-Pw";
  Admin(cluster, "CREATE ROLE replica_a LOGIN SUPERUSER");
  std::string uri_a = cluster.uri(), uri_b = cluster.uri();
  uri_a.replace(uri_a.find("postgres@"), 9, "replica_a:" + secret + "@");
  uri_b.replace(uri_b.find("postgres@"), 9, "postgres:" + secret + "@");
  absl::StatusOr<std::unique_ptr<GalleryStore>> b = OpenPostgresStore(uri_b);
  absl::StatusOr<std::unique_ptr<GalleryStore>> a = OpenPostgresStore(uri_a);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  (*a)->Follow(seen.Listener());
  ASSERT_TRUE(seen.WaitChanged(1, absl::Seconds(10)));
  ASSERT_TRUE((*a)->Enroll(Write("g", "alice", {"a0"}, 1)).ok());  // a pooled connection
  ASSERT_TRUE((*b)->Enroll(Write("g", "bob", {"b0"}, 2)).ok());
  EXPECT_EQ((*a)->Health(), std::make_pair(true, std::string()));

  Admin(cluster, "ALTER ROLE replica_a NOLOGIN");
  ASSERT_TRUE(cluster.Stop().ok());
  const absl::Time stopped = absl::Now();
  ASSERT_TRUE(seen.WaitAvailability(1, absl::Seconds(10))) << "availability(false) never came";
  printf("[ measure  ] database stopped -> availability(false) after %.1f ms\n",
         absl::ToDoubleMilliseconds(absl::Now() - stopped));
  {
    absl::MutexLock lock(&seen.mu);
    EXPECT_FALSE(seen.availability[0].first);
    EXPECT_THAT(seen.availability[0].second, Not(IsEmpty()));
    EXPECT_THAT(seen.availability[0].second, Not(HasSubstr(secret)));
  }
  auto [up, reason] = (*a)->Health();
  EXPECT_FALSE(up);
  EXPECT_THAT(reason, Not(IsEmpty()));
  EXPECT_THAT(reason, Not(HasSubstr(secret)));

  // Writes while down: UNAVAILABLE with libpq's reason, soon.
  const absl::Time write_start = absl::Now();
  absl::StatusOr<EnrollResult> refused = (*a)->Enroll(Write("g", "carol", {"c0"}, 3));
  const absl::Duration took = absl::Now() - write_start;
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(refused.status().message(), HasSubstr("is unavailable: "));
  EXPECT_THAT(refused.status().message(), HasSubstr("Connection refused"));
  EXPECT_THAT(std::string(refused.status().message()), Not(HasSubstr(secret)));
  EXPECT_LT(took, absl::Seconds(5));
  printf("[ measure  ] Enroll while the database is down: UNAVAILABLE after %.1f ms: %s\n",
         absl::ToDoubleMilliseconds(took), std::string(refused.status().message()).c_str());
  absl::StatusOr<std::vector<GalleryDelta>> read = (*a)->ChangesSince({});
  EXPECT_EQ(read.status().code(), absl::StatusCode::kUnavailable);

  // Back, but A may not log in: B (its pooled connection broken by the restart, replaced on
  // this call) writes meanwhile; A's follower keeps trying and says why it cannot.
  ASSERT_TRUE(cluster.Resume().ok());
  const EnrollWrite meanwhile = Write("g", "dave", {"d0"}, 4);
  absl::StatusOr<EnrollResult> written = (*b)->Enroll(meanwhile);
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_EQ(written->version, 3u);
  const auto refused_login = [&] {
    return absl::StrContains((*a)->Health().second, "not permitted to log in");
  };
  for (const absl::Time deadline = absl::Now() + absl::Seconds(10);
       !refused_login() && absl::Now() < deadline;) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_TRUE(refused_login()) << (*a)->Health().second;
  {
    absl::MutexLock lock(&seen.mu);
    EXPECT_EQ(seen.availability.size(), 1u);  // still the one outage
  }

  // A may log in again: it reconnects, says so, and its catch-up (exactly one changed())
  // finds dave.
  const int changed_before = seen.Changed();
  const absl::Time allowed = absl::Now();
  Admin(cluster, "ALTER ROLE replica_a LOGIN");
  ASSERT_TRUE(seen.WaitAvailability(2, absl::Seconds(10))) << "availability(true) never came";
  printf("[ measure  ] login allowed again -> availability(true) after %.1f ms\n",
         absl::ToDoubleMilliseconds(absl::Now() - allowed));
  {
    absl::MutexLock lock(&seen.mu);
    EXPECT_EQ(seen.availability[1], std::make_pair(true, std::string()));
  }
  ASSERT_TRUE(seen.WaitChanged(changed_before + 1, absl::Seconds(5)));
  EXPECT_EQ(seen.Changed(), changed_before + 1);
  EXPECT_EQ((*a)->Health(), std::make_pair(true, std::string()));
  absl::StatusOr<std::vector<GalleryDelta>> caught_up = (*a)->ChangesSince({{"g", 2}});
  ASSERT_TRUE(caught_up.ok()) << caught_up.status();
  ASSERT_EQ(caught_up->size(), 1u);
  EXPECT_EQ((*caught_up)[0].version, 3u);
  EXPECT_THAT((*caught_up)[0].face_ids, ElementsAre("d0"));
  EXPECT_EQ((*caught_up)[0].embeddings, meanwhile.embeddings);
  // A's own pooled connection was closed by the restart: its next write opens a new one.
  absl::StatusOr<EnrollResult> again = (*a)->Enroll(Write("g", "carol", {"c0"}, 3));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->version, 4u);

  // A crash (SIGKILL) rather than a shutdown: the same, and nothing acknowledged is lost.
  ASSERT_TRUE(cluster.Kill().ok());
  ASSERT_TRUE(seen.WaitAvailability(3, absl::Seconds(10)));
  ASSERT_TRUE(cluster.Resume().ok());
  ASSERT_TRUE(seen.WaitAvailability(4, absl::Seconds(10)));
  absl::StatusOr<std::vector<GalleryDelta>> after_crash = (*b)->ChangesSince({});
  ASSERT_TRUE(after_crash.ok()) << after_crash.status();
  EXPECT_EQ((*after_crash)[0].version, 4u);
  EXPECT_THAT((*after_crash)[0].face_ids, UnorderedElementsAre("a0", "b0", "d0", "c0"));
}

// Start-up load: ChangesSince({}) of a gallery of N faces (ARCFACE_PG_LOAD_FACES, default
// 100000, 20000 in the sanitizer lanes, which check the path and not its speed; the issue's
// target is 1M faces in 30 s).
TEST_F(PostgresStoreTest, LoadsALargeGalleryQuickly) {
  const char* env = std::getenv("ARCFACE_PG_LOAD_FACES");
  const size_t n = env != nullptr ? std::strtoul(env, nullptr, 10)
                                  : (ARCFACE_SANITIZED ? 20000 : 100000);
  constexpr size_t kPerCall = 1000;
  std::unique_ptr<GalleryStore> store = Open();
  ASSERT_NE(store, nullptr);
  const std::vector<float> block = UnitVectors(kPerCall, 7);
  const absl::Time enroll_start = absl::Now();
  for (size_t done = 0; done < n; done += kPerCall) {
    EnrollWrite w;
    w.gallery = "big";
    w.model_id = "r50";
    w.subject_id = absl::StrCat("s", done / kPerCall);
    for (size_t i = 0; i < kPerCall; ++i) w.face_ids.push_back(absl::StrCat("f", done + i));
    w.embeddings = block;
    absl::StatusOr<EnrollResult> r = store->Enroll(w);
    ASSERT_TRUE(r.ok()) << r.status();
  }
  const absl::Duration enroll = absl::Now() - enroll_start;

  const absl::Time load_start = absl::Now();
  absl::StatusOr<std::vector<GalleryDelta>> all = store->ChangesSince({});
  const absl::Duration load = absl::Now() - load_start;
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 1u);
  const GalleryDelta& d = (*all)[0];
  ASSERT_EQ(d.face_ids.size(), n);
  ASSERT_EQ(d.embeddings.size(), n * kDim);
  EXPECT_EQ(d.embeddings.capacity(), n * kDim);  // reserved from the count, never regrown
  std::set<std::string> ids(d.face_ids.begin(), d.face_ids.end());
  EXPECT_EQ(ids.size(), n);
  // Spot checks: each face's row is its block row.
  for (size_t i = 0; i < n; i += n / 7 + 1) {
    const size_t face = std::stoul(d.face_ids[i].substr(1));
    EXPECT_TRUE(std::equal(block.begin() + (face % kPerCall) * kDim,
                           block.begin() + (face % kPerCall + 1) * kDim,
                           d.embeddings.begin() + i * kDim))
        << d.face_ids[i];
  }
  const double per_million = absl::ToDoubleSeconds(load) * 1e6 / n;
  printf(
      "[ measure  ] %zu faces: enrolled in %.1f s (%.0f faces/s, %zu a call); "
      "loaded in %.2f s (%.0f faces/s, %.1f s per million)\n",
      n, absl::ToDoubleSeconds(enroll), n / absl::ToDoubleSeconds(enroll), kPerCall,
      absl::ToDoubleSeconds(load), n / absl::ToDoubleSeconds(load), per_million);
  // The issue's budget is 30 s per million; twice that here, on a machine shared with builds.
  if (!ARCFACE_SANITIZED) {
    EXPECT_LT(per_million, 60.0);
  }
}

}  // namespace
}  // namespace arcface::gallery
