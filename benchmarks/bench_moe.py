"""MoE experts per quantization method on CPU: decode throughput of one FusedMoE layer beside the
float layer, expert weight bytes, and the output error of 4-bit / WINT2 / plain RTN 2-bit experts
on a tiny random ERNIE-4.5-MoE model.

    .venv/bin/python benchmarks/bench_moe.py [--experts 16 --hidden 512 --intermediate 256
                                              --top-k 2 --batch 1 8 --seconds 1.5]

Throughput: tokens/s of `FusedMoE.forward` (routing, dispatch, grouped SwiGLU experts, combine)
on random router logits, `batch` tokens per step, median of 3 timed windows. Weight bytes: the
layer's expert parameters after loading, and their ratio to the same experts in bf16. Error:
logits of the tiny model with only its experts quantized vs the float model (relative L2 error,
top-1 agreement, mean KL) on 96 random tokens. Prints tables; writes
benchmarks/results/moe_cpu_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ascend_llm.engine.kv_cache import KVCacheSpec, allocate_kv_caches
from ascend_llm.layers.moe import FusedMoE
from ascend_llm.layers.moe_routing import RoutingConfig
from ascend_llm.loader import iter_safetensors_weights, load_hf_config
from ascend_llm.models.forward_batch import ForwardBatch
from ascend_llm.models.registry import get_model_class
from ascend_llm.models.weight_utils import process_weights_after_loading
from ascend_llm.numerics import primitives as P
from ascend_llm.numerics.wint2 import dequantize_wint2
from ascend_llm.ops import AttentionMetadata, build_op_set
from ascend_llm.quant.fp8 import BlockWiseFp8Config
from ascend_llm.quant.w8a8 import AscendW8A8Config
from ascend_llm.quant.weight_only import WInt4Config, WInt8Config
from ascend_llm.quant.wint2 import WInt2Config
from calib.wint2.encode import encode_wint2, rtn_int2_group

logger = logging.getLogger("bench_moe")
ROOT = Path(__file__).resolve().parents[1]
METHODS = ("float", "wint8", "wint4", "wint2", "w8a8_dynamic", "block_fp8")
PROJS = ("gate_proj", "up_proj", "down_proj")
W2_CONFIG = {"quantization": "wint2", "dense_quant_type": "wint8", "moe_quant_type": "w4w2",
             "moe_quant_config": {"moe_w4_quant_config": {"quant_type": "wint4", "quant_start_layer": 0,
                                                          "quant_end_layer": 6},
                                  "moe_w2_quant_config": {"quant_type": "wint2", "quant_start_layer": 7,
                                                          "quant_end_layer": 53}}}


# ---------------------------------------------------------------- one FusedMoE layer per method

def expert_tensors(method: str, weights: dict[tuple[int, str], torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of every expert for `method` (online methods load the float weights)."""
    out: dict[str, torch.Tensor] = {}
    for (e, proj), w in weights.items():
        name = f"{prefix}.{e}.{proj}."
        if method == "wint2":
            out.update(encode_wint2(w).as_dict(name))
        elif method == "w8a8_dynamic":
            q, scale = P.quantize_per_channel(w, 8)
            out.update({name + "weight": q, name + "weight_scale": scale[:, None],
                        name + "weight_offset": torch.zeros_like(scale)[:, None]})
        else:
            out[name + "weight"] = w
    return out


def quant_config(method: str, prefix: str, num_experts: int):
    if method == "w8a8_dynamic":
        description = {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0}
        description.update({f"{prefix}.{e}.{p}.weight": "W8A8_DYNAMIC" for e in range(num_experts) for p in PROJS})
        return AscendW8A8Config(description)
    return {"float": None, "wint8": WInt8Config(), "wint4": WInt4Config(), "block_fp8": BlockWiseFp8Config(),
            "wint2": WInt2Config.from_config(W2_CONFIG)}[method]


def build_layer(method: str, weights: dict, args: argparse.Namespace) -> FusedMoE:
    prefix = "model.layers.8.mlp.experts"           # layer 8: in FastDeploy's w2 range
    layer = FusedMoE(args.experts, args.hidden, args.intermediate, RoutingConfig(args.top_k, renormalize=True),
                     torch.float32, quant_config(method, prefix, args.experts), prefix, build_op_set("cpu"))
    for name, tensor in expert_tensors(method, weights, prefix).items():
        layer.load_checkpoint_tensor(name, tensor)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def expert_bytes(layer: FusedMoE) -> int:
    return sum(p.numel() * p.element_size() for n, p in layer.named_parameters() if n.startswith(("w13_", "w2_")))


@torch.inference_mode()
def decode_rate(layer: FusedMoE, batch: int, seconds: float, hidden: int, experts: int) -> float:
    """Tokens/s of layer(x [batch, H], logits [batch, E]), median of 3 windows of `seconds` / 3."""
    gen = torch.Generator().manual_seed(batch)
    inputs = [(torch.randn(batch, hidden, generator=gen), torch.randn(batch, experts, generator=gen))
              for _ in range(16)]
    for x, logits in inputs[:3]:
        layer(x, logits)
    rates = []
    for _ in range(3):
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            x, logits = inputs[steps % len(inputs)]
            layer(x, logits)
            steps += 1
        rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def layer_table(args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"gate_proj": (args.intermediate, args.hidden), "up_proj": (args.intermediate, args.hidden),
              "down_proj": (args.hidden, args.intermediate)}
    weights = {(e, p): torch.randn(*shapes[p], generator=gen) * 0.05 for e in range(args.experts) for p in PROJS}
    bf16_bytes = sum(w.numel() for w in weights.values()) * 2
    rows, float_rates = [], {}
    for method in args.methods:
        layer = build_layer(method, weights, args)
        row = {"method": method, "expert_bytes": expert_bytes(layer),
               "bytes_vs_bf16": expert_bytes(layer) / bf16_bytes}
        for batch in args.batch:
            rate = decode_rate(layer, batch, args.seconds, args.hidden, args.experts)
            float_rates.setdefault(batch, rate)
            row[f"tok_s_b{batch}"] = rate
            row[f"vs_float_b{batch}"] = rate / float_rates[batch]
        rows.append(row)
        logger.info("%s done", method)
    return rows


# ---------------------------------------------------------------- expert-only error on a tiny model

def make_tiny_ernie(path: Path) -> Path:
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM
    torch.manual_seed(0)
    config = Ernie4_5_MoeConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                moe_intermediate_size=64, moe_k=2, moe_num_experts=16, moe_num_shared_experts=1,
                                moe_layer_start_index=1, tie_word_embeddings=True)
    model = Ernie4_5_MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
            elif "e_score_correction_bias" in name:
                p.uniform_(-0.05, 0.05)
            elif p.dim() >= 2:
                p.normal_(0, 0.06)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


def fake_quant(kind: str, w: torch.Tensor) -> torch.Tensor:
    """What `kind` experts compute with, as a float [n, k] weight."""
    if kind == "wint4":
        return P.dequantize_per_channel(*P.quantize_per_channel(w, 4))
    if kind == "wint2":
        return dequantize_wint2(*encode_wint2(w).as_dict().values())
    if kind == "rtn2_g64":
        return rtn_int2_group(w)
    raise ValueError(kind)


@torch.inference_mode()
def model_logits(model_dir: Path, tokens: list[int], expert_quant: str | None) -> torch.Tensor:
    config = load_hf_config(model_dir)
    model = get_model_class(config)(config, build_op_set("cpu"), None, torch.float32)
    weights = ((n, fake_quant(expert_quant, t) if expert_quant and ".experts." in n else t)
               for n, t in iter_safetensors_weights(model_dir))
    model.load_weights(weights)
    process_weights_after_loading(model)
    spec = KVCacheSpec.from_hf_config(config, 16, torch.float32)
    kv = allocate_kv_caches(spec, 16, torch.device("cpu"))
    n = len(tokens)
    meta = AttentionMetadata.build([n], [n], [list(range(-(-n // 16)))], list(range(n)), 16, 16, torch.device("cpu"))
    batch = ForwardBatch(torch.tensor(tokens), torch.arange(n), meta, kv, torch.arange(n))
    return model.compute_logits(model(batch))


def error_table() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_ernie(Path(tmp))
        tokens = torch.randint(3, 500, (96,), generator=torch.Generator().manual_seed(1)).tolist()
        ref = model_logits(model_dir, tokens, None)
        rows = []
        for kind in ("wint4", "wint2", "rtn2_g64"):
            got = model_logits(model_dir, tokens, kind)
            kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
            rows.append({"experts": kind, "rel_l2": float((got - ref).norm() / ref.norm()),
                         "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                         "mean_kl": float(kl)})
        return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    layers = layer_table(args)
    header = f"{'method':<14}{'bytes/bf16':>11}" + "".join(
        f"{'tok/s b' + str(b):>13}{'x float':>9}" for b in args.batch)
    lines = [f"MoE layer: E={args.experts} H={args.hidden} I={args.intermediate} top-{args.top_k}, 1 thread", header]
    for row in layers:
        lines.append(f"{row['method']:<14}{row['bytes_vs_bf16']:>11.3f}" + "".join(
            f"{row[f'tok_s_b{b}']:>13.0f}{row[f'vs_float_b{b}']:>9.2f}" for b in args.batch))
    errors = error_table()
    lines += ["", "tiny ERNIE-4.5-MoE, experts quantized only (vs float logits):",
              f"{'experts':<10}{'rel L2':>9}{'top-1':>8}{'KL':>10}"]
    lines += [f"{r['experts']:<10}{r['rel_l2']:>9.4f}{r['top1_agree']:>8.3f}{r['mean_kl']:>10.5f}" for r in errors]
    logger.info("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"moe_cpu_{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"date": dt.datetime.now().isoformat(timespec="seconds"),
                                "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                "layer": layers, "expert_only_error": errors}, indent=2))
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
