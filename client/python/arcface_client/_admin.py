"""The typed result of ArcFaceClient.reload_models (arcface.v1.ModelAdmin): a plain frozen
dataclass made from the response message, no gRPC objects kept."""

from dataclasses import dataclass

from arcface.v1 import face_embedding_pb2 as pb

__all__ = ["ModelReload"]


@dataclass(frozen=True)
class ModelReload:
    """One model's reload. ``result``: ``"RELOADED"`` (the new file's weights serve now),
    ``"UNCHANGED"`` (the file holds the weights serving, or demo weights) or ``"FAILED"`` (the
    previous weights keep serving; ``error`` says why)."""

    model: str
    result: str
    model_id: str  # serving now
    previous_model_id: str  # serving before
    error: str
    seconds: float  # reading, building and warming up the new version

    @property
    def failed(self):
        return self.result == "FAILED"

    @classmethod
    def from_proto(cls, m):
        return cls(m.model, pb.ModelReload.Result.Name(m.result), m.model_id, m.previous_model_id, m.error,
                   m.seconds)
