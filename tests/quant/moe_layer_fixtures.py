"""One FusedMoE layer per expert format, loaded from per-expert checkpoint tensors made from the
same float experts, plus an independent per-token reference of what each format computes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ascend_llm.layers.moe import FusedMoE
from ascend_llm.layers.moe_routing import RoutingConfig
from ascend_llm.numerics import primitives as P
from ascend_llm.numerics.wint2 import dequantize_wint2
from ascend_llm.ops import build_op_set
from ascend_llm.ops.cpu_int8 import dynamic_quant_per_token_reference
from ascend_llm.quant.fp8 import BlockWiseFp8Config
from ascend_llm.quant.fp8_checkpoint import Fp8CheckpointConfig
from ascend_llm.quant.w8a8 import AscendW8A8Config
from ascend_llm.quant.weight_only import WeightOnlyCheckpointConfig, WInt4Config, WInt8Config
from ascend_llm.quant.wint2 import WInt2Config
from calib.wint2.encode import encode_wint2
from tests.quant.moe_checkpoints import W4W2_CONFIG
from tests.quant.w8a8_writer import w8a8_dynamic_tensors

FORMATS = ("float", "wint8", "wint4", "prequant_wint8", "prequant_wint4", "wint2", "w8a8_dynamic",
           "block_fp8", "block_fp8_checkpoint")
BLOCK = (16, 16)
W2_LAYER = 8                      # in the w2 range of the FastDeploy config (7..53)


@dataclass
class Experts:
    """Float experts: gate / up [E, I, H], down [E, H, I]."""
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def random(cls, num_experts: int, hidden: int, inter: int, seed: int = 0) -> "Experts":
        gen = torch.Generator().manual_seed(seed)
        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) * 0.1
        return cls(rnd(num_experts, inter, hidden), rnd(num_experts, inter, hidden), rnd(num_experts, hidden, inter))


def _fmt_tensors(fmt: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one [n, k] expert projection in format `fmt`."""
    if fmt in ("float", "wint8", "wint4", "block_fp8"):
        return {"weight": w}                                   # online formats load float
    if fmt in ("prequant_wint8", "prequant_wint4"):
        q, scale = P.quantize_per_channel(w, 8 if fmt.endswith("8") else 4)
        return {"weight": P.pack_int4(q) if fmt.endswith("4") else q, "weight_scale": scale}
    if fmt == "w8a8_dynamic":
        return w8a8_dynamic_tensors(w)
    if fmt == "block_fp8_checkpoint":
        q, scale_inv = P.quantize_fp8_block(w, BLOCK)
        return {"weight": q, "weight_scale_inv": scale_inv}
    raise ValueError(fmt)


def checkpoint_tensors(fmt: str, experts: Experts, prefix: str) -> dict[str, torch.Tensor]:
    """{checkpoint name: tensor} of every expert (WINT2: FastDeploy's fused up_gate_proj)."""
    out: dict[str, torch.Tensor] = {}
    for e in range(experts.gate.shape[0]):
        if fmt == "wint2":
            fused = encode_wint2(torch.cat([experts.gate[e], experts.up[e]]))
            out.update(fused.as_dict(f"{prefix}.{e}.up_gate_proj."))
            out.update(encode_wint2(experts.down[e]).as_dict(f"{prefix}.{e}.down_proj."))
            continue
        for proj, w in (("gate_proj", experts.gate[e]), ("up_proj", experts.up[e]), ("down_proj", experts.down[e])):
            out.update({f"{prefix}.{e}.{proj}.{k}": v for k, v in _fmt_tensors(fmt, w).items()})
    return out


def quant_config(fmt: str, prefix: str, num_experts: int):
    """The QuantConfig a checkpoint / `--quantization` of format `fmt` resolves to."""
    if fmt == "float":
        return None
    if fmt in ("wint8", "wint4"):
        return WInt8Config() if fmt == "wint8" else WInt4Config()
    if fmt.startswith("prequant_"):
        return WeightOnlyCheckpointConfig(8 if fmt.endswith("8") else 4)
    if fmt == "wint2":
        return WInt2Config.from_config({**W4W2_CONFIG, "is_permuted": False})     # row-major experts
    if fmt == "w8a8_dynamic":
        description = {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0}
        for e in range(num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                description[f"{prefix}.{e}.{proj}.weight"] = "W8A8_DYNAMIC"
        return AscendW8A8Config(description)
    if fmt == "block_fp8":
        return BlockWiseFp8Config(BLOCK)
    if fmt == "block_fp8_checkpoint":
        return Fp8CheckpointConfig.from_config({"quant_method": "fp8", "activation_scheme": "dynamic",
                                                "weight_block_size": list(BLOCK)})
    raise ValueError(fmt)


def build_layer(fmt: str, experts: Experts, top_k: int = 2, tp_rank: int = 0, tp_size: int = 1,
                layer_idx: int = W2_LAYER) -> FusedMoE:
    """A loaded, post-processed FusedMoE layer of format `fmt` (CPU ops)."""
    num_experts, inter, hidden = experts.gate.shape
    prefix = f"model.layers.{layer_idx}.mlp.experts"
    layer = FusedMoE(num_experts, hidden, inter, RoutingConfig(top_k, renormalize=True), torch.float32,
                     quant_config(fmt, prefix, num_experts), prefix, build_op_set("cpu"), tp_rank, tp_size)
    for name, tensor in checkpoint_tensors(fmt, experts, prefix).items():
        layer.load_checkpoint_tensor(name, tensor)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


# ---------------------------------------------------------------- the independent reference

def _dequant(fmt: str, w: torch.Tensor) -> torch.Tensor:
    """What format `fmt` stores for the float [n, k] weight w, as fp32 [n, k]."""
    if fmt == "float":
        return w
    if fmt in ("wint8", "wint4", "prequant_wint8", "prequant_wint4"):
        q, scale = P.quantize_per_channel(w, 8 if fmt.endswith("8") else 4)
        return P.dequantize_per_channel(q, scale)
    if fmt == "w8a8_dynamic":
        t = w8a8_dynamic_tensors(w)
        return t["weight"].float() * t["weight_scale"].float()
    if fmt in ("block_fp8", "block_fp8_checkpoint"):
        return P.dequantize_fp8_block(*P.quantize_fp8_block(w, BLOCK), BLOCK)
    raise ValueError(fmt)


def _act(fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation fake-quantization of format `fmt` ([m, k] -> [m, k])."""
    if fmt == "w8a8_dynamic":
        def int8(x: torch.Tensor) -> torch.Tensor:
            q, s = dynamic_quant_per_token_reference(x)
            return q.float() * s[:, None]
        return int8
    if fmt.startswith("block_fp8"):
        return lambda x: P.dequantize_fp8_per_token_group(*P.quantize_fp8_per_token_group(x, BLOCK[1]), BLOCK[1])
    return lambda x: x


def reference_moe(fmt: str, experts: Experts, x: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """Token by token: sum_j w_j * down_e(silu(gate_e(x)) * up_e(x)) with format-`fmt` weights."""
    act = _act(fmt)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w_j, e in zip(topk_weights[t].tolist(), topk_ids[t].tolist()):
            if fmt == "wint2":
                w13 = dequantize_wint2(*encode_wint2(torch.cat([experts.gate[e], experts.up[e]])).as_dict().values())
                w2 = dequantize_wint2(*encode_wint2(experts.down[e]).as_dict().values())
            else:
                w13 = torch.cat([_dequant(fmt, experts.gate[e]), _dequant(fmt, experts.up[e])])
                w2 = _dequant(fmt, experts.down[e])
            h = act(x[t:t + 1]) @ w13.t()
            gate, up = h.chunk(2, dim=-1)
            out[t] += w_j * (act(F.silu(gate) * up) @ w2.t())[0]
    return out
