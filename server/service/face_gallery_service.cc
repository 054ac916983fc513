#include "server/service/face_gallery_service.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/gallery/ids.h"
#include "server/service/admission.h"
#include "server/service/cosine.h"
#include "server/service/embedding_model.h"
#include "server/service/probe_units.h"
#include "server/service/served_models.h"

namespace arcface::service {

using arcface::v1::EnrollRequest;
using arcface::v1::EnrollResponse;
using arcface::v1::ForgetRequest;
using arcface::v1::ForgetResponse;
using arcface::v1::GalleryInfo;
using arcface::v1::GetGalleryInfoRequest;
using arcface::v1::IdentifyRequest;
using arcface::v1::IdentifyResponse;
using arcface::v1::ListSubjectsRequest;
using arcface::v1::ListSubjectsResponse;
using arcface::v1::Probe;
using gallery::CheckId;

namespace {

constexpr int kMaxLabels = 64;
constexpr int kDefaultPageSize = 100;
constexpr int kMaxPageSize = 1000;
constexpr int kMaxForgetFaceIds = 10000;

// A call's probes as unit vectors: embedding probes at once, face probes from the model.
struct ProbeWork {
  std::vector<float> units;  // one row of the probes' dim per probe
  std::vector<int> faces;    // the face probes' indices
};

absl::Status CheckLabels(const google::protobuf::Map<std::string, std::string>& labels) {
  if (labels.size() > kMaxLabels) {
    return absl::InvalidArgumentError(
        absl::StrCat("labels: ", labels.size(), " labels, the limit is ", kMaxLabels));
  }
  for (const auto& [key, value] : labels) {
    if (absl::Status s = CheckId("labels key", key); !s.ok()) return s;
    if (value.empty()) continue;
    if (absl::Status s = CheckId(absl::StrCat("labels['", key, "']"), value); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// Which served model embeds a gallery call's faces, and which model its embedding probes come
// from: one call never mixes two.
struct ProbeModel {
  ModelRef embeds;                      // null only when the call has no face probes
  std::string model_id;                 // of every probe
  int dim = 0;                          // the probes' embedding size
};

// A gallery's binding: its model_id (empty: a new or unknown gallery) and embedding size.
struct Bound {
  std::string model_id;
  int dim = 0;
};

Bound BoundModel(const gallery::Galleries* galleries, const std::string& gallery) {
  absl::StatusOr<gallery::GalleryStats> stats = galleries->Stats(gallery);
  if (!stats.ok()) return {};
  return {stats->model_id, stats->dim};
}

// `name`: the request's served model (empty: the gallery's own, else the default); `requested`:
// the request's model_id for its embeddings (empty: the embedding model's).
absl::StatusOr<ProbeModel> ResolveProbeModel(
    const ServedModels& models, const std::string& name, const std::string& requested,
    const Bound& gallery, const google::protobuf::RepeatedPtrField<Probe>& probes, bool has_faces) {
  const std::string& bound = gallery.model_id;
  ProbeModel out;
  if (!name.empty()) {
    absl::StatusOr<ModelRef> found = models.Find(name);
    if (!found.ok()) return found.status();
    out.embeds = *std::move(found);
    if (!bound.empty() && out.embeds->model_id() != bound) {
      return absl::FailedPreconditionError(absl::StrCat("the gallery is bound to model ", bound,
                                                        " but model '", name, "' computes ",
                                                        out.embeds->model_id()));
    }
  } else {
    out.embeds = bound.empty() ? models.default_model() : models.ByModelId(bound);
  }
  const std::string embedding_id =
      out.embeds != nullptr ? out.embeds->model_id() : models.default_model()->model_id();
  out.model_id = embedding_id;
  if (!requested.empty() && requested != embedding_id) {
    if (absl::Status s = CheckId("model_id", requested); !s.ok()) return s;
    if (has_faces) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model_id is ", requested, " but this server embeds faces with model ", embedding_id,
          "; send faces and embeddings of another model in separate calls"));
    }
    out.model_id = requested;
  }
  if (has_faces && out.embeds == nullptr) {
    std::string served;
    for (const ModelRef& m : models.all()) {
      absl::StrAppend(&served, served.empty() ? "" : ", ", m->model_id(), " ('", m->name(), "')");
    }
    return absl::FailedPreconditionError(
        absl::StrCat("the gallery is bound to model ", bound,
                     ", which this server does not serve (it embeds faces with ", served,
                     "); send embeddings of that model instead of faces"));
  }
  if (ModelRef m = models.ByModelId(out.model_id); m != nullptr) {
    out.dim = m->dim();
  } else if (out.model_id == bound) {
    out.dim = gallery.dim;
  } else {
    // Embeddings of a model this server does not serve, for a new gallery (or one bound to
    // another model, which the gallery refuses): their own size, which CollectProbes checks
    // they agree on.
    for (const Probe& p : probes) {
      if (p.has_embedding()) {
        out.dim = p.embedding().values_size();
        break;
      }
    }
  }
  return out;
}

// Identify's threshold when the request gives none: the verification threshold of the served
// model that computed the probes; for embeddings of a model not served here, its family's, told
// by the model_id's prefix (model::Checkpoint::ModelId: "arcface-r100@...", "dlib-resnet@...");
// none for a model of another family, whose scale this server cannot know.
std::optional<float> DefaultThreshold(const ServedModels& models, const std::string& model_id) {
  if (const auto served = models.ByModelId(model_id); served != nullptr) {
    return served->description.default_threshold;
  }
  if (absl::StartsWith(model_id, "arcface-")) return ModelDescription().default_threshold;
  if (absl::StartsWith(model_id, "dlib-")) return kDlibCosineThreshold;
  return std::nullopt;
}

bool HasFaces(const google::protobuf::RepeatedPtrField<Probe>& probes) {
  return std::any_of(probes.begin(), probes.end(),
                     [](const Probe& p) { return p.probe_case() == Probe::kFace; });
}

// Embeds the face probes listed in work->faces (through the preprocessing pool and the batcher)
// into their rows of work->units, then runs `then` (on the batch thread, or here when there are
// no faces; it must not block). Failures complete the call.
template <typename State>
void EmbedFaces(const CallEnv& env, std::shared_ptr<State> state,
                const google::protobuf::RepeatedPtrField<Probe>* probes,
                std::shared_ptr<ProbeWork> work, ModelRef model, const char* label,
                absl::AnyInvocable<void()> then) {
  const int num_faces = static_cast<int>(work->faces.size());
  if (num_faces == 0) return then();
  absl::Status queued = env.preprocess->Submit(
      PreprocessJob(
          state, num_faces, env.options->image_limits, model->geometry(), env.metrics,
          [probes, work](int k) -> const arcface::v1::Face& {
            return (*probes)[work->faces[k]].face();
          },
          [work, label](int k) { return absl::StrCat(label, " ", work->faces[k]); },
          [env, state, work, model, label, num_faces,
           then = std::move(then)](std::vector<uint8_t> crops) mutable {
            absl::Status scheduled = model->embedder->Submit(
                std::move(crops), state->deadline, state->is_cancelled,
                [env, state, work, label, num_faces, dim = model->dim(),
                 then = std::move(then)](absl::StatusOr<EmbeddingBatch> rows) mutable {
                  if (!rows.ok()) return state->Complete(rows.status());
                  for (int k = 0; k < num_faces; ++k) {
                    const int index = work->faces[k];
                    if (!ToUnit(rows->values.data() + size_t(k) * dim, dim,
                                work->units.data() + size_t(index) * dim)) {
                      return state->Complete(absl::InvalidArgumentError(
                          absl::StrCat(label, " ", index, ": the face's embedding has zero norm")));
                    }
                  }
                  env.metrics->AddFaces(num_faces);
                  then();
                });
            if (!scheduled.ok()) state->Complete(scheduled);
          }),
      /*cost=*/num_faces);
  CompleteIfRefused(std::move(queued), num_faces, env.metrics, *state);
}

// Runs `job` once on the gallery's queue; a refusal completes the call.
template <typename State>
void OnQueue(WorkQueue* queue, State& state, int64_t cost, absl::AnyInvocable<void()> job) {
  absl::Status queued = queue->Submit(
      [job = std::move(job)]() mutable {
        job();
        return false;
      },
      cost);
  if (!queued.ok()) state.Complete(std::move(queued));
}

// An upper bound on an IdentifyResponse's size: per candidate its ids, similarity and tags.
uint64_t IdentifyReplyBytes(int probes, int top_k, size_t model_id_bytes) {
  constexpr uint64_t kCandidateBytes = gallery::kMaxIdBytes + 32 + 3 * 11 + 5;
  return uint64_t(probes) * (11 + uint64_t(top_k) * kCandidateBytes) + model_id_bytes + 32;
}

}  // namespace

void FillGalleryLimits(const GalleryServiceOptions& options, const gallery::Galleries* galleries,
                       arcface::v1::GalleryLimits* out) {
  out->set_enabled(galleries != nullptr);
  out->set_store(galleries ? galleries->store_description() : "none");
  out->set_max_faces_per_enroll(options.max_faces_per_enroll);
  out->set_max_probes_per_identify(options.max_probes_per_identify);
  out->set_max_top_k(options.max_top_k);
  out->set_approximate_min_faces(options.hnsw_min_faces);
}

FaceGalleryService::FaceGalleryService(const CallEnv& env, const GalleryServiceOptions& options,
                                       WorkQueue* queue, GalleryMetrics* metrics)
    : env_(env),
      options_(options),
      queue_(queue),
      metrics_(metrics),
      search_(queue, metrics, env.metrics, options.max_top_k) {}

void FaceGalleryService::SetGalleries(gallery::Galleries* galleries) {
  galleries_.store(galleries);
  search_.SetGalleries(galleries);
}

grpc::ServerUnaryReactor* FaceGalleryService::Serve(
    grpc::CallbackServerContext* context, const char* rpc,
    absl::AnyInvocable<void(CallContext, DoneFn)> work, ModelIdOf model_id) {
  if (galleries_.load() == nullptr) {
    work = [](CallContext, DoneFn done) { done(NoGalleryError()); };
  }
  return ServeUnary(env_, context, rpc, std::move(work), std::move(model_id));
}

grpc::ServerUnaryReactor* FaceGalleryService::Enroll(grpc::CallbackServerContext* context,
                                                     const EnrollRequest* request,
                                                     EnrollResponse* response) {
  return Serve(
      context, "Enroll",
      [this, request, response](CallContext call, DoneFn done) {
        const std::string gallery_name = GalleryName(request->gallery());
        if (absl::Status s = CheckId("gallery", gallery_name); !s.ok()) return done(s);
        if (absl::Status s = CheckId("subject_id", request->subject_id()); !s.ok()) return done(s);
        if (!request->request_id().empty()) {
          if (absl::Status s = CheckId("request_id", request->request_id()); !s.ok())
            return done(s);
        }
        if (absl::Status s = CheckLabels(request->labels()); !s.ok()) return done(s);
        const int n = request->faces_size();
        if (n == 0) return done(absl::InvalidArgumentError("faces is empty: nothing to enroll"));
        if (n > options_.max_faces_per_enroll) {
          env_.metrics->RecordRejected("too_many_faces", n);
          return done(absl::ResourceExhaustedError(
              absl::StrCat("too many faces: ", n, " in one Enroll, the limit is ",
                           options_.max_faces_per_enroll, " (--gallery-max-faces-per-enroll)")));
        }
        absl::StatusOr<ProbeModel> model = ResolveProbeModel(
            env_.admission->models(), request->model(), request->model_id(),
            BoundModel(galleries(), gallery_name), request->faces(), HasFaces(request->faces()));
        if (!model.ok()) return done(model.status());
        response->set_model_id(model->model_id);
        auto work = std::make_shared<ProbeWork>();
        work->units.resize(size_t(n) * model->dim);
        if (absl::Status s = CollectProbes(request->faces(), "faces", model->dim, model->model_id,
                                           work->units.data(), &work->faces);
            !s.ok()) {
          return done(s);
        }
        using State = CallState<EnrollRequest, EnrollResponse>;
        auto state = std::make_shared<State>(
            State{request, response, std::move(call.is_cancelled), call.deadline, std::move(done)});
        EmbedFaces(env_, state, &request->faces(), work, model->embeds, "faces",
                   [this, state, work, gallery_name, model = model->model_id, n]() mutable {
                     OnQueue(queue_, *state, n, [this, state, work, gallery_name, model, n] {
                       // A call that died while its faces were embedded writes nothing.
                       absl::Status alive =
                           CheckAlive(state->is_cancelled, state->deadline, env_.metrics);
                       if (!alive.ok()) return state->Complete(alive);
                       const EnrollRequest& r = *state->request;
                       gallery::EnrollWrite write;
                       write.gallery = gallery_name;
                       write.model_id = model;
                       write.subject_id = r.subject_id();
                       write.labels.insert(r.labels().begin(), r.labels().end());
                       write.request_id = r.request_id();
                       for (int i = 0; i < n; ++i) write.face_ids.push_back(gallery::NewFaceId());
                       write.embeddings = std::move(work->units);
                       absl::StatusOr<gallery::EnrollResult> result = galleries()->Enroll(write);
                       metrics_->RecordStoreResult("enroll", result.status());
                       if (!result.ok()) return state->Complete(result.status());
                       state->response->set_subject_id(r.subject_id());
                       for (std::string& id : result->face_ids) {
                         state->response->add_face_ids(std::move(id));
                       }
                       state->response->set_gallery_version(result->version);
                       state->Complete(absl::OkStatus());
                     });
                   });
      },
      ModelIdOfResponse(response));
}

grpc::ServerUnaryReactor* FaceGalleryService::Identify(grpc::CallbackServerContext* context,
                                                       const IdentifyRequest* request,
                                                       IdentifyResponse* response) {
  return Serve(
      context, "Identify",
      [this, request, response](CallContext call, DoneFn done) {
        const std::string gallery_name = GalleryName(request->gallery());
        if (absl::Status s = CheckId("gallery", gallery_name); !s.ok()) return done(s);
        const int n = request->probes_size();
        if (n == 0) return done(absl::InvalidArgumentError("probes is empty: nothing to identify"));
        if (n > options_.max_probes_per_identify) {
          env_.metrics->RecordRejected("too_many_faces", n);
          return done(absl::ResourceExhaustedError(
              absl::StrCat("too many probes: ", n, " in one Identify, the limit is ",
                           options_.max_probes_per_identify, " (--gallery-max-probes)")));
        }
        absl::StatusOr<int> checked_top_k = search_.TopK(request->top_k());
        if (!checked_top_k.ok()) return done(checked_top_k.status());
        const int top_k = *checked_top_k;
        if (request->has_threshold() && !std::isfinite(request->threshold())) {
          return done(absl::InvalidArgumentError("threshold is not finite"));
        }
        absl::StatusOr<ProbeModel> model = ResolveProbeModel(
            env_.admission->models(), "", request->model_id(),
            BoundModel(galleries(), gallery_name), request->probes(), HasFaces(request->probes()));
        if (!model.ok()) return done(model.status());
        if (IdentifyReplyBytes(n, top_k, model->model_id.size()) >
            env_.options->max_message_bytes) {
          return done(absl::ResourceExhaustedError(absl::StrCat(
              "an Identify of ", n, " probes with top_k ", top_k,
              " could answer more than the message cap of ", env_.options->max_message_bytes,
              " bytes (--max-message-bytes); send fewer probes per call")));
        }
        auto work = std::make_shared<ProbeWork>();
        work->units.resize(size_t(n) * model->dim);
        if (absl::Status s = CollectProbes(request->probes(), "probes", model->dim, model->model_id,
                                           work->units.data(), &work->faces);
            !s.ok()) {
          return done(s);
        }
        const int num_faces = static_cast<int>(work->faces.size());
        if (num_faces > env_.options->max_faces_per_request) {
          env_.metrics->RecordRejected("too_many_faces", num_faces);
          return done(absl::ResourceExhaustedError(
              absl::StrCat("too many face probes: ", num_faces, " in one request, the limit is ",
                           env_.options->max_faces_per_request, " (--max-faces-per-request)")));
        }
        response->set_model_id(model->model_id);
        const std::optional<float> threshold =
            request->has_threshold() ? request->threshold()
                                     : DefaultThreshold(env_.admission->models(), model->model_id);
        if (threshold) response->set_threshold(*threshold);
        using State = CallState<IdentifyRequest, IdentifyResponse>;
        auto state = std::make_shared<State>(
            State{request, response, std::move(call.is_cancelled), call.deadline, std::move(done)});
        EmbedFaces(env_, state, &request->probes(), work, model->embeds, "probes",
                   [this, state, work, gallery_name, model = model->model_id, n, top_k,
                    threshold]() mutable {
                     GalleryQuery query;
                     query.gallery = gallery_name;
                     query.model_id = std::move(model);
                     query.units = std::move(work->units);
                     query.n = n;
                     query.top_k = top_k;
                     query.threshold = threshold;
                     query.deadline = state->deadline;
                     query.is_cancelled = state->is_cancelled;
                     search_.Search(
                         std::move(query), [state](absl::StatusOr<GalleryMatches> found) {
                           if (!found.ok()) return state->Complete(found.status());
                           IdentifyResponse* out = state->response;
                           out->set_gallery_version(found->version);
                           for (std::vector<gallery::Candidate>& candidates : found->results) {
                             FillIdentification(std::move(candidates), out->add_results());
                           }
                           state->Complete(absl::OkStatus());
                         });
                   });
      },
      ModelIdOfResponse(response));
}

grpc::ServerUnaryReactor* FaceGalleryService::Forget(grpc::CallbackServerContext* context,
                                                     const ForgetRequest* request,
                                                     ForgetResponse* response) {
  return Serve(context, "Forget", [this, request, response](CallContext call, DoneFn done) {
    const std::string gallery_name = GalleryName(request->gallery());
    if (absl::Status s = CheckId("gallery", gallery_name); !s.ok()) return done(s);
    if (request->subject_id().empty() && request->face_ids().empty()) {
      return done(absl::InvalidArgumentError(
          "neither subject_id nor face_ids is given: nothing to forget"));
    }
    if (!request->subject_id().empty()) {
      if (absl::Status s = CheckId("subject_id", request->subject_id()); !s.ok()) return done(s);
    }
    if (request->face_ids_size() > kMaxForgetFaceIds) {
      return done(absl::ResourceExhaustedError(
          absl::StrCat("too many face_ids: ", request->face_ids_size(),
                       " in one Forget, the limit is ", kMaxForgetFaceIds)));
    }
    for (int i = 0; i < request->face_ids_size(); ++i) {
      if (absl::Status s = CheckId(absl::StrCat("face_ids ", i), request->face_ids(i)); !s.ok()) {
        return done(s);
      }
    }
    using State = CallState<ForgetRequest, ForgetResponse>;
    auto state = std::make_shared<State>(
        State{request, response, std::move(call.is_cancelled), call.deadline, std::move(done)});
    OnQueue(queue_, *state, 1, [this, state, gallery_name] {
      absl::Status alive = CheckAlive(state->is_cancelled, state->deadline, env_.metrics);
      if (!alive.ok()) return state->Complete(alive);
      gallery::ForgetWrite write;
      write.gallery = gallery_name;
      write.subject_id = state->request->subject_id();
      write.face_ids.assign(state->request->face_ids().begin(), state->request->face_ids().end());
      absl::StatusOr<gallery::ForgetResult> result = galleries()->Forget(write);
      metrics_->RecordStoreResult("forget", result.status());
      if (!result.ok()) return state->Complete(result.status());
      state->response->set_faces_removed(result->faces_removed);
      state->response->set_gallery_version(result->version);
      state->Complete(absl::OkStatus());
    });
  });
}

grpc::ServerUnaryReactor* FaceGalleryService::ListSubjects(grpc::CallbackServerContext* context,
                                                           const ListSubjectsRequest* request,
                                                           ListSubjectsResponse* response) {
  return Serve(context, "ListSubjects", [this, request, response](CallContext, DoneFn done) {
    const std::string gallery_name = GalleryName(request->gallery());
    if (absl::Status s = CheckId("gallery", gallery_name); !s.ok()) return done(s);
    // Sizes above the largest are served as the largest (a page is never an error).
    const int page_size =
        request->page_size() == 0
            ? kDefaultPageSize
            : static_cast<int>(std::min<uint32_t>(request->page_size(), kMaxPageSize));
    std::string next;
    absl::StatusOr<std::vector<gallery::SubjectInfo>> page =
        galleries()->ListSubjects(gallery_name, page_size, request->page_token(), &next);
    if (!page.ok()) return done(page.status());
    for (gallery::SubjectInfo& s : *page) {
      auto* subject = response->add_subjects();
      subject->set_subject_id(std::move(s.subject_id));
      subject->set_num_faces(s.num_faces);
      subject->mutable_labels()->insert(s.labels.begin(), s.labels.end());
    }
    response->set_next_page_token(std::move(next));
    done(absl::OkStatus());
  });
}

grpc::ServerUnaryReactor* FaceGalleryService::GetGalleryInfo(grpc::CallbackServerContext* context,
                                                             const GetGalleryInfoRequest* request,
                                                             GalleryInfo* response) {
  return Serve(context, "GetGalleryInfo", [this, request, response](CallContext, DoneFn done) {
    const std::string gallery_name = GalleryName(request->gallery());
    if (absl::Status s = CheckId("gallery", gallery_name); !s.ok()) return done(s);
    absl::StatusOr<gallery::GalleryStats> stats = galleries()->Stats(gallery_name);
    if (!stats.ok()) return done(stats.status());
    response->set_gallery(stats->gallery);
    response->set_model_id(stats->model_id);
    response->set_num_subjects(stats->num_subjects);
    response->set_num_faces(stats->num_faces);
    response->set_version(stats->version);
    response->set_store(galleries()->store_description());
    response->set_index(stats->index);
    FillGalleryLimits(options_, galleries_.load(), response->mutable_limits());
    done(absl::OkStatus());
  });
}

}  // namespace arcface::service
