#include "server/gallery/galleries.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "spdlog/spdlog.h"

namespace arcface::gallery {

// One gallery in memory. Rows of `index` are its faces; the row_* vectors are parallel to them.
struct Galleries::Gallery {
  explicit Gallery(std::string n) : name(std::move(n)) {}

  const std::string name;
  mutable absl::Mutex mu;
  std::string model_id ABSL_GUARDED_BY(mu);
  // Of every row of `index` (the model's embedding size); set by the first faces added.
  int dim ABSL_GUARDED_BY(mu) = kDim;
  uint64_t version ABSL_GUARDED_BY(mu) = 0;
  std::unique_ptr<VectorIndex> index ABSL_GUARDED_BY(mu);
  std::vector<std::string> row_face ABSL_GUARDED_BY(mu);
  std::vector<uint32_t> row_subject ABSL_GUARDED_BY(mu);  // into `subjects`
  // Each face's slot: its number for life (rows move on removal); HNSW knows faces by it.
  std::vector<int64_t> row_slot ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<int64_t, uint32_t> slot_row ABSL_GUARDED_BY(mu);
  int64_t next_slot ABSL_GUARDED_BY(mu) = 0;
  absl::flat_hash_map<std::string, uint32_t> face_row ABSL_GUARDED_BY(mu);
  struct Subject {
    std::string id;
    Labels labels;
    uint32_t num_faces = 0;
  };
  std::vector<Subject> subjects ABSL_GUARDED_BY(mu);
  std::vector<uint32_t> free_subjects ABSL_GUARDED_BY(mu);
  absl::btree_map<std::string, uint32_t> subject_number ABSL_GUARDED_BY(mu);
  // The approximate index, when built; hnsw_dead counts removed faces still in its graph.
  std::unique_ptr<HnswIndex> hnsw ABSL_GUARDED_BY(mu);
  size_t hnsw_dead ABSL_GUARDED_BY(mu) = 0;
  bool hnsw_building ABSL_GUARDED_BY(mu) = false;

  size_t num_faces() const ABSL_SHARED_LOCKS_REQUIRED(mu) { return row_face.size(); }

  uint32_t SubjectNumber(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = subject_number.find(id);
    if (it != subject_number.end()) return it->second;
    uint32_t n;
    if (!free_subjects.empty()) {
      n = free_subjects.back();
      free_subjects.pop_back();
      subjects[n] = Subject{id, {}, 0};
    } else {
      n = static_cast<uint32_t>(subjects.size());
      subjects.push_back(Subject{id, {}, 0});
    }
    subject_number.emplace(id, n);
    return n;
  }

  void RemoveSubject(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = subject_number.find(id);
    if (it == subject_number.end()) return;
    subjects[it->second] = Subject{};
    free_subjects.push_back(it->second);
    subject_number.erase(it);
  }

  void RemoveFace(const std::string& face_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = face_row.find(face_id);
    if (it == face_row.end()) return;
    const uint32_t row = it->second;
    face_row.erase(it);
    --subjects[row_subject[row]].num_faces;
    slot_row.erase(row_slot[row]);
    if (hnsw) ++hnsw_dead;
    const uint32_t last = static_cast<uint32_t>(row_face.size() - 1);
    index->SwapRemove(row);
    if (row != last) {
      row_face[row] = std::move(row_face[last]);
      row_subject[row] = row_subject[last];
      row_slot[row] = row_slot[last];
      face_row[row_face[row]] = row;
      slot_row[row_slot[row]] = row;
    }
    row_face.pop_back();
    row_subject.pop_back();
    row_slot.pop_back();
  }
};

namespace {

std::string EncodePageToken(const std::string& last_subject) {
  return absl::WebSafeBase64Escape(absl::StrCat("s:", last_subject));
}

bool DecodePageToken(const std::string& token, std::string* last_subject) {
  std::string raw;
  if (!absl::WebSafeBase64Unescape(token, &raw) || raw.rfind("s:", 0) != 0) return false;
  *last_subject = raw.substr(2);
  return true;
}

absl::Status ModelMismatch(const std::string& gallery, const std::string& bound,
                           const std::string& model_id) {
  return absl::FailedPreconditionError(absl::StrCat("gallery '", gallery, "' is bound to model ",
                                                    bound, "; these faces are from model ",
                                                    model_id));
}

}  // namespace

Galleries::Galleries(std::unique_ptr<GalleryStore> store, GalleriesOptions options)
    : store_(std::move(store)),
      options_(std::move(options)),
      store_description_(store_->Describe()) {}

Galleries::~Galleries() {
  store_.reset();  // joins the store's follower (no catch-up, so no new HNSW build, after it)
  stopping_ = true;
  std::vector<std::thread> builds;
  {
    absl::MutexLock lock(&builds_mu_);
    builds.swap(builds_);
  }
  for (std::thread& t : builds) t.join();
}

absl::StatusOr<std::unique_ptr<Galleries>> Galleries::Open(std::unique_ptr<GalleryStore> store,
                                                           GalleriesOptions options) {
  if (!options.index_factory) options.index_factory = [](int dim) { return MakeFlatIndex(dim); };
  std::unique_ptr<Galleries> g(new Galleries(std::move(store), std::move(options)));
  const absl::Time start = absl::Now();
  {
    absl::MutexLock lock(&g->write_mu_);
    if (absl::Status s = g->CatchUp(); !s.ok()) return s;
  }
  g->load_seconds_ = absl::ToDoubleSeconds(absl::Now() - start);
  Galleries* self = g.get();
  g->store_->Follow(StoreListener{
      [self] { self->OnStoreChanged(); },
      [self](bool up, const std::string& reason) { self->OnAvailability(up, reason); }});
  return g;
}

Galleries::Gallery* Galleries::Find(const std::string& name) const {
  absl::MutexLock lock(&map_mu_);
  auto it = galleries_.find(name);
  return it == galleries_.end() ? nullptr : it->second.get();
}

bool Galleries::Apply(GalleryDelta delta) {
  Gallery* g = Find(delta.gallery);
  if (g == nullptr) {
    absl::MutexLock lock(&map_mu_);
    auto made = std::make_unique<Gallery>(delta.gallery);
    g = made.get();
    galleries_.emplace(delta.gallery, std::move(made));
  }
  {
    absl::WriterMutexLock lock(&g->mu);
    if (delta.version <= g->version) return true;
    if (delta.from_version != g->version) return false;
    const size_t n = delta.face_ids.size();
    // An empty gallery takes the dimension of the first faces it gets (a gallery's faces are of
    // one model, so of one dimension; Enroll() refuses others).
    const int dim = n > 0 ? static_cast<int>(delta.embeddings.size() / n) : g->dim;
    if (!g->index || (g->num_faces() == 0 && dim != g->dim)) {
      g->index = options_.index_factory(dim);
      g->dim = dim;
      g->hnsw.reset();
      g->hnsw_dead = 0;
    }
    if (dim != g->dim) {
      spdlog::error("gallery '{}': {} faces of {} values cannot join faces of {}; skipped", g->name,
                    n, dim, g->dim);
      return true;
    }
    g->model_id = delta.model_id;
    for (const std::string& face_id : delta.removed_faces) g->RemoveFace(face_id);
    for (const std::string& subject : delta.removed_subjects) g->RemoveSubject(subject);
    for (SubjectRecord& s : delta.subjects) {
      g->subjects[g->SubjectNumber(s.subject_id)].labels = std::move(s.labels);
    }
    const size_t first_row = g->num_faces();
    const int64_t first_slot = g->next_slot;
    absl::Status added = g->index->Adopt(std::move(delta.embeddings));
    if (!added.ok()) {
      // Memory cannot follow the store (device memory ran out): a loud failure, not a silent
      // gap; the gallery keeps serving what it had.
      spdlog::error("gallery '{}': cannot add {} faces to the index: {}", g->name, n,
                    added.ToString());
      return true;
    }
    for (size_t i = 0; i < n; ++i) {
      const uint32_t subject = g->SubjectNumber(delta.face_subjects[i]);
      ++g->subjects[subject].num_faces;
      const uint32_t row = static_cast<uint32_t>(first_row + i);
      g->face_row[delta.face_ids[i]] = row;
      g->row_face.push_back(std::move(delta.face_ids[i]));
      g->row_subject.push_back(subject);
      g->row_slot.push_back(g->next_slot);
      g->slot_row[g->next_slot] = row;
      ++g->next_slot;
    }
    if (g->hnsw && n > 0) {
      std::vector<float> units(n * g->dim);
      std::vector<int64_t> slots(n);
      for (size_t i = 0; i < n; ++i) {
        g->index->Row(first_row + i, units.data() + i * g->dim);
        slots[i] = first_slot + static_cast<int64_t>(i);
      }
      if (absl::Status s = g->hnsw->Add(units.data(), slots.data(), n); !s.ok()) {
        spdlog::error("gallery '{}': HNSW add failed, searching exactly: {}", g->name,
                      s.ToString());
        g->hnsw.reset();
      }
    }
    // Too many removed faces in the graph: drop it (exact search) and build it anew.
    if (g->hnsw && g->hnsw_dead * 4 > g->hnsw->size()) {
      g->hnsw.reset();
      g->hnsw_dead = 0;
    }
    g->version = delta.version;
  }
  MaybeBuildHnsw(g);
  return true;
}

absl::Status Galleries::CatchUp() {
  absl::flat_hash_map<std::string, uint64_t> known;
  {
    absl::MutexLock lock(&map_mu_);
    for (const auto& [name, g] : galleries_) {
      absl::ReaderMutexLock glock(&g->mu);
      known[name] = g->version;
    }
  }
  absl::StatusOr<std::vector<GalleryDelta>> deltas = store_->ChangesSince(known);
  if (!deltas.ok()) return deltas.status();
  const absl::Time now = absl::Now();
  absl::Time newest = absl::InfinitePast();
  for (GalleryDelta& d : *deltas) {
    newest = std::max(newest, d.committed);
    const std::string name = d.gallery;
    if (!Apply(std::move(d))) {
      return absl::InternalError(absl::StrCat("gallery '", name,
                                              "': the store's changes do not start at the "
                                              "version held in memory"));
    }
  }
  absl::MutexLock lock(&sync_mu_);
  ++sync_.catch_ups;
  if (!deltas->empty() && newest != absl::InfinitePast() && !known.empty()) {
    sync_.last_lag_seconds = std::max(0.0, absl::ToDoubleSeconds(now - newest));
  }
  return absl::OkStatus();
}

absl::Status Galleries::ApplyOwn(GalleryDelta delta) {
  if (Apply(std::move(delta))) return absl::OkStatus();
  return CatchUp();
}

absl::StatusOr<EnrollResult> Galleries::Enroll(const EnrollWrite& write) {
  if (Gallery* g = Find(write.gallery)) {
    absl::ReaderMutexLock lock(&g->mu);
    if (!g->model_id.empty() && g->model_id != write.model_id) {
      return ModelMismatch(write.gallery, g->model_id, write.model_id);
    }
    const size_t dim = write.face_ids.empty() ? 0 : write.embeddings.size() / write.face_ids.size();
    if (g->num_faces() > 0 && dim != size_t(g->dim)) {
      return absl::FailedPreconditionError(
          absl::StrCat("gallery '", write.gallery, "' holds embeddings of ", g->dim,
                       " values (model ", g->model_id, "); these have ", dim));
    }
  }
  absl::MutexLock lock(&write_mu_);
  absl::StatusOr<EnrollResult> result = store_->Enroll(write);
  if (!result.ok() || result->replayed) return result;
  GalleryDelta delta = std::move(result->delta);
  result->delta = GalleryDelta{};
  if (absl::Status s = ApplyOwn(std::move(delta)); !s.ok()) return s;
  return result;
}

absl::StatusOr<ForgetResult> Galleries::Forget(const ForgetWrite& write) {
  absl::MutexLock lock(&write_mu_);
  absl::StatusOr<ForgetResult> result = store_->Forget(write);
  if (!result.ok()) return result;
  GalleryDelta delta = std::move(result->delta);
  result->delta = GalleryDelta{};
  if (absl::Status s = ApplyOwn(std::move(delta)); !s.ok()) return s;
  return result;
}

void Galleries::OnStoreChanged() {
  absl::MutexLock lock(&write_mu_);
  if (absl::Status s = CatchUp(); !s.ok()) {
    spdlog::warn("gallery store {}: catching up failed: {}", store_description_, s.ToString());
  }
}

void Galleries::OnAvailability(bool up, const std::string& reason) {
  if (up) {
    spdlog::info("gallery store {} is reachable again", store_description_);
  } else {
    spdlog::error("gallery store {} is down ({}); Identify answers from memory, writes fail",
                  store_description_, reason);
  }
  absl::MutexLock lock(&sync_mu_);
  sync_.store_up = up;
  sync_.store_down_reason = up ? "" : reason;
}

absl::Status Galleries::Identify(const std::string& gallery, const std::string& model_id,
                                 const float* probes, int nq, int top_k,
                                 std::optional<float> threshold,
                                 std::vector<std::vector<Candidate>>* results, uint64_t* version,
                                 int dim) const {
  Gallery* g = Find(gallery);
  if (g == nullptr) {
    return absl::NotFoundError(absl::StrCat("gallery '", gallery, "' does not exist"));
  }
  absl::ReaderMutexLock lock(&g->mu);
  if (g->model_id != model_id) return ModelMismatch(gallery, g->model_id, model_id);
  if (dim != g->dim) {
    return absl::FailedPreconditionError(absl::StrCat("gallery '", gallery,
                                                      "' holds embeddings of ", g->dim,
                                                      " values; these probes have ", dim));
  }
  *version = g->version;
  results->assign(nq, {});
  const size_t n = g->num_faces();
  if (n == 0) return absl::OkStatus();
  const bool approximate = g->hnsw != nullptr;
  const size_t searchable = approximate ? g->hnsw->size() : n;
  // Rows come best first; a subject's first row is its best face. Ask for a few rows per
  // subject wanted, and for more (4× each round) only for the probes that did not get top_k
  // subjects above the threshold from what they saw.
  std::vector<int> pending(nq);
  for (int i = 0; i < nq; ++i) pending[i] = i;
  size_t k = std::min(searchable, static_cast<size_t>(std::max(4 * top_k, top_k + 16)));
  std::vector<float> batch;
  std::vector<float> sims;
  std::vector<int64_t> ids;
  while (!pending.empty()) {
    batch.resize(pending.size() * dim);
    for (size_t p = 0; p < pending.size(); ++p) {
      std::memcpy(batch.data() + size_t(p) * dim, probes + size_t(pending[p]) * dim,
                  dim * sizeof(float));
    }
    sims.resize(pending.size() * k);
    ids.resize(pending.size() * k);
    const int count = static_cast<int>(pending.size());
    absl::Status searched =
        approximate
            ? g->hnsw->Search(batch.data(), count, static_cast<int>(k), sims.data(), ids.data())
            : g->index->Search(batch.data(), count, static_cast<int>(k), sims.data(), ids.data());
    if (!searched.ok()) return searched;
    std::vector<int> again;
    for (size_t p = 0; p < pending.size(); ++p) {
      std::vector<Candidate>& out = (*results)[pending[p]];
      out.clear();
      absl::flat_hash_set<uint32_t> seen;
      bool cut = false;  // the rest are below the threshold
      for (size_t j = 0; j < k && static_cast<int>(out.size()) < top_k; ++j) {
        int64_t id = ids[p * k + j];
        if (id < 0) break;
        const float sim = sims[p * k + j];
        if (threshold && sim < *threshold) {
          cut = true;
          break;
        }
        if (approximate) {
          auto it = g->slot_row.find(id);
          if (it == g->slot_row.end()) continue;  // removed since the graph was built
          id = it->second;
        }
        const uint32_t subject = g->row_subject[id];
        if (!seen.insert(subject).second) continue;
        out.push_back(Candidate{g->subjects[subject].id, g->row_face[id], sim});
      }
      if (static_cast<int>(out.size()) < top_k && !cut && k < searchable) {
        again.push_back(pending[p]);
      }
    }
    pending.swap(again);
    k = std::min(searchable, k * 4);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SubjectInfo>> Galleries::ListSubjects(
    const std::string& gallery, int page_size, const std::string& page_token,
    std::string* next_page_token) const {
  std::string after;
  if (!page_token.empty() && !DecodePageToken(page_token, &after)) {
    return absl::InvalidArgumentError("page_token is not one this server gave");
  }
  Gallery* g = Find(gallery);
  if (g == nullptr) {
    return absl::NotFoundError(absl::StrCat("gallery '", gallery, "' does not exist"));
  }
  absl::ReaderMutexLock lock(&g->mu);
  auto it = page_token.empty() ? g->subject_number.begin() : g->subject_number.upper_bound(after);
  std::vector<SubjectInfo> page;
  for (; it != g->subject_number.end() && static_cast<int>(page.size()) < page_size; ++it) {
    const Gallery::Subject& s = g->subjects[it->second];
    page.push_back(SubjectInfo{s.id, s.num_faces, s.labels});
  }
  next_page_token->clear();
  if (it != g->subject_number.end() && !page.empty()) {
    *next_page_token = EncodePageToken(page.back().subject_id);
  }
  return page;
}

absl::StatusOr<GalleryStats> Galleries::Stats(const std::string& gallery) const {
  Gallery* g = Find(gallery);
  if (g == nullptr) {
    return absl::NotFoundError(absl::StrCat("gallery '", gallery, "' does not exist"));
  }
  absl::ReaderMutexLock lock(&g->mu);
  return GalleryStats{
      g->name,        g->model_id, g->subject_number.size(),
      g->num_faces(), g->version,  g->hnsw ? g->hnsw->Describe() : g->index->Describe(),
      g->dim};
}

std::vector<GalleryStats> Galleries::AllStats() const {
  std::vector<std::string> names;
  {
    absl::MutexLock lock(&map_mu_);
    for (const auto& entry : galleries_) names.push_back(entry.first);
  }
  std::sort(names.begin(), names.end());
  std::vector<GalleryStats> all;
  for (const std::string& name : names) {
    if (absl::StatusOr<GalleryStats> s = Stats(name); s.ok()) all.push_back(*std::move(s));
  }
  return all;
}

SyncStats Galleries::sync() const {
  SyncStats s;
  {
    absl::MutexLock lock(&sync_mu_);
    s = sync_;
  }
  const auto [up, reason] = store_->Health();
  if (!up) {
    s.store_up = false;
    s.store_down_reason = reason;
  }
  return s;
}

void Galleries::MaybeBuildHnsw(Gallery* g) {
  if (options_.hnsw_min_faces == 0 || stopping_) return;
  {
    absl::WriterMutexLock lock(&g->mu);
    if (g->hnsw || g->hnsw_building || g->num_faces() < options_.hnsw_min_faces) return;
    g->hnsw_building = true;
  }
  absl::MutexLock lock(&builds_mu_);
  builds_.emplace_back([this, g] { BuildHnsw(g); });
}

void Galleries::BuildHnsw(Gallery* g) {
  // A snapshot under the reader lock; the graph is built without any lock held.
  std::vector<float> units;
  std::vector<int64_t> slots;
  int64_t snapshot_end;
  int dim;
  {
    absl::ReaderMutexLock lock(&g->mu);
    const size_t n = g->num_faces();
    dim = g->dim;
    units.resize(n * dim);
    for (size_t r = 0; r < n; ++r) g->index->Row(r, units.data() + r * dim);
    slots = g->row_slot;
    snapshot_end = g->next_slot;
  }
  const absl::Time start = absl::Now();
  // In chunks, so that a server shutting down does not wait for a whole large graph.
  constexpr size_t kChunk = 16384;
  const size_t first = std::min(kChunk, slots.size());
  absl::StatusOr<std::unique_ptr<HnswIndex>> built =
      HnswIndex::Build(options_.hnsw, units.data(), slots.data(), first, dim);
  for (size_t at = first; built.ok() && at < slots.size(); at += kChunk) {
    if (stopping_) return;
    const size_t count = std::min(kChunk, slots.size() - at);
    if (absl::Status s = (*built)->Add(units.data() + at * dim, slots.data() + at, count);
        !s.ok()) {
      built = s;
    }
  }
  units.clear();
  units.shrink_to_fit();
  absl::WriterMutexLock lock(&g->mu);
  g->hnsw_building = false;
  if (g->dim != dim) return;  // emptied and refilled with another model's faces meanwhile
  if (!built.ok()) {
    spdlog::error("gallery '{}': HNSW build failed, searching exactly: {}", g->name,
                  built.status().ToString());
    return;
  }
  // Faces enrolled while it was built; those removed meanwhile are skipped by slot at search.
  std::vector<float> late_units;
  std::vector<int64_t> late_slots;
  size_t dead = slots.size();
  for (size_t r = 0; r < g->num_faces(); ++r) {
    if (g->row_slot[r] < snapshot_end) {
      --dead;
      continue;
    }
    late_slots.push_back(g->row_slot[r]);
    late_units.resize(late_slots.size() * dim);
    g->index->Row(r, late_units.data() + (late_slots.size() - 1) * dim);
  }
  if (!late_slots.empty()) {
    if (absl::Status s = (*built)->Add(late_units.data(), late_slots.data(), late_slots.size());
        !s.ok()) {
      spdlog::error("gallery '{}': HNSW add failed, searching exactly: {}", g->name, s.ToString());
      return;
    }
  }
  g->hnsw = *std::move(built);
  g->hnsw_dead = dead;
  spdlog::info("gallery '{}': {} ready for {} faces in {:.1f} s", g->name, g->hnsw->Describe(),
               g->num_faces(), absl::ToDoubleSeconds(absl::Now() - start));
}

}  // namespace arcface::gallery
