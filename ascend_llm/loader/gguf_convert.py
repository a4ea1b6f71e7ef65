"""Converting a llama GGUF file into an HF-style directory (config, float32 safetensors, tokenizer)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import gguf
from tqdm import tqdm
from transformers import GenerationConfig

from ascend_llm.loader.gguf_llama_config import llama_config_from_gguf
from ascend_llm.loader.gguf_metadata import open_gguf
from ascend_llm.loader.gguf_tensors import TensorPlan, iter_hf_tensors, plan_tensors
from ascend_llm.loader.gguf_tokenizer import save_gguf_tokenizer
from ascend_llm.loader.safetensors_writer import write_f32_safetensors

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as pretty-printed UTF-8 JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_generation_config(config: dict[str, Any], out_dir: Path) -> None:
    """generation_config.json carrying the bos/eos/pad ids."""
    ids = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
    GenerationConfig(**ids).save_pretrained(str(out_dir))


def _write_weights(plans: list[TensorPlan], out_dir: Path, source: Path) -> None:
    """Dequantize every tensor into ``model.safetensors`` with a progress bar, one tensor in memory."""
    shapes = [(plan.hf_name, plan.hf_shape) for plan in plans]
    stream = tqdm(iter_hf_tensors(plans), total=len(plans), unit="tensor",
                  desc=f"Converting {source.name}", leave=False)
    write_f32_safetensors(out_dir / WEIGHTS_FILE, shapes, stream,
                          metadata={"format": "pt", "source": source.name})


def _check_plans(plans: list[TensorPlan], config: dict[str, Any]) -> None:
    """Fail early if the tensors do not match the layer count the header declares."""
    layers = {int(p.hf_name.split(".")[2]) for p in plans if p.hf_name.startswith("model.layers.")}
    if layers != set(range(config["num_hidden_layers"])):
        raise ValueError(f"GGUF declares {config['num_hidden_layers']} layers but has tensors for "
                         f"{len(layers)} layer indices")


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama-architecture GGUF file into an HF directory loadable by ``LlamaForCausalLM``.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32, q/k rows
    un-permuted back to HF's rotary layout) and ``tokenizer.json``/``tokenizer_config.json`` (with the
    GGUF's chat template) into ``out_dir`` (created if needed). Returns ``out_dir``.
    Raises ValueError for unreadable or unsupported GGUF files.
    """
    source, target = Path(gguf_path), Path(out_dir)
    start = time.perf_counter()
    reader: gguf.GGUFReader = open_gguf(source)
    config = llama_config_from_gguf(reader)
    plans = plan_tensors(reader, config["num_attention_heads"], config["num_key_value_heads"])
    _check_plans(plans, config)
    target.mkdir(parents=True, exist_ok=True)
    _write_json(target / "config.json", config)
    _write_generation_config(config, target)
    save_gguf_tokenizer(reader, source, target, config["max_position_embeddings"])
    _write_weights(plans, target, source)
    logger.info("converted %s (%d tensors) to %s in %.1fs", source, len(plans), target,
                time.perf_counter() - start)
    return target
