"""ONNX export (torch.onnx) and a tiny protobuf wire-format reader to check the exported graph
(the `onnx` package is not installed here).

Fields used (onnx.proto): ModelProto.graph = 7; GraphProto.node = 1, initializer = 5,
input = 11, output = 12; NodeProto.input = 1, op_type = 4; TensorProto.dims = 1, name = 8;
ValueInfoProto.name = 1.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, Iterator, List, Tuple

import torch


def export_onnx(model: torch.nn.Module, path: str) -> None:
    """opset 11, input 'input.1', output 'embedding', dynamic batch; eval-mode BN folding."""
    model = model.eval().to(torch.float32)
    dummy = torch.zeros(1, 3, 112, 112)
    with torch.no_grad():
        torch.onnx.export(model, dummy, path, opset_version=11, input_names=["input.1"],
                          output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
                          training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True,
                          export_params=True, verbose=False)


def _varint(buf: memoryview, i: int) -> Tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: memoryview) -> Iterator[Tuple[int, int, object]]:
    """Yields (field number, wire type, value): ints for varint/fixed, memoryview for bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        fn, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v = int.from_bytes(buf[i:i + 8], "little")
            i += 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            v = buf[i:i + ln]
            i += ln
        elif wt == 5:
            v = int.from_bytes(buf[i:i + 4], "little")
            i += 4
        else:
            raise ValueError(f"wire type {wt}")
        yield fn, wt, v


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _rewrite(buf: memoryview, edits) -> bytes:
    """Re-encodes a message, replacing length-delimited fields: edits maps field number to a
    function payload(memoryview) -> bytes; other fields are copied verbatim."""
    out = bytearray()
    i, n = 0, len(buf)
    while i < n:
        start = i
        key, i = _varint(buf, i)
        fn, wt = key >> 3, key & 7
        if wt == 0:
            _, i = _varint(buf, i)
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        elif wt == 2:
            ln, j = _varint(buf, i)
            i = j + ln
            if fn in edits:
                payload = edits[fn](buf[j:i])
                out += _enc_varint(key) + _enc_varint(len(payload)) + payload
                continue
        else:
            raise ValueError(f"wire type {wt}")
        out += buf[start:i]
    return bytes(out)


def strip_exporter_prefixes(path: str) -> int:
    """Renames torch's generated initializer names 'onnx::Conv_685' to plain numbers '685', as
    in InsightFace's files (exported by an older torch). Returns the number renamed."""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    pat = re.compile(r"^onnx::[A-Za-z]+_(\d+)$")
    renamed = set()

    def name(v):
        s = bytes(v).decode()
        m = pat.match(s)
        if m:
            renamed.add(s)
            return m.group(1).encode()
        return bytes(v)

    node = lambda v: _rewrite(v, {1: name})           # NodeProto.input
    tensor = lambda v: _rewrite(v, {8: name})         # TensorProto.name
    vinfo = lambda v: _rewrite(v, {1: name})          # ValueInfoProto.name
    graph = lambda v: _rewrite(v, {1: node, 5: tensor, 11: vinfo, 13: vinfo})
    new = _rewrite(data, {7: graph})
    with open(path, "wb") as f:
        f.write(new)
    g = read_graph(path)
    names = list(g["initializers"]) + g["node_outputs"] + g["inputs"]
    if len(set(names)) != len(names):
        raise ValueError("renaming made tensor names collide")
    return len(renamed)


def _packed_varints(v) -> List[int]:
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i)
        out.append(x)
    return out


def read_graph(path: str) -> Dict[str, object]:
    """nodes: [(op_type, [inputs])], initializers: {name: dims}, inputs, outputs (names),
    node_outputs (all node output names)."""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    graph = None
    for fn, wt, v in _fields(data):
        if fn == 7 and wt == 2:
            graph = v
    if graph is None:
        raise ValueError(f"{path}: no graph")
    nodes, inits, inputs, outputs, node_outputs = [], {}, [], [], []
    for fn, wt, v in _fields(graph):
        if fn == 1 and wt == 2:
            op, ins = "", []
            for nf, nwt, nv in _fields(v):
                if nf == 4:
                    op = bytes(nv).decode()
                elif nf == 1:
                    ins.append(bytes(nv).decode())
                elif nf == 2:
                    node_outputs.append(bytes(nv).decode())
            nodes.append((op, ins))
        elif fn == 5 and wt == 2:
            name, dims = "", []
            for tf, twt, tv in _fields(v):
                if tf == 8:
                    name = bytes(tv).decode()
                elif tf == 1:
                    dims.extend(_packed_varints(tv) if twt == 2 else [tv])
            inits[name] = dims
        elif fn in (11, 12) and wt == 2:
            name = next((bytes(x).decode() for f2, _, x in _fields(v) if f2 == 1), "")
            (inputs if fn == 11 else outputs).append(name)
    inputs = [n for n in inputs if n not in inits]  # older exporters list initializers too
    return {"nodes": nodes, "initializers": inits, "inputs": inputs, "outputs": outputs,
            "node_outputs": node_outputs}


def onnx_summary(path: str) -> Dict[str, object]:
    g = read_graph(path)
    counts = Counter(op for op, _ in g["nodes"])
    conv_no_bias = sum(1 for op, ins in g["nodes"] if op == "Conv" and len(ins) < 3)
    prelu_slopes = [g["initializers"].get(ins[1]) for op, ins in g["nodes"] if op == "PRelu"]
    return {"op_counts": dict(sorted(counts.items())), "conv_without_bias": conv_no_bias,
            "inputs": g["inputs"], "outputs": g["outputs"],
            "num_initializers": len(g["initializers"]),
            "prelu_slope_shapes": sorted({tuple(s) for s in prelu_slopes if s is not None})}


if __name__ == "__main__":
    import json
    import sys
    for p in sys.argv[1:]:
        print(p, json.dumps(onnx_summary(p)))
