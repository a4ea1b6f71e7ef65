"""Load compressed-tensors checkpoints that `python -m calib.convert` wrote from msModelSlim and
FastDeploy-layout fixtures with transformers + compressed-tensors (the reader vLLM's format comes from), in the
llm-compressor virtualenv, and save their logits as fixtures (run by
scripts/make_converted_fixtures.sh, never by the runtime).

    python scripts/peer_transformers_reads_converted.py --converted DIR --out DIR --cases a,b --sources t/a,t/b

For each case: <converted>/<case> is our output; <out>/<case>/transformers_logits.safetensors gets
`input_ids` [2, 8] (the source fixture's own prompts, passed in <converted>/<case>/input_ids.json)
and `logits` [2, 8, vocab] fp32 of transformers' decompressed model, with a MANIFEST.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
from importlib.metadata import version
from pathlib import Path

import torch


def write_case(case: str, source: str, converted: Path, out_root: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    model_dir = converted / case
    ids = torch.tensor(json.loads((model_dir / "input_ids.json").read_text()), dtype=torch.int64)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    out = out_root / case
    out.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids, "logits": logits.contiguous()}, str(out / "transformers_logits.safetensors"))
    quant = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    manifest = {
        "tool": "transformers + compressed-tensors (reader)", "transformers_version": version("transformers"),
        "compressed_tensors_version": version("compressed-tensors"), "torch_version": torch.__version__,
        "case": case, "source": f"tests/fixtures/peer_checkpoints/{source}",
        "converted_by": "python -m calib.convert --to compressed-tensors (this repository)",
        "format": quant.get("format"),
        "logits": "transformers AutoModelForCausalLM.from_pretrained(converted checkpoint), fp32, "
                  "on the source fixture's reference input_ids",
        "date": datetime.date.today().isoformat(),
        "script": "scripts/make_converted_fixtures.sh (driver scripts/peer_transformers_reads_converted.py)",
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{case}: {quant.get('format')} read by transformers -> {out}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--converted", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", required=True, help="comma-separated")
    parser.add_argument("--sources", required=True, help="comma-separated <tool>/<case>, one per case")
    args = parser.parse_args()
    cases, sources = args.cases.split(","), args.sources.split(",")
    if len(cases) != len(sources):
        parser.error("--cases and --sources must list the same number of entries")
    for case, source in zip(cases, sources):
        write_case(case, source, args.converted, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
