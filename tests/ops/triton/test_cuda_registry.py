"""`ops/cuda.py`: what it registers, how kernels are selected by traits, and quantized layers
bound to the Triton kernels (interpreter, CPU tensors) matching the same layers on the CPU
backend. Layer outputs: rtol 1e-4 / atol 1e-4 (fp32 sums in another order)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from ascend_llm.layers.linear import ReplicatedLinear  # noqa: E402
from ascend_llm.ops import build_registry, cuda  # noqa: E402
from ascend_llm.ops.registry import OpRegistry, OpSet  # noqa: E402
from ascend_llm.quant.fp8 import BlockWiseFp8Config, Fp8Config  # noqa: E402
from ascend_llm.quant.weight_only import WInt4Config, WInt8Config  # noqa: E402

TRITON_OPS = ["add_rms_norm", "dynamic_quant_per_token", "fp8_matmul", "grouped_matmul", "hadamard_transform",
              "paged_attention", "quant_matmul", "quantize_per_tensor", "reshape_and_cache", "rms_norm", "rope",
              "silu_and_mul", "weight_only_group_matmul", "weight_only_matmul"]


def _cuda_ops() -> OpSet:
    """The cuda op set as ops/__init__ builds it (reference fallback included), with the Triton
    kernels registered here until "cuda" is one of its backend modules."""
    registry = build_registry(("cuda",))
    if not any(k.name.startswith("cuda.triton.") for ks in registry.kernels.values() for k in ks):
        cuda.register(registry)
    return OpSet(registry, "cuda")


def test_registers_nothing_without_a_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in cuda.runtime_available()
    registry = OpRegistry()
    cuda.register(registry)
    assert registry.kernels == {}


def test_registers_every_kernel_above_the_fallback() -> None:
    registry = OpRegistry()
    cuda.register(registry)
    assert registry.ops("cuda") == TRITON_OPS
    ops = _cuda_ops()
    for op in ("rms_norm", "add_rms_norm", "rope", "silu_and_mul", "quant_matmul",
               "quantize_per_tensor", "dynamic_quant_per_token"):
        assert ops.select(op).name == f"cuda.triton.{op}"
    assert ops.select("linear").name == "cuda.torch_reference.linear"      # cuBLAS, via F.linear


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8", "int8"])
def test_attention_kernels_by_kv_cache_dtype(kv_cache_dtype: str) -> None:
    ops = _cuda_ops()
    for op in ("reshape_and_cache", "paged_attention"):
        assert ops.select(op, kv_cache_dtype=kv_cache_dtype).name == f"cuda.triton.{op}"


def test_e5m2_cache_is_rejected_with_the_reason() -> None:
    registry = OpRegistry()
    cuda.register(registry)
    with pytest.raises(ValueError, match="fp8_e5m2"):
        registry.select("paged_attention", "cuda", kv_cache_dtype="fp8_e5m2")


def test_quantized_linear_kernels_by_traits() -> None:
    ops = _cuda_ops()
    assert ops.select("weight_only_matmul", bits=8).name == "cuda.triton.weight_only_matmul"
    assert ops.select("weight_only_matmul", bits=4).name == "cuda.triton.weight_only_matmul"
    assert ops.select("weight_only_matmul", bits=2).name == "cuda.torch_reference.weight_only_matmul"
    for scheme in ("block", "per_tensor", "per_tensor_static", "per_token"):
        assert ops.select("fp8_matmul", scheme=scheme).name == f"cuda.triton.fp8_matmul_{scheme}"


def _pair(config: object, k: int, n: int, device: torch.device) -> tuple[ReplicatedLinear, ReplicatedLinear]:
    """The same float weights loaded into a CPU-backend layer and a cuda-backend layer (on
    `device` before quantization, as the model runner does)."""
    w, b = torch.randn(n, k) * 0.1, torch.randn(n)
    layers = []
    for ops, dev in ((OpSet(build_registry(("cpu",)), "cpu"), torch.device("cpu")), (_cuda_ops(), device)):
        layer = ReplicatedLinear(k, n, bias=True, quant_config=config, prefix="mlp.down_proj", ops=ops)
        layer.weight.weight_loader(layer.weight, w.clone())
        layer.bias.weight_loader(layer.bias, b.clone())
        layer.to(dev)
        layer.quant_method.process_weights_after_loading(layer)
        layers.append(layer)
    return layers[0], layers[1]


@pytest.mark.parametrize("config,attr,name", [
    (WInt8Config(), "weight_only_kernel", "cuda.triton.weight_only_matmul"),
    (WInt4Config(), "weight_only_kernel", "cuda.triton.weight_only_matmul"),
    (BlockWiseFp8Config(), "fp8_kernel", "cuda.triton.fp8_matmul_block"),
    (Fp8Config(), "fp8_kernel", "cuda.triton.fp8_matmul_per_tensor"),
])
@pytest.mark.parametrize("num_tokens", [1, 17])
def test_quantized_layer_matches_cpu_backend(seed: int, device: torch.device, config: object, attr: str,
                                             name: str, num_tokens: int) -> None:
    cpu_layer, cuda_layer = _pair(config, 144, 40, device)
    assert getattr(cuda_layer, attr).name == name
    x = torch.randn(num_tokens, 144)
    torch.testing.assert_close(cuda_layer(x.to(device)).cpu(), cpu_layer(x), rtol=1e-4, atol=1e-4,
                               msg=lambda s: f"seed {seed}: {s}")


def test_fp8_kernels_need_sm89(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert "8.9" in cuda.supports_fp8("block")(scheme="block")
    assert "8.9" in cuda.supports_kv_cache(kv_cache_dtype="fp8")
    assert cuda.supports_kv_cache(kv_cache_dtype="int8") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert cuda.supports_fp8("block")(scheme="block") is None
