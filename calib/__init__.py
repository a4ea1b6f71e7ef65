"""Offline tools that write quantized checkpoints or calibration data (may import ascend_llm; the
runtime never imports calib).

W8A8 calibration: float HF Llama / Qwen2 -> msModelSlim ascendV1 quantized checkpoint, via
`python -m calib` / `ascend-llm-calib` (calib.cli), or
`calib.pipeline.run_calibration(calib.config.CalibConfig(...))`. Also: block-FP8 GPTQ
(calib.block_fp8), the WINT2 writers and tuning (calib.wint2), calibration texts sampled from the
float model (`python -m calib.synthetic`) and mixed from two files (`python -m calib.mix`).
"""
