#!/usr/bin/env python3
"""Exports an InsightFace-style (unfused) IResNet with random weights to ONNX, as InsightFace
exported w600k_r50.onnx, plus the BN-folded weights computed here in the fused safetensors
layout of docs/MODEL.md. The C++ test OnnxLoad.RealTorchExportMatchesFoldedWeights loads both and
compares them, which checks the loader's positional mapping of conv/PReLU initializers against
a real torch.onnx export.

Usage (needs torch; on Debian: /usr/bin/python3):
  export_iresnet_onnx.py 1,1,1,1 /tmp/iresnet      # writes /tmp/iresnet.onnx, .safetensors
  ARCFACE_TEST_TORCH_EXPORT=/tmp/iresnet build/tests/model/checkpoint_test
"""
import json
import struct
import sys

import torch
from torch import nn

EPS = 1e-5


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):  # insightface recognition/arcface_torch/backbones/iresnet.py
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=EPS)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=EPS)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.downsample is not None:
            identity = self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=EPS)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=EPS)
        self.dropout = nn.Dropout(p=0, inplace=True)
        self.fc = nn.Linear(512 * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512, eps=EPS)

    def _make_layer(self, planes, blocks):
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False),
                                   nn.BatchNorm2d(planes, eps=EPS))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def fold(conv, bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


def fused_state(m, blocks):
    out = {}
    out["conv1.weight"], out["conv1.bias"] = fold(m.conv1, m.bn1)
    out["prelu.weight"] = m.prelu.weight
    for s in range(4):
        for i, blk in enumerate(getattr(m, f"layer{s + 1}")):
            p = f"layer{s + 1}.{i}."
            for k in ("weight", "bias", "running_mean", "running_var"):
                out[p + "bn1." + k] = getattr(blk.bn1, k)
            out[p + "conv1.weight"], out[p + "conv1.bias"] = fold(blk.conv1, blk.bn2)
            out[p + "prelu.weight"] = blk.prelu.weight
            out[p + "conv2.weight"], out[p + "conv2.bias"] = fold(blk.conv2, blk.bn3)
            if blk.downsample is not None:
                w, b = fold(blk.downsample[0], blk.downsample[1])
                out[p + "downsample.weight"], out[p + "downsample.bias"] = w, b
    for name in ("bn2", "features"):
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{k}"] = getattr(getattr(m, name), k)
    out["fc.weight"], out["fc.bias"] = m.fc.weight, m.fc.bias
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main():
    blocks = [int(b) for b in sys.argv[1].split(",")]
    prefix = sys.argv[2]
    torch.manual_seed(0)
    m = IResNet(blocks)
    with torch.no_grad():  # non-trivial statistics, so a mis-mapped tensor shows
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
            elif isinstance(mod, nn.PReLU):
                mod.weight.uniform_(0.1, 0.3)
    m.eval()
    torch.onnx.export(m, torch.randn(1, 3, 112, 112), prefix + ".onnx", opset_version=11,
                      do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL,
                      input_names=["input.1"], output_names=["embedding"])
    with torch.no_grad():
        write_safetensors(prefix + ".safetensors", fused_state(m, blocks))
    print("wrote", prefix + ".onnx", prefix + ".safetensors")


if __name__ == "__main__":
    main()
