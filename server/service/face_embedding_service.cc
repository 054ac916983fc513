#include "server/service/face_embedding_service.h"

#include <utility>

#include "server/service/compare_call.h"
#include "server/service/detect_stream.h"
#include "server/service/embed_call.h"
#include "server/service/embed_stream.h"

namespace arcface::service {

using arcface::v1::CompareRequest;
using arcface::v1::CompareResponse;
using arcface::v1::EmbedRequest;
using arcface::v1::EmbedResponse;

FaceEmbeddingService::FaceEmbeddingService(const ServiceOptions& options,
                                           ServiceMetrics* metrics, WorkQueue* preprocess)
    : options_(options),
      admission_(metrics),
      env_{&options_, metrics, preprocess, &admission_, &stream_bytes_held_, &detection_} {}

FaceEmbeddingService::~FaceEmbeddingService() = default;

void FaceEmbeddingService::SetReady(std::vector<ServedModel> models) {
  admission_.SetReady(std::move(models));
}

void FaceEmbeddingService::BeginDrain() { admission_.BeginDrain(); }

bool FaceEmbeddingService::WaitForIdle(absl::Time deadline) {
  return admission_.WaitForIdle(deadline);
}

void FaceEmbeddingService::WaitForQuiet(absl::Duration quiet, absl::Time deadline) {
  admission_.WaitForQuiet(quiet, deadline);
}

int FaceEmbeddingService::inflight() const { return admission_.inflight(); }

grpc::ServerUnaryReactor* FaceEmbeddingService::Embed(grpc::CallbackServerContext* context,
                                                      const EmbedRequest* request,
                                                      EmbedResponse* response) {
  return ServeUnary(
      env_, context, "Embed",
      [this, request, response](CallContext call, DoneFn done) {
        if (absl::Status id = CheckRequestId(request->request_id()); !id.ok())
          return done(std::move(id));
        StartEmbed(env_, request, response, std::move(call), std::move(done));
      },
      ModelIdOfResponse(response));
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* FaceEmbeddingService::EmbedStream(
    grpc::CallbackServerContext* context) {
  return OpenEmbedStream(env_, context);
}

grpc::ServerUnaryReactor* FaceEmbeddingService::Compare(grpc::CallbackServerContext* context,
                                                        const CompareRequest* request,
                                                        CompareResponse* response) {
  return ServeUnary(
      env_, context, "Compare",
      [this, request, response](CallContext call, DoneFn done) {
        StartCompare(env_, request, response, std::move(call), std::move(done));
      },
      ModelIdOfResponse(response));
}

grpc::ServerUnaryReactor* FaceEmbeddingService::GetModelInfo(
    grpc::CallbackServerContext* context, const arcface::v1::GetModelInfoRequest* request,
    arcface::v1::ModelInfo* response) {
  return ServeUnary(
      env_, context, "GetModelInfo",
      [this, request, response](CallContext, DoneFn done) {
        absl::StatusOr<ModelRef> found = admission_.models().Find(request->model());
        if (!found.ok()) return done(found.status());
        FillModelInfo(**found, response);
        done(absl::OkStatus());
      },
      ModelIdOfResponse(response));
}

grpc::ServerUnaryReactor* FaceEmbeddingService::ListModels(
    grpc::CallbackServerContext* context, const arcface::v1::ListModelsRequest* request,
    arcface::v1::ListModelsResponse* response) {
  return ServeUnary(env_, context, "ListModels", [this, response](CallContext, DoneFn done) {
    for (const ModelRef& m : admission_.models().all()) FillModelInfo(*m, response->add_models());
    done(absl::OkStatus());
  });
}

void FaceEmbeddingService::FillModelInfo(const ServedModel& served, arcface::v1::ModelInfo* info) {
  const ModelDescription& model = served.description;
  info->set_name(model.name);
  info->set_family(model.family);
  info->set_metric(model.metric);
  info->set_default_threshold(model.default_threshold);
  info->set_is_default(served.name() == admission_.models().default_model()->name());
  info->set_arch(model.arch);
  info->set_embedding_dim(static_cast<uint32_t>(served.dim()));
  info->set_input_size(static_cast<uint32_t>(served.geometry().size));
  info->set_weights_sha256(model.weights_sha256);
  info->set_model_id(model.model_id);
  info->set_device(model.device);
  info->set_precision(model.precision);
  info->set_demo_weights(model.demo_weights);
  info->set_server_version(options_.server_version);
  const auto& batching = served.embedder->batcher().options();
  info->mutable_batching()->set_max_batch_size(batching.max_batch_size);
  info->mutable_batching()->set_max_queue_delay_us(
      static_cast<uint64_t>(absl::ToInt64Microseconds(batching.max_queue_delay)));
  info->mutable_batching()->set_max_queue_size(batching.max_queue_size);
  info->mutable_batching()->set_max_batches_in_flight(batching.max_batches_in_flight);
  info->set_max_faces_per_request(options_.max_faces_per_request);
  info->set_max_message_bytes(options_.max_message_bytes);
  *info->mutable_gallery() = gallery_limits_;
  FillDetectorInfo(info->mutable_detector());
  if (model.device_memory) {
    const engine::DeviceMemory memory = model.device_memory();
    info->set_device_memory_allocated_bytes(static_cast<uint64_t>(memory.allocated_bytes));
    info->set_device_memory_reserved_bytes(static_cast<uint64_t>(memory.reserved_bytes));
  }
}

grpc::ServerUnaryReactor* FaceEmbeddingService::Detect(grpc::CallbackServerContext* context,
                                                       const arcface::v1::DetectRequest* request,
                                                       arcface::v1::DetectResponse* response) {
  return ServeUnary(
      env_, context, "Detect",
      [this, request, response](CallContext call, DoneFn done) {
        StartDetect(env_, request, response, std::move(call), std::move(done));
      },
      ModelIdOfResponse(response));
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* FaceEmbeddingService::DetectStream(
    grpc::CallbackServerContext* context) {
  return OpenDetectStream(env_, context);
}

void FaceEmbeddingService::FillDetectorInfo(arcface::v1::DetectorInfo* info) {
  FrameDetector* detector = detection_.detector;
  info->set_enabled(detector != nullptr);
  if (detector == nullptr) return;
  const DetectorDescription& d = detector->description();
  info->set_detector_id(d.detector_id);
  info->set_detector(d.detector);
  info->set_landmarks(d.landmarks);
  info->set_weights_sha256(d.weights_sha256);
  info->set_input_size(static_cast<uint32_t>(d.input_size));
  info->set_default_min_score(d.default_min_score);
  info->set_max_faces_per_frame(static_cast<uint32_t>(d.max_faces_per_frame));
  info->set_device(d.device);
  const auto& batching = detector->batcher().options();
  info->mutable_batching()->set_max_batch_size(batching.max_batch_size);
  info->mutable_batching()->set_max_queue_delay_us(
      static_cast<uint64_t>(absl::ToInt64Microseconds(batching.max_queue_delay)));
  info->mutable_batching()->set_max_queue_size(batching.max_queue_size);
  info->mutable_batching()->set_max_batches_in_flight(batching.max_batches_in_flight);
}

}  // namespace arcface::service
