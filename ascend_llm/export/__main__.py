"""`python -m ascend_llm.export --model M --out DIR`: the ONNX export (`ascend_llm.export.onnx`)."""
from ascend_llm.export.onnx import main

if __name__ == "__main__":
    raise SystemExit(main())
