"""Write the Paddle `weight_quantize` golden: the bytes FastDeploy's wint8 / wint4 `quant_weight` holds.

FastDeploy's pre-quantized dense layers store exactly what `paddle.nn.quant.weight_quantize`
returns (fastdeploy/model_executor/layers/quantization/weight_only.py: `process_loaded_weights`
quantizes with it, `process_prequanted_weights` copies `quant_weight` into the same parameter).
This script runs the real Paddle op (CPU kernel, paddlepaddle from PyPI; FastDeploy itself needs a
GPU) on one seeded float16 matrix and saves input and outputs, so that our reader
(ascend_llm/numerics/cutlass_weight_layout.py) is checked against Paddle's own bytes:

  <out>/golden.npz     x float16 [k, n]; for algo in (wint8, wint4) and arch in ARCHS:
                       {algo}_arch{arch}_out int8 (the container), {algo}_arch{arch}_scale float16 [n]
  <out>/MANIFEST.json  tool, versions, seed, shapes, date

Needs numpy and paddlepaddle only (a separate virtualenv: `python -m venv /tmp/pd &&
/tmp/pd/bin/pip install paddlepaddle numpy`); never imported by the runtime or the tests.

Usage: /tmp/pd/bin/python scripts/peer_paddle_weight_quantize.py --out tests/fixtures/peer_checkpoints/fastdeploy/paddle_weight_quantize
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
from pathlib import Path

import numpy as np
import paddle
from paddle.nn.quant import weight_quantize

logger = logging.getLogger("peer_paddle_weight_quantize")
K, N, SEED = 128, 32, 0
ARCHS = (70, 80, 90)
ALGOS = {"wint8": "weight_only_int8", "wint4": "weight_only_int4"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    x = (np.random.RandomState(SEED).randn(K, N) * 0.05).astype(np.float16)      # [k, n], Paddle orientation
    arrays = {"x": x}
    for name, algo in ALGOS.items():
        for arch in ARCHS:
            out, scale = weight_quantize(paddle.to_tensor(x), algo=algo, arch=arch)
            arrays[f"{name}_arch{arch}_out"] = out.numpy()
            arrays[f"{name}_arch{arch}_scale"] = scale.numpy()
            logger.info("%s arch %d: out %s %s, scale %s %s", name, arch, out.shape, out.dtype,
                        scale.shape, scale.dtype)
    np.savez_compressed(args.out / "golden.npz", **arrays)
    manifest = {
        "tool": "paddlepaddle (CPU) paddle.nn.quant.weight_quantize",
        "tool_version": paddle.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "written_by": "scripts/peer_paddle_weight_quantize.py (the arrays are Paddle's own outputs)",
        "input": {"shape_k_n": [K, N], "dtype": "float16", "init": f"numpy RandomState({SEED}).randn * 0.05"},
        "algos": ALGOS,
        "archs": list(ARCHS),
        "group_size": -1,
        "date": datetime.date.today().isoformat(),
    }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
