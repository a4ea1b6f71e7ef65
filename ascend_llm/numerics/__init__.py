"""Leaf package of pure tensor math shared by the ops and the quantization methods: quantize /
dequantize primitives (int8 / int4 per channel, int4 packing, fp8 per tensor / block / token
group, block-scale expansion), group-wise int weight dequantization and the WINT2 decoder.
Tensors in, tensors out: no nn.Module, no state, and no import from the rest of ascend_llm."""
