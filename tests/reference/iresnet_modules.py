"""nn.Module forms of IResNet, used for ONNX export and as cross-checks of arcface_ref.forward.

- FusedIResNet: the py-feat / InsightFace-ONNX fused form; parameter names are exactly the
  checkpoint keys of docs/MODEL.md, so `load_state_dict` takes a fused checkpoint.
- InsightFaceIResNet: insightface's recognition/arcface_torch/backbones/iresnet.py structure
  (unfused: convs without bias followed by BatchNorm), eval-mode only use here.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

WIDTHS = (64, 128, 256, 512)


# ---------------------------------------------------------------------------------------------
# Fused form
# ---------------------------------------------------------------------------------------------

class FusedBlock(nn.Module):
    def __init__(self, cin: int, c: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, c, 3, 1, 1, bias=True)
        self.prelu = nn.PReLU(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=True)
        self.downsample = nn.Conv2d(cin, c, 1, stride, 0, bias=True) if stride != 1 else None

    def forward(self, x):
        out = self.conv2(self.prelu(self.conv1(self.bn1(x))))
        sc = self.downsample(x) if self.downsample is not None else x
        return out + sc


class FusedIResNet(nn.Module):
    def __init__(self, layers: Sequence[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=True)
        self.prelu = nn.PReLU(64)
        cin = 64
        for s, n in enumerate(layers):
            c = WIDTHS[s]
            blocks = []
            for i in range(n):
                blocks.append(FusedBlock(cin, c, 2 if i == 0 else 1))
                cin = c
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        return self.features(x)


def fused_module_from_weights(weights, layers: Sequence[int]) -> FusedIResNet:
    """Builds the fused module and loads a fused checkpoint (num_batches_tracked optional)."""
    m = FusedIResNet(layers)
    sd = {k: torch.as_tensor(v) for k, v in weights.items()}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KeyError(f"missing {missing}, unexpected {unexpected}")
    return m.eval()


# ---------------------------------------------------------------------------------------------
# InsightFace's unfused iresnet.py structure
# ---------------------------------------------------------------------------------------------

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return out


class InsightFaceIResNet(nn.Module):
    fc_scale = 7 * 7

    def __init__(self, layers: Sequence[int], dropout=0.0, num_features=512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride),
                                       nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(IBasicBlock(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.prelu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        x = self.features(x)
        return x
