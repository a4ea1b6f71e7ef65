"""Layer-sequential GPTQ inputs (calib/sequential.py): the decoder layers called directly on the
captured layer-0 inputs reproduce the model, the float Hessians match the one-pass ones, and a
layer quantized on the way changes what the later layers see."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from calib.model_spec import find_groups
from calib.sequential import capture_layer_inputs, quantize_sequentially
from calib.weight_only import decoder_hessians, hessian_hook

VOCAB = 384          # tests/tiny_models.py VOCAB_SIZE
BATCHES = [torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def _model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ["tiny_llama_dir", "tiny_qwen2_dir"])
@torch.inference_mode()
def test_layers_on_captured_inputs_reproduce_the_model(request, name):
    model = _model(request.getfixturevalue(name))
    for ids, (hidden, kwargs) in zip(BATCHES, capture_layer_inputs(model, BATCHES)):
        assert torch.equal(hidden, model.model.embed_tokens(ids))
        for layer in model.model.layers:
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        expected = model.model(input_ids=ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(model.model.norm(hidden), expected, rtol=1e-5, atol=1e-5)


def test_float_hessians_match_one_pass_and_quantized_layers_change_later_inputs(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    groups = find_groups(model)
    one_pass = decoder_hessians(model, groups, BATCHES, progress=False, token_cap=None)

    seen: dict[str, torch.Tensor] = {}

    def keep(layer_groups, store):                       # no quantization: float inputs throughout
        seen.update(store)
    quantize_sequentially(model, groups, BATCHES, lambda g, store: hessian_hook(g, store, None), keep, progress=False)
    assert seen.keys() == one_pass.keys()
    for key in one_pass:
        torch.testing.assert_close(seen[key], one_pass[key], rtol=1e-6, atol=1e-6)

    seen.clear()
    modules = dict(model.named_modules())

    def coarsen_layer0(layer_groups, store):             # a crude "quantization" of layer 0 only
        seen.update(store)
        for group in layer_groups:
            if group.layer_index == 0:
                for name in group.names:
                    weight = modules[name].weight
                    weight.copy_(torch.round(weight * 4) / 4)
    quantize_sequentially(model, groups, BATCHES, lambda g, store: hessian_hook(g, store, None), coarsen_layer0,
                          progress=False)
    layer0 = [g.key for g in groups if g.layer_index == 0]
    for key in one_pass:
        if key in layer0:
            torch.testing.assert_close(seen[key], one_pass[key], rtol=1e-6, atol=1e-6)
        elif key.startswith("model.layers.1."):
            assert not torch.allclose(seen[key], one_pass[key], rtol=1e-3, atol=1e-3), key
