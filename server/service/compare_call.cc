#include "server/service/compare_call.h"

#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/service/admission.h"
#include "server/service/cosine.h"
#include "server/service/embedding_model.h"
#include "server/service/probe_units.h"

namespace arcface::service {

using arcface::v1::CompareRequest;
using arcface::v1::CompareResponse;
using arcface::v1::Probe;

namespace {

// Below this many multiply-adds a Compare matrix is computed on whichever thread has the
// embeddings (even the batch thread: ~1 ms); above it, on the preprocessing pool.
constexpr int64_t kInlineCompareMacs = int64_t{1} << 22;
// One step of a Compare matrix: about this many multiply-adds (~10 ms).
constexpr int64_t kMatrixStepMacs = int64_t{1} << 24;

struct CompareWork {
  int rows = 0;
  int cols = 0;
  int dim = 0;                    // the model's embedding_dim
  std::vector<float> queries;     // rows × dim unit vectors
  std::vector<float> references;  // cols × dim unit vectors
  // Face probes in embedding order: (is_query, index).
  std::vector<std::pair<bool, int>> faces;
};

using CompareState = CallState<CompareRequest, CompareResponse>;

const char* ProbeLabel(bool is_query) { return is_query ? "query" : "reference"; }

void FillCompare(const std::vector<float>& sims, const CompareRequest& request,
                 CompareResponse* response) {
  response->mutable_similarities()->Assign(sims.begin(), sims.end());
  if (request.has_threshold()) {
    const float threshold = request.threshold();
    auto* matches = response->mutable_matches();
    matches->Reserve(static_cast<int>(sims.size()));
    for (float s : sims) matches->Add(s >= threshold);
  }
}

// What a matrix job costs the pool: the memory of its answer, in units of ArcFace's crop (the
// pool's unit, whatever the model's crop).
int64_t MatrixCost(const CompareWork& work, const CompareRequest& request) {
  const uint64_t bytes = CompareReplyBytes(work.rows, work.cols, request.has_threshold(), 0);
  return static_cast<int64_t>((bytes + model::kCropBytes - 1) / model::kCropBytes);
}

// A pool job computing the matrix a block of rows per step; it stops when the call is dead.
WorkQueue::Job MatrixJob(std::shared_ptr<CompareState> state, std::shared_ptr<CompareWork> work,
                         ServiceMetrics* metrics) {
  return [state = std::move(state), work = std::move(work), metrics,
          blocks = std::optional<CosineBlocks>()]() mutable -> bool {
    absl::Status alive = CheckAlive(state->is_cancelled, state->deadline, metrics);
    if (!alive.ok()) {
      state->Complete(alive);
      return false;
    }
    if (!blocks) blocks.emplace(work->queries, work->references, work->rows, work->cols, work->dim);
    if (blocks->ComputeSome(kMatrixStepMacs)) return true;
    FillCompare(std::move(*blocks).Take(), *state->request, state->response);
    state->Complete(absl::OkStatus());
    return false;
  };
}

}  // namespace

uint64_t CompareReplyBytes(int rows, int cols, bool with_matches, size_t model_id_bytes) {
  const uint64_t cells = uint64_t(rows) * uint64_t(cols);
  // Per field at most: a tag (1 byte) and a length or value varint (10).
  constexpr uint64_t kFieldOverhead = 11;
  return cells * (sizeof(float) + (with_matches ? 1 : 0)) + 5 * kFieldOverhead + model_id_bytes;
}

void StartCompare(const CallEnv& env, const CompareRequest* request, CompareResponse* response,
                  CallContext call, DoneFn done) {
  const ServiceOptions& options = *env.options;
  absl::StatusOr<ModelRef> found = env.admission->models().Find(request->model());
  if (!found.ok()) return done(found.status());
  // Held until the crops are handed to this version's embedder (served_models.h).
  ModelRef model = *std::move(found);
  const ServedModel& m = *model;
  response->set_model_id(m.model_id());
  auto work = std::make_shared<CompareWork>();
  work->dim = m.dim();
  work->rows = request->queries_size();
  work->cols = request->references_size();
  response->set_rows(work->rows);
  response->set_cols(work->cols);
  if (work->rows > options.max_compare_rows || work->cols > options.max_compare_cols) {
    env.metrics->RecordRejected("compare_too_large");
    return done(absl::ResourceExhaustedError(absl::StrCat(
        "compare matrix of ", work->rows, " queries x ", work->cols,
        " references is over the limit of ", options.max_compare_rows, " x ",
        options.max_compare_cols, " (--max-compare-rows, --max-compare-cols)")));
  }
  const uint64_t reply_bytes =
      CompareReplyBytes(work->rows, work->cols, request->has_threshold(), m.model_id().size());
  if (reply_bytes > options.max_message_bytes) {
    env.metrics->RecordRejected("compare_too_large");
    return done(absl::ResourceExhaustedError(absl::StrCat(
        "compare reply of ", work->rows, " queries x ", work->cols, " references",
        request->has_threshold() ? " (similarities and matches)" : "", " would take up to ",
        reply_bytes, " bytes, over the message cap of ", options.max_message_bytes,
        " bytes (--max-message-bytes); split the references over several calls")));
  }
  if (request->has_threshold() && !std::isfinite(request->threshold())) {
    return done(absl::InvalidArgumentError("threshold is not finite"));
  }
  work->queries.resize(size_t(work->rows) * work->dim);
  work->references.resize(size_t(work->cols) * work->dim);
  for (bool is_query : {true, false}) {
    std::vector<int> faces;
    absl::Status s = CollectProbes(is_query ? request->queries() : request->references(),
                                   ProbeLabel(is_query), work->dim, m.model_id(),
                                   (is_query ? work->queries : work->references).data(), &faces);
    if (!s.ok()) return done(s);
    for (int i : faces) work->faces.push_back({is_query, i});
  }
  const int num_faces = static_cast<int>(work->faces.size());
  if (num_faces > options.max_faces_per_request) {
    env.metrics->RecordRejected("too_many_faces", num_faces);
    return done(absl::ResourceExhaustedError(
        absl::StrCat("too many face probes: ", num_faces, " in one request, the limit is ",
                     options.max_faces_per_request, " (--max-faces-per-request)")));
  }
  const bool small = int64_t{work->rows} * work->cols * work->dim <= kInlineCompareMacs;
  if (num_faces == 0 && small) {
    FillCompare(CosineMatrix(work->queries, work->references, work->rows, work->cols, work->dim),
                *request, response);
    return done(absl::OkStatus());
  }

  auto state = std::make_shared<CompareState>(
      CompareState{request, response, std::move(call.is_cancelled), call.deadline,
                   std::move(done)});
  absl::Status queued;
  if (num_faces == 0) {
    queued = env.preprocess->Submit(MatrixJob(state, work, env.metrics),
                                    MatrixCost(*work, *request));
  } else {
    queued = env.preprocess->Submit(
        PreprocessJob(
            state, num_faces, options.image_limits, m.geometry(), env.metrics,
            [request, work](int k) -> const arcface::v1::Face& {
              const auto& [is_query, index] = work->faces[k];
              return (is_query ? request->queries(index) : request->references(index)).face();
            },
            [work](int k) {
              const auto& [is_query, index] = work->faces[k];
              return absl::StrCat(ProbeLabel(is_query), " ", index);
            },
            [env, state, work, num_faces, small, model](std::vector<uint8_t> crops) {
              absl::Status scheduled = model->embedder->Submit(
                  std::move(crops), state->deadline, state->is_cancelled,
                  [env, state, work, num_faces, small](absl::StatusOr<EmbeddingBatch> rows) {
                    if (!rows.ok()) return state->Complete(rows.status());
                    for (int k = 0; k < num_faces; ++k) {
                      const auto& [is_query, index] = work->faces[k];
                      float* unit = (is_query ? work->queries : work->references).data() +
                                    size_t(index) * work->dim;
                      if (!ToUnit(rows->values.data() + size_t(k) * work->dim, work->dim, unit)) {
                        return state->Complete(absl::InvalidArgumentError(absl::StrCat(
                            ProbeLabel(is_query), " ", index,
                            ": the face's embedding has zero norm (cosine is undefined)")));
                      }
                    }
                    env.metrics->AddFaces(num_faces);
                    if (small) {  // ~1 ms: here, on the batch thread
                      FillCompare(CosineMatrix(work->queries, work->references, work->rows,
                                               work->cols, work->dim),
                                  *state->request, state->response);
                      return state->Complete(absl::OkStatus());
                    }
                    // The matrix itself on the pool, so the batch thread only feeds the model; as a
                    // later stage of a call already admitted, it is never refused for room (these
                    // calls are bounded by the batcher's queue, which they came through).
                    absl::Status continued = env.preprocess->Continue(
                        MatrixJob(state, work, env.metrics), MatrixCost(*work, *state->request));
                    if (!continued.ok()) state->Complete(continued);
                  });
              if (!scheduled.ok()) state->Complete(scheduled);
            }),
        /*cost=*/num_faces);
  }
  CompleteIfRefused(std::move(queued), num_faces, env.metrics, *state);
}

}  // namespace arcface::service
