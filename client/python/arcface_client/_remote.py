"""RemoteArcFace: py-feat's ArcFace module, served by the ArcFace service."""

import numpy as np

from ._client import DEFAULT_TIMEOUT, ArcFaceClient

__all__ = ["RemoteArcFace"]


class RemoteArcFace:
    """A drop-in for py-feat's ``ArcFace`` torch module that runs the network in the service.

    In py-feat code, replace the model with one line::

        model = RemoteArcFace("arcface.internal:50051")   # was: ArcFace(...) + weights
        emb = model(faces)          # faces: float tensor [N, 3, H, W], RGB in [0, 1]
                                    # emb:   float32 tensor [N, 512], raw (not normalized)

    What a call does:

    1. ``x`` (a float tensor [N, 3, H, W] or one image [3, H, W], RGB, values in [0, 1], on
       any device) is detached, moved to the CPU and turned into 8-bit pixels with
       ``round(x * 255).clamp(0, 255)`` — exact for tensors that came from uint8 images
       (``u8 / 255``); other inputs are quantized to the nearest of 256 levels, which changes
       the embedding very little (cosine ≈ 0.9999 or better).
    2. Each image goes to the server as a ``RawImage`` in RGB8, HWC order, tightly packed (no
       JPEG, nothing lossy), through ``ArcFaceClient.embed`` (split into requests of at most
       the server's ``max_faces_per_request``).
    3. The server treats each whole image as the crop: a 112x112 input is used as is; any other
       size is resized to 112x112 bilinearly with half-pixel centres and no antialiasing, as
       py-feat's ``F.interpolate(..., mode="bilinear", align_corners=False)`` does; then
       ``(x - 0.5) / 0.5`` and the IResNet forward, as in py-feat.
    4. The raw 512-d embeddings come back as a float32 tensor on the input's device. There
       is no autograd graph through the service (``requires_grad`` is False).

    ``target``, ``timeout``, ``credentials``, ``options``, ``max_faces_per_request`` are those
    of ``ArcFaceClient``; or pass an existing ``client``. The module-like methods (``eval``,
    ``train``, ``to``, ``cpu``, ``cuda``, ``requires_grad_``) exist so py-feat code that calls
    them keeps working; they change nothing here. ``torch`` is imported only by this class.
    """

    def __init__(self, target=None, timeout=DEFAULT_TIMEOUT, credentials=None, options=(),
                 max_faces_per_request=None, client=None):
        import torch  # noqa: F401  (fail early, with a clear ImportError, if torch is missing)

        if client is None:
            if target is None:
                raise ValueError("RemoteArcFace needs a target (host:port) or a client")
            client = ArcFaceClient(target, timeout=timeout, credentials=credentials,
                                   options=options, max_faces_per_request=max_faces_per_request)
            self._owns_client = True
        else:
            self._owns_client = False
        self.client = client
        self.training = False

    @staticmethod
    def to_uint8_images(x):
        """The conversion of step 1: a float tensor [N, 3, H, W] in [0, 1] → a uint8 numpy
        array [N, H, W, 3] (RGB, HWC)."""
        import torch

        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a tensor [N, 3, H, W] (RGB), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a float tensor in [0, 1], got {x.dtype}")
        with torch.no_grad():
            u8 = (x.detach().to("cpu", torch.float32) * 255.0).round().clamp(0, 255)
            u8 = u8.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return u8.numpy()

    def forward(self, x):
        """[N, 3, H, W] float RGB in [0, 1] → [N, 512] float32 raw embeddings (see the class
        docstring for the conversion)."""
        import torch

        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        pixels = self.to_uint8_images(x)
        emb = self.client.embed(list(pixels)) if len(pixels) else np.zeros((0, 512), np.float32)
        return torch.from_numpy(np.ascontiguousarray(emb, np.float32)).to(device)

    __call__ = forward

    # -- torch.nn.Module look-alikes (no parameters live here) --------------------------------

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def to(self, *args, **kwargs):
        return self

    def cpu(self):
        return self

    def cuda(self, *args, **kwargs):
        return self

    def requires_grad_(self, requires_grad=True):
        return self

    def parameters(self, recurse=True):
        return iter(())

    def model_info(self):
        return self.client.model_info()

    def close(self):
        if self._owns_client:
            self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return f"RemoteArcFace(target={self.client.target!r})"
