#include "server/service/embed_call.h"

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/service/admission.h"
#include "server/service/cosine.h"
#include "server/service/embedding_model.h"

namespace arcface::service {

using arcface::v1::EmbedRequest;
using arcface::v1::EmbedResponse;

namespace {

void FillEmbeddings(const EmbeddingBatch& rows, int dim, bool normalize, EmbedResponse* response) {
  const int n = rows.size;
  response->mutable_embeddings()->Reserve(n);
  for (int i = 0; i < n; ++i) {
    FillEmbedding(rows.values.data() + size_t(i) * dim, dim, rows.norms[i], normalize,
                  response->add_embeddings());
  }
}

}  // namespace

// The norms are the model's own (EmbeddingModel's contract), reported and divided by as they are.
void FillEmbedding(const float* row, int dim, float norm, bool normalize,
                   arcface::v1::Embedding* e) {
  e->set_norm(norm);
  auto* out = e->mutable_values();
  out->Resize(dim, 0.0f);
  float* dst = out->mutable_data();
  if (normalize && norm > 0) {
    const double n = norm;
    for (int j = 0; j < dim; ++j) dst[j] = static_cast<float>(row[j] / n);
  } else {
    std::copy(row, row + dim, dst);
  }
}

void StartEmbed(const CallEnv& env, const EmbedRequest* request, EmbedResponse* response,
                CallContext call, DoneFn done) {
  response->set_request_id(request->request_id());
  absl::StatusOr<ModelRef> found = env.admission->models().Find(request->model());
  if (!found.ok()) return done(found.status());
  // Held until the crops are handed to this version's embedder (served_models.h).
  ModelRef model = *std::move(found);
  const ServedModel& m = *model;
  response->set_model_id(m.model_id());
  const int n = request->faces_size();
  if (n > env.options->max_faces_per_request) {
    env.metrics->RecordRejected("too_many_faces", n);
    done(absl::ResourceExhaustedError(
        absl::StrCat("too many faces: ", n, " in one request, the limit is ",
                     env.options->max_faces_per_request, " (--max-faces-per-request)")));
    return;
  }
  if (n == 0) {
    done(absl::OkStatus());
    return;
  }
  using State = CallState<EmbedRequest, EmbedResponse>;
  auto state = std::make_shared<State>(
      State{request, response, std::move(call.is_cancelled), call.deadline, std::move(done)});

  absl::Status queued = env.preprocess->Submit(
      PreprocessJob(
          state, n, env.options->image_limits, m.geometry(), env.metrics,
          [request](int i) -> const arcface::v1::Face& { return request->faces(i); },
          [](int i) { return absl::StrCat("face ", i); },
          [env, state, n, model](std::vector<uint8_t> crops) {
            const bool normalize = state->request->normalize();
            absl::Status scheduled =
                model->embedder->Submit(std::move(crops), state->deadline, state->is_cancelled,
                                        [env, state, normalize, n,
                                         dim = model->dim()](absl::StatusOr<EmbeddingBatch> rows) {
                                          if (!rows.ok()) return state->Complete(rows.status());
                                          FillEmbeddings(*rows, dim, normalize, state->response);
                                          env.metrics->AddFaces(n);
                                          state->Complete(absl::OkStatus());
                                        });
            if (!scheduled.ok()) state->Complete(scheduled);
          }),
      /*cost=*/n);
  CompleteIfRefused(std::move(queued), n, env.metrics, *state);
}

}  // namespace arcface::service
