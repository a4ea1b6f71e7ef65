"""write_uncalibrated_w8a8_checkpoint (bench_cuda.py's W8A8 rows): the same tensors as the calibrated
writer for a given activation range, and a checkpoint the engine detects and runs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ascend_llm import LLM, SamplingParams
from tests.quant.w8a8_writer import w8a8_static_tensors, write_uncalibrated_w8a8_checkpoint


@pytest.mark.parametrize("quant_type", ["W8A8", "W8A8_DYNAMIC"])
def test_checkpoint_loads_and_generates(tiny_llama_dir, tmp_path, quant_type):
    out = write_uncalibrated_w8a8_checkpoint(tiny_llama_dir, tmp_path / "q", quant_type, x_range=(-3.0, 5.0))
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == quant_type
    assert description["model.layers.0.mlp.down_proj.weight"] == quant_type
    assert description["lm_head.weight"] == "FLOAT" and description["model.embed_tokens.weight"] == "FLOAT"
    tensors = load_file(str(out / "quant_model_weights.safetensors"))
    float_weight = load_file(str(next(tiny_llama_dir.glob("*.safetensors"))))["model.layers.1.self_attn.o_proj.weight"]
    assert tensors["model.layers.1.self_attn.o_proj.weight"].dtype == torch.int8
    if quant_type == "W8A8":
        want = w8a8_static_tensors(float_weight, None, -3.0, 5.0, deq_as_int64=True)
        for name, value in want.items():
            assert torch.equal(tensors[f"model.layers.1.self_attn.o_proj.{name}"], value), name
    llm = LLM(str(out), quantization="ascend", max_model_len=64)
    got = llm.generate(prompt_token_ids=[[5, 17, 42, 9]], sampling_params=SamplingParams(max_tokens=6, temperature=0.0,
                                                                                       ignore_eos=True),
                       use_tqdm=False)
    assert len(got[0].outputs[0].token_ids) == 6

