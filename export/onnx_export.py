"""Trained run -> one ONNX graph: uint8 images [N, 3, S, S] -> packed codes [N, ceil(k/8)] (+ u).

Exported with torch's dynamo exporter (`torch.onnx.export(dynamo=True)`, needs onnxscript) and a
dynamic batch dimension; H and W are fixed, because the efficientnet SAME padding and the
attention network's size checks are computed from the traced shape in Python.

Nodes outside the two convolutional networks (cast and scale, min-max, the saliency multiply,
the sign and the packing) are renamed with the prefix `FP32_PREFIX`; the TensorRT builder keeps
every layer so named in fp32 when it builds an fp16/bf16 engine. The exporter records each node's
module scope, which is how they are found.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

import onnx
import torch

from dsah_rt.atomic import atomic_write
from dsah_rt.errors import UserError
from dsah_rt.export.fused import CODES_NAME, INPUT_NAME, U_NAME, FusedEncoder
from dsah_rt.runners.base import ModelInfo

OPSET = 20
FP32_PREFIX = "fp32/"
# Largest batch the traced graph promises to handle; only a bound for torch.export's shape checks.
MAX_TRACE_BATCH = 65536
PROTOBUF_LIMIT = 2**31 - 1
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _network_scopes(model: torch.nn.Module) -> tuple[str, ...]:
    """Module paths (inside FusedEncoder) of the networks that may run in fp16/bf16: those the
    model's training method names, each required to exist (a misnamed one would pin it to fp32)."""
    from dsah_rt.train.methods import get_method

    names = get_method(model.config()["method"]).precision_scopes
    missing = [name for name in names if not isinstance(getattr(model, name, None), torch.nn.Module)]
    if missing:
        raise UserError(f"the {model.config()['method']} model has no submodule {missing[0]!r} to run in reduced precision")
    return tuple(f"model.{name}" for name in names)


def mark_fp32_nodes(proto: onnx.ModelProto, network_scopes: tuple[str, ...]) -> int:
    """Prefix the names of nodes outside `network_scopes` with FP32_PREFIX; return how many."""
    marked = 0
    seen_scopes = False
    for node in proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(props[_SCOPES_KEY]) if _SCOPES_KEY in props else []
        seen_scopes |= bool(scopes)
        in_network = any(s == n or s.startswith(n + ".") for s in scopes for n in network_scopes)
        if not in_network and not node.name.startswith(FP32_PREFIX):
            node.name = FP32_PREFIX + (node.name or node.output[0])
            marked += 1
    if not seen_scopes:
        raise UserError("the ONNX exporter recorded no module scopes; cannot tell the fp32 layers apart")
    return marked


def export_onnx(
    model: torch.nn.Module,
    config: dict[str, Any],
    fingerprint: str,
    out: str | os.PathLike[str],
    with_u: bool = False,
) -> ModelInfo:
    """Trace FusedEncoder(model) and write `out` (single file), with dsah-rt metadata; return it.

    No verification here: `dsah_rt.export.verify` compares the file against PyTorch.
    """
    out = Path(out)
    fused = FusedEncoder(model, config, with_u=with_u).eval()
    info = ModelInfo.from_config(config, fingerprint, with_u)
    s = fused.input_size
    # Batch 2, not 1: torch.export specialises a dimension traced at size 1.
    sample = torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=MAX_TRACE_BATCH)
    outputs = [CODES_NAME, U_NAME] if with_u else [CODES_NAME]
    try:
        program = torch.onnx.export(
            fused, (sample,), None, dynamo=True, external_data=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=outputs, dynamic_shapes={INPUT_NAME: {0: batch}},
            optimize=True, verbose=False,
        )  # fmt: skip
    except Exception as exc:  # the exporter's errors are many types; all mean "could not export"
        raise UserError(f"ONNX export failed: {' '.join(str(exc).split())[:400]}") from exc
    proto = program.model_proto
    mark_fp32_nodes(proto, _network_scopes(fused.model))
    proto.producer_name = "dsah-rt"
    proto.producer_version = info.version
    del proto.metadata_props[:]
    for key, value in info.to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    if proto.ByteSize() > PROTOBUF_LIMIT:  # pragma: no cover - DSaH on VGG-16, the largest, is ~1.1 GB
        raise UserError(f"{out}: the model is {proto.ByteSize() / 2**30:.1f} GiB, over ONNX's 2 GiB single-file limit")
    atomic_write(out, lambda fh: fh.write(proto.SerializeToString()))
    return info
