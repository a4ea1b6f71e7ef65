"""ONNX export of the prefill and decode graphs (float32), for MindSpore Lite conversion on Ascend.

    python -m ascend_llm.export --model smollm2-135m-instruct --out DIR

writes DIR/prefill.onnx and DIR/decode.onnx (graph signatures in `ascend_llm.export.model`)
plus DIR/export_info.json (layer count, K/V shapes, input/output names). Then
`scripts/convert_mslite.sh DIR` turns them into MindIR files with MindSpore Lite's converter_lite.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. The torch.export-based
exporter (the default since torch 2.9) needs the `onnxscript` package, which is not a dependency;
the traced graphs here have no data-dependent control flow, so tracing captures them exactly and
dynamic sequence / past lengths come from `dynamic_axes`. Constant folding is off: it would
pre-transpose a tied LM head into a second copy of the embedding (+113 MB for SmolLM2), and
converter_lite / onnxruntime fold constants themselves.

Float models only: quantized methods (W8A8, wint8, ...) run through backend kernels (torch_npu
quant matmuls) that have no ONNX form here; MindSpore Lite quantizes on its own during conversion.
"""
from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ascend_llm.export.model import DecodeGraph, PrefillGraph
from ascend_llm.loader import iter_safetensors_weights, load_hf_config, resolve_model_path
from ascend_llm.models.llama import LlamaForCausalLM
from ascend_llm.models.registry import get_model_class
from ascend_llm.models.weight_utils import fused_shards, process_weights_after_loading
from ascend_llm.ops import build_op_set
from ascend_llm.quant.registry import get_quant_config
from ascend_llm.quant.unquantized import UnquantizedLinearMethod

logger = logging.getLogger(__name__)

OPSET = 17


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What a consumer of the exported graphs needs to allocate and feed the K/V."""
    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    opset: int
    prefill_inputs: list[str]
    prefill_outputs: list[str]
    decode_inputs: list[str]
    decode_outputs: list[str]


def load_float_model(model: str, quantization: str | None = None) -> LlamaForCausalLM:
    """Build the runtime model as ModelRunner does (CPU op set, float32) and load its weights.

    Raises ValueError for a quantization method or a quantized checkpoint (float export only)
    and for architectures outside the Llama family.
    """
    if quantization is not None:
        raise ValueError(f"quantization: ONNX export supports float models only, got {quantization!r}; "
                         "export the float checkpoint (MindSpore Lite's converter can quantize it)")
    model_dir = resolve_model_path(model)
    hf_config = load_hf_config(model_dir)
    model_cls = get_model_class(hf_config)
    if not issubclass(model_cls, LlamaForCausalLM):
        raise ValueError(f"{model_dir}/config.json: architecture {model_cls.__name__} has no export "
                         "form (Llama-family models only)")
    packed = fused_shards(model_cls.packed_modules_mapping)
    quant_config = get_quant_config(None, hf_config, model_dir, packed)
    if quant_config is not None:
        raise ValueError(f"{model_dir}: quantized checkpoint ({type(quant_config).__name__}); ONNX "
                         "export supports float checkpoints only")
    runtime_model = model_cls(hf_config, build_op_set("cpu"), None, torch.float32)
    runtime_model.load_weights((name, t.float() if t.is_floating_point() else t)
                               for name, t in iter_safetensors_weights(model_dir))
    process_weights_after_loading(runtime_model)
    return runtime_model.eval()


@contextmanager
def traceable_linears(model: nn.Module) -> Iterator[None]:
    """Within: every Linear running a oneDNN kernel or our C++ GEMV (an engine's model on CPU) runs
    F.linear on a dense copy of its weight instead, so it traces into ONNX; restored after."""
    saved = []
    for layer in model.modules():
        kernel = getattr(layer, "linear_kernel", None)
        if kernel is not None and kernel.name.startswith(("cpu.onednn", "cpu.gemv")):
            saved.append((layer, layer.weight, kernel))
            dense = layer.weight.to_dense() if layer.weight.is_mkldnn else layer.weight
            layer.weight, layer.linear_kernel = nn.Parameter(dense, requires_grad=False), None
    try:
        yield
    finally:
        for layer, weight, kernel in saved:
            layer.weight, layer.linear_kernel = weight, kernel


def _kv_names(prefix: str, num_layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def _kv_shape(model: LlamaForCausalLM, batch: int, length: int) -> tuple[int, int, int, int]:
    attn = model.model.layers[0].self_attn
    return batch, attn.num_kv_heads, length, attn.head_dim


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)     # the legacy exporter; see module doc
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=False)


def export_prefill(model: LlamaForCausalLM, path: Path) -> tuple[list[str], list[str]]:
    """Write the prefill graph to `path`; returns (input names, output names)."""
    num_layers = len(model.model.layers)
    inputs, outputs = ["input_ids", "positions"], ["logits", *_kv_names("present", num_layers)]
    seq_len = 5
    args = (torch.arange(1, seq_len + 1).reshape(1, seq_len), torch.arange(seq_len).reshape(1, seq_len))
    axes = {"input_ids": {1: "seq_len"}, "positions": {1: "seq_len"}}
    axes.update({name: {2: "seq_len"} for name in outputs[1:]})
    _export(PrefillGraph(model), args, path, inputs, outputs, axes)
    return inputs, outputs


def export_decode(model: LlamaForCausalLM, path: Path) -> tuple[list[str], list[str]]:
    """Write the decode graph to `path`; returns (input names, output names)."""
    num_layers = len(model.model.layers)
    inputs = ["input_ids", "positions", "past_lens", *_kv_names("past", num_layers)]
    outputs = ["logits", *_kv_names("present", num_layers)]
    batch, past_len = 2, 4
    past = tuple(torch.randn(_kv_shape(model, batch, past_len)) for _ in range(2 * num_layers))
    args = (torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 1), past_len),
            torch.full((batch,), past_len), *past)
    axes = {"input_ids": {0: "batch"}, "positions": {0: "batch"}, "past_lens": {0: "batch"},
            "logits": {0: "batch"}}
    axes.update({name: {0: "batch", 2: "past_len"} for name in inputs[3:]})
    axes.update({name: {0: "batch", 2: "present_len"} for name in outputs[1:]})
    _export(DecodeGraph(model), args, path, inputs, outputs, axes)
    return inputs, outputs


def check_exportable(model: nn.Module) -> None:
    """ValueError unless `model` is a float32, unquantized Llama-family model."""
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"{type(model).__name__} has no export form (Llama-family models only)")
    float_or_none = (UnquantizedLinearMethod, type(None))
    methods = sorted({type(m.quant_method).__name__ for m in model.modules()
                      if not isinstance(getattr(m, "quant_method", None), float_or_none)})
    if methods:
        raise ValueError(f"quantized layers ({', '.join(methods)}); ONNX export supports float models only")
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if dtypes:
        raise ValueError(f"model parameters are {dtypes}; ONNX export takes float32 models only "
                         "(load with dtype float32)")


def export_onnx(model: LlamaForCausalLM, out_dir: str | Path, name: str = "model") -> ExportInfo:
    """Export prefill.onnx and decode.onnx (+ export_info.json) of `model` into `out_dir`;
    ValueError for a model `check_exportable` rejects."""
    check_exportable(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with traceable_linears(model):
        prefill_io = export_prefill(model, out / "prefill.onnx")
        decode_io = export_decode(model, out / "decode.onnx")
    _, kv_heads, _, head_dim = _kv_shape(model, 1, 1)
    info = ExportInfo(name, len(model.model.layers), kv_heads, head_dim, model.config.vocab_size,
                      OPSET, *prefill_io, *decode_io)
    (out / "export_info.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    logger.info("exported %s to %s (prefill.onnx, decode.onnx)", name, out)
    return info


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ascend_llm.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory, .gguf file or alias")
    parser.add_argument("--out", required=True, help="output directory for the ONNX files")
    parser.add_argument("--quantization", "-q", default=None,
                        help="rejected: only float models export (MindSpore Lite quantizes on conversion)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the written files, returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    try:
        model = load_float_model(args.model, args.quantization)
        info = export_onnx(model, args.out, args.model)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    for name in ("prefill.onnx", "decode.onnx", "export_info.json"):
        print(Path(args.out) / name)
    print(f"layers={info.num_layers} kv_heads={info.num_kv_heads} head_dim={info.head_dim} "
          f"opset={info.opset}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
