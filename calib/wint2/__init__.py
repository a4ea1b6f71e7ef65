"""Offline WINT2 tools: the encoder (encode.py), the checkpoint writer (`python -m calib.wint2.writer`:
plain or GPTQ with act-order, code_scale search and refinement), and distillation tuning of a
written checkpoint (`python -m calib.wint2.tune`). The runtime side (decoder, QuantMethod) is
ascend_llm/numerics/wint2.py and ascend_llm/quant/wint2.py."""
