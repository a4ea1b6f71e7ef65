"""ONNX export for MindSpore Lite (an offline path beside the runtime; nothing below imports it).

- `onnx`: `python -m ascend_llm.export --model M --out DIR` (`__main__` runs `onnx.main`) writes
  prefill.onnx, decode.onnx and export_info.json; `scripts/convert_mslite.sh DIR` converts them
  with converter_lite.
- `model`: the export form of a Llama-family model (explicit, contiguous past / present K/V).
"""
