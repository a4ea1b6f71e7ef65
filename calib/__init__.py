"""Offline calibration: float HF Llama / Qwen2 -> msModelSlim ascendV1 quantized checkpoint.

Entry points: `python -m calib` / `ascend-llm-calib` (calib.cli), or
`calib.pipeline.run_calibration(calib.config.CalibConfig(...))`.
"""
