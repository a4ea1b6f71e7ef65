"""`python -m calib.convert` / `ascend-llm convert`: one checkpoint, re-written for another runtime.

    python -m calib.convert --from compressed-tensors --to ascendv1 SRC DST
    python -m calib.convert --from ascendv1 --to compressed-tensors SRC DST
    python -m calib.convert --from fastdeploy|autofp8 --to ascendv1|compressed-tensors SRC DST

Reading produces a format-neutral `NeutralCheckpoint` (float tensors by name + one `QuantLinear`
per quantized Linear: int8 / int4 / e4m3 codes, per-channel weight scale, activation scheme);
writing lays it out as the target format. What each source scheme becomes (the report JSON lists
it per layer; "lossless" = the same codes and scales):

| source scheme                                   | ascendV1 (vllm-ascend, MindIE) | compressed-tensors (vLLM) |
|-------------------------------------------------|--------------------------------|---------------------------|
| int8 channel/tensor W, dynamic per-token int8 A | W8A8_DYNAMIC, lossless          | int-quantized, lossless   |
| int8 W, static per-tensor int8 A (zero point)   | W8A8, float bias rounded into `quant_bias` (<= deq_scale / 2 per channel) | int-quantized static, lossless (bias = deq_scale * (quant_bias + offset * row sum)) |
| int8 channel weight-only (W8A16, FastDeploy wint8) | W8A16, lossless              | pack-quantized 8-bit channel, lossless |
| int4 channel weight-only (FastDeploy wint4, compressed-tensors 4-bit channel) | refused (no per-channel W4A16 reader) | pack-quantized 4-bit channel, lossless |
| fp8 channel W, dynamic per-token fp8 A          | W8A8FP8_DYNAMIC, lossless       | float-quantized, lossless |
| fp8 per-tensor W, static per-tensor A (AutoFP8, compressed-tensors FP8) | W8A8FP8_DYNAMIC: weights kept, activations become dynamic per token (vllm-ascend has no static FP8) | float-quantized static, lossless |
| fp8 per-tensor W, dynamic A (AutoFP8 dynamic)   | W8A8FP8_DYNAMIC, activations per token instead of per tensor | float-quantized, the same change |

A rotated checkpoint (`python -m calib --rotation hadamard`: our ascendV1 key `online_hadamard`,
the weights already rotated) converts both ways to compressed-tensors' `transform_config` in
llm-compressor's SpinQuant R4 form (an online "hadamard" input transform, head_dim = block size,
on the same Linears; `transform_config.py`); other transforms are refused naming the scheme.

Refused, naming the layer and the reason: group-wise weight-only (this runtime's ascendV1 reader
has no group scales yet), asymmetric weights, KV-cache quantization (C8 int8 and fp8 KV scales
have no counterpart in the other format), block-wise FP8, anti-outlier norm biases toward
compressed-tensors, quantized MoE experts.
All tensors are read into memory (CPU); the output directory follows the calib conventions
(refuses a non-empty directory without --overwrite, written to a temporary sibling and moved
into place, `convert_report.json`).
"""
