"""FastDeploy `quantization_config: {quantization: block_wise_fp8, ...}` -> our block-FP8 configs.

FastDeploy's keys (fastdeploy/model_executor/layers/quantization/block_wise_fp8.py,
BlockWiseFP8Config.from_config; .../quantization/__init__.py, parse_quant_config):
  weight_block_size  [bn, bk], default [128, 128]
  is_quantized       default true (parse_quant_config marks a checkpoint with a quantization_config
                     as quantized unless it says otherwise); false = `is_checkpoint_bf16`: a float
                     checkpoint quantized at load time (our online `block_wise_fp8`)
Pre-quantized tensors (BlockWiseFP8LinearMethod.create_weights / process_weights_after_loading):
in a torch-format checkpoint `weight` e4m3 [n, k] + `weight_scale_inv` float32 [ceil(n/bn),
ceil(k/bk)] (amax / 448 per block, a dequant multiplier): the DeepSeek layout our
Fp8CheckpointConfig reads. A Paddle-format checkpoint (formats.checkpoint_model_format) stores
both transposed ([k, n], [ceil(k/bk), ceil(n/bn)]) and transposes them after loading; we do not
read that orientation (a square layer would load silently transposed), so it is refused.
Activations: dynamic per token per bk channels in both.
"""
from __future__ import annotations

from typing import Any

from ascend_llm.quant.base import QuantConfig
from ascend_llm.quant.fp8 import BlockWiseFp8Config
from ascend_llm.quant.fp8_checkpoint import Fp8CheckpointConfig

DEFAULT_BLOCK = [128, 128]


def block_wise_fp8_from_checkpoint(config: dict[str, Any], packed_modules: dict[str, tuple[str, ...]],
                                   source: str, model_format: str = "torch") -> QuantConfig:
    """The config of a `quantization: block_wise_fp8` checkpoint (`model_format`: "torch" / "paddle")."""
    block = config.get("weight_block_size", DEFAULT_BLOCK)
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"{source}: weight_block_size must be two positive integers, got {block!r}")
    is_quantized = config.get("is_quantized", True)
    if not isinstance(is_quantized, bool):
        raise ValueError(f"{source}: quantization_config.is_quantized must be true or false, "
                         f"got {is_quantized!r}")
    if not is_quantized:
        return BlockWiseFp8Config((block[0], block[1]))
    if model_format == "paddle":
        raise ValueError(f"{source}: a Paddle-format block_wise_fp8 checkpoint (config.json 'dtype', "
                         f"no 'torch_dtype') stores each weight transposed, [k, n] with "
                         f"weight_scale_inv [k/{block[1]}, n/{block[0]}]; only the torch (DeepSeek) "
                         f"orientation, weight [n, k] + weight_scale_inv [n/{block[0]}, k/{block[1]}], "
                         f"is read")
    fp8 = {"activation_scheme": "dynamic", "weight_block_size": list(block),
           **{k: v for k, v in config.items() if k in ("ignored_layers", "modules_to_not_convert")}}
    return Fp8CheckpointConfig.from_config(fp8, packed_modules, source)
