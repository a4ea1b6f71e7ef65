"""Issue 28 target 3's yardstick: llm-compressor's own W8A8 (SmoothQuant 0.8 + GPTQ, int8
per-channel symmetric weights, dynamic per-token int8 activations, lm_head float) on SmolLM2-135M,
calibrated on the first `--num_samples` x `--max_tokens` tokens of calib_prose.jsonl. Run inside
llm-compressor's own virtualenv (scripts/make_peer_fixtures_llmcompressor.sh builds one), never by
the runtime; the checkpoint (~200 MB) stays outside the repository and benchmarks/bench_calib.py
--w8a8_dynamic measures it with the runtime next to ours.

    /tmp/venv-llmc/bin/python scripts/peer_llmcompressor_smollm2.py --model DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SmolLM2 HF directory (ascend-llm resolves the bundled GGUF)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=512)
    parser.add_argument("--calib_file", default=str(SHARED / "calib_prose.jsonl"))
    args = parser.parse_args()
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    texts = [json.loads(line)["text"] for line in Path(args.calib_file).read_text().splitlines() if line.strip()]
    ids = [tokenizer(t)["input_ids"][:args.max_tokens] for t in texts[:args.num_samples]]
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
    recipe = [SmoothQuantModifier(smoothing_strength=0.8),
              GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, processor=tokenizer, num_calibration_samples=len(ids),
            max_seq_length=args.max_tokens)
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    manifest = {"tool": "llmcompressor", "version": version("llmcompressor"),
                "compressed_tensors": version("compressed-tensors"), "torch": torch.__version__,
                "recipe": "SmoothQuantModifier(smoothing_strength=0.8) + GPTQModifier(scheme=W8A8, ignore=[lm_head])",
                "calibration": f"{len(ids)} x {args.max_tokens} tokens of {Path(args.calib_file).name}",
                "calib_seconds": round(seconds, 1)}
    (Path(args.out) / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
