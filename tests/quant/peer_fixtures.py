"""Every golden checkpoint written by a peer tool (tests/fixtures/peer_checkpoints/<tool>/<case>/:
msModelSlim 26.1.0, llm-compressor 0.14, and the FastDeploy layouts our script writes from
FastDeploy's and Paddle's code), built on any backend's op set, for the tests that load
each one on every backend (tests/quant/test_peer_fixtures_npu.py, tests/ops/triton/
test_peer_fixtures_cuda.py). The per-tool tests (test_peer_msmodelslim.py,
test_peer_compressed_tensors.py) compare the CPU backend with the tools' own logits."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ascend_llm.engine.kv_cache import KVCacheSpec, allocate_kv_caches, kv_cache_storage_dtype
from ascend_llm.layers.attention import Attention
from ascend_llm.layers.kv_scales import bind_kv_cache_scales
from ascend_llm.loader import iter_safetensors_weights, load_hf_config
from ascend_llm.models.forward_batch import ForwardBatch
from ascend_llm.models.hadamard_layers import check_online_hadamard_layers
from ascend_llm.models.registry import get_model_class
from ascend_llm.models.weight_utils import process_weights_after_loading
from ascend_llm.ops import AttentionMetadata, build_op_set
from ascend_llm.ops.registry import OpSet
from ascend_llm.quant.registry import get_quant_config

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "peer_checkpoints"
TOOLS = ("msmodelslim", "llmcompressor", "fastdeploy")   # every checkpoint fixture runs on every backend
CASES = sorted(f"{tool}/{case.name}" for tool in TOOLS for case in (ROOT / tool).iterdir()
               if (case / "MANIFEST.json").is_file() and (case / "config.json").is_file())
BLOCK_SIZE = 4


def copy_fixture(fixture_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of a fixture directory under tmp_path (its files may be read-only)."""
    dst = tmp_path / fixture_dir.name
    shutil.copytree(fixture_dir, dst)
    for f in dst.rglob("*"):
        f.chmod(0o644 if f.is_file() else 0o755)
    return dst


def input_ids(case: str) -> torch.Tensor:
    """The fixture's reference input ids [B, T] (every tool's fixtures store them)."""
    model_dir = ROOT / case
    path = model_dir / "reference.safetensors"
    if not path.is_file():
        path = model_dir / "reference" / "logits.safetensors"
    return load_file(str(path))["input_ids"]


def build(case: str, ops: OpSet, dtype: torch.dtype, device: torch.device = torch.device("cpu"),
          kv_cache_dtype: str = "auto") -> tuple[object, nn.Module]:
    """`build_dir` of the fixture `case` ("<tool>/<name>")."""
    return build_dir(ROOT / case, ops, dtype, device, kv_cache_dtype)


def build_dir(model_dir: Path, ops: OpSet | None = None, dtype: torch.dtype = torch.float32,
              device: torch.device = torch.device("cpu"), kv_cache_dtype: str = "auto") -> tuple[object, nn.Module]:
    """(hf config, model) as the engine loads it: the format detected from the checkpoint, weights
    loaded, moved to `device`, then processed (kernels selected and prepared on `ops`, the CPU op
    set by default); with a quantized `kv_cache_dtype` the attention layers get the checkpoint's
    KV scales and cache kernels, as the model runner binds them."""
    ops = build_op_set("cpu") if ops is None else ops
    config = load_hf_config(model_dir)
    quant_config = get_quant_config(None, config, model_dir)
    model = get_model_class(config)(config, ops, quant_config, dtype)
    check_online_hadamard_layers(model, quant_config)
    model.load_weights(iter_safetensors_weights(model_dir))
    model.to(device)
    process_weights_after_loading(model)
    if kv_cache_dtype != "auto":
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        bind_kv_cache_scales(layers, kv_cache_dtype, False, None, device)
    return config, model.eval()


@torch.inference_mode()
def prefill_logits(model: nn.Module, config: object, token_ids: list[int], dtype: torch.dtype,
                   device: torch.device = torch.device("cpu"), kv_cache_dtype: str = "auto") -> torch.Tensor:
    """One prefill of `token_ids` -> float32 logits [T, vocab] on the CPU (the cache in the
    model's dtype, or int8 / fp8 for a quantized `kv_cache_dtype` bound by `build`)."""
    n = len(token_ids)
    num_blocks = -(-n // BLOCK_SIZE) + 1
    spec = KVCacheSpec.from_hf_config(config, BLOCK_SIZE, kv_cache_storage_dtype(kv_cache_dtype, dtype))
    kv = allocate_kv_caches(spec, num_blocks, device)
    table = list(range(num_blocks))
    slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n)]
    meta = AttentionMetadata.build([n], [n], [table], slots, BLOCK_SIZE, num_blocks, device)
    batch = ForwardBatch(torch.tensor(token_ids, device=device), torch.arange(n, device=device), meta, kv,
                         torch.arange(n, device=device))
    return model.compute_logits(model(batch)).float().cpu()



def batch_logits(model: nn.Module, config: object, input_ids: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T, vocab]: each row of `input_ids` [B, T] as its own prefill (the tools' forwards are
    causal per row, without padding)."""
    return torch.stack([prefill_logits(model, config, row, dtype) for row in input_ids.tolist()])
