"""Write msModelSlim golden fixtures: tiny random Llama / Qwen2 models quantized by the real tool.

Runs inside the peer virtualenv that `scripts/make_peer_fixtures.sh` builds (msmodelslim from PyPI,
a CPU torch); it drives msModelSlim's classic Python API (AntiOutlier -> Calibrator -> save), the
one its `example/*/quant_*.py` scripts use, on CPU, and for V1_CASES its v1 CLI (`msmodelslim
quant` with a shipped modelslim_v1 YAML; no fake-quant model there, so float logits only). Per case it writes to <out>/<case>/:
  the checkpoint as the tool saved it (description + weights) plus config.json,
  reference/logits.safetensors (a sub-folder: loaders read every *.safetensors of the checkpoint
  folder): `input_ids` [2, 8], `float_logits` (the float model) and
  `fake_quant_logits` (`Calibrator.model` after `run()`: the tool's own quantized model),
  MANIFEST.json: tool / versions / exact settings / date / writer.
It is never imported by the runtime or the tests (they read the files it wrote).

Usage: python scripts/peer_msmodelslim.py --out tests/fixtures/peer_checkpoints/msmodelslim [--cases a,b]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny_models import init_tiny_weights, tiny_config  # noqa: E402  (the shape our tests use)

VOCAB = 128                  # small vocabulary: keeps each checkpoint ~130 KB
SEED = 0
REF_SHAPE = (2, 8)           # the reference input: 2 sequences of 8 token ids

# case -> settings. "save" is the classic save_type; "anti" an AntiOutlier method or None.
CASES: dict[str, dict] = {
    "llama_w8a8": dict(arch="llama", quant=dict(w_bit=8, a_bit=8), save="ascendV1"),
    "llama_w8a8_safetensor": dict(arch="llama", quant=dict(w_bit=8, a_bit=8), save="safe_tensor"),
    "qwen2_w8a8": dict(arch="qwen2", quant=dict(w_bit=8, a_bit=8), save="ascendV1"),
    "llama_w8a8_dynamic": dict(arch="llama", quant=dict(w_bit=8, a_bit=8, is_dynamic=True), save="ascendV1"),
    "qwen2_w8a8_dynamic": dict(arch="qwen2", quant=dict(w_bit=8, a_bit=8, is_dynamic=True), save="ascendV1"),
    "llama_w8a16": dict(arch="llama", quant=dict(w_bit=8, a_bit=16), save="ascendV1"),
    # per-group weight-only: msModelSlim takes the per-group path for a_bit 16 with is_lowbit and
    # open_outlier off (config_utils.check_per_group); group sizes 32 / 64 / 128 / 256.
    "llama_w8a16_g32": dict(arch="llama", quant=dict(w_bit=8, a_bit=16, is_lowbit=True, open_outlier=False,
                                                     group_size=32), save="ascendV1"),
    "llama_w4a16_g32": dict(arch="llama", quant=dict(w_bit=4, a_bit=16, is_lowbit=True, open_outlier=False,
                                                     group_size=32), save="ascendV1"),
    "llama_w4a16_g32_asym": dict(arch="llama", quant=dict(w_bit=4, a_bit=16, is_lowbit=True, open_outlier=False,
                                                          group_size=32, w_sym=False), save="ascendV1"),
    "llama_w4a16": dict(arch="llama", quant=dict(w_bit=4, a_bit=16), save="ascendV1"),
    "llama_w8a8_c8": dict(arch="llama", quant=dict(w_bit=8, a_bit=8, use_kvcache_quant=True), save="ascendV1"),
    "llama_w8a8_m2": dict(arch="llama", quant=dict(w_bit=8, a_bit=8), save="ascendV1", anti="m2"),
    "llama_w8a8_m2_safetensor": dict(arch="llama", quant=dict(w_bit=8, a_bit=8), save="safe_tensor", anti="m2"),
    "llama_w8a8_disabled": dict(arch="llama", save="ascendV1", quant=dict(
        w_bit=8, a_bit=8, disable_names=["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"])),
}
# The v1 flow (`msmodelslim quant` with a modelslim_v1 YAML). Its shipped default-w8a8.yaml:
# iter_smooth, then int8 per-channel weights and SYMMETRIC per-token activations (W8A8_DYNAMIC),
# ascendv1_saver. The CLI exposes no fake-quant model: the reference is the float model only.
V1_CASES: dict[str, dict] = {
    "qwen2_v1_w8a8": dict(arch="qwen2", config="lab_practice/default/default-w8a8.yaml",
                          model_type="Qwen2.5-7B-Instruct", tie=True),
}
# Fixed settings of every run (the example scripts' choices for a CPU run: per-channel weights,
# min-max activations, lm_head left in float).
COMMON_QUANT = dict(dev_type="cpu", act_method=1, mm_tensor=False, w_sym=True, disable_last_linear=True)


def tiny_model(arch: str, tie: bool = False):
    """A random tiny model, untied by default (the classic safetensors savers refuse shared tensors)."""
    torch.manual_seed(SEED)
    config, cls = tiny_config(arch, tie=tie, vocab_size=VOCAB)
    config.architectures = [cls.__name__]      # as from_pretrained has it (AntiOutlier reads it)
    model = cls(config).eval()
    init_tiny_weights(model, config.hidden_size)        # the init of our tests: logits far from uniform
    return model


def calib_data(n: int = 4, length: int = 16) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randint(3, VOCAB, (1, length), generator=gen), torch.ones(1, length, dtype=torch.long)]
            for _ in range(n)]


def reference_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, REF_SHAPE, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float().contiguous()


def run_case(name: str, spec: dict, out_root: Path) -> dict:
    from msmodelslim.pytorch.llm_ptq.anti_outlier import AntiOutlier, AntiOutlierConfig
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig

    out = out_root / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = tiny_model(spec["arch"])
    ids = reference_ids()
    float_logits = logits_of(model, ids)
    data = calib_data()
    start = time.time()
    anti = spec.get("anti")
    if anti:
        AntiOutlier(model, calib_data=data, cfg=AntiOutlierConfig(anti_method=anti, dev_type="cpu")).process()
    quant_args = {**COMMON_QUANT, **spec["quant"]}
    calibrator = Calibrator(model, QuantConfig(**quant_args), calib_data=data, disable_level="L0")
    calibrator.run()
    fake_quant_logits = logits_of(calibrator.model, ids)
    calibrator.save(str(out), save_type=[spec["save"]])
    seconds = time.time() - start
    model.config.save_pretrained(out)      # the example scripts copy config.json next to the weights
    (out / "reference").mkdir()
    save_file({"input_ids": ids.contiguous(), "float_logits": float_logits,
               "fake_quant_logits": fake_quant_logits}, str(out / "reference" / "logits.safetensors"))
    import msmodelslim  # noqa: F401
    from importlib.metadata import version
    manifest = {
        "tool": "msmodelslim", "tool_version": version("msmodelslim"),
        "api": "classic (AntiOutlier / Calibrator / save)",
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": version("transformers"),
        "model": {"arch": spec["arch"], "vocab_size": VOCAB, "seed": SEED, "tie_word_embeddings": False,
                  "dtype": "float32", "shape": "tests/tiny_models.py tiny_config"},
        "calib_data": "4 x 16 random token ids (torch.Generator seed 1), attention mask ones",
        "anti_outlier": {"anti_method": anti, "dev_type": "cpu"} if anti else None,
        "quant_config": quant_args, "disable_level": "L0", "save_type": [spec["save"]],
        "reference": {"input_ids": list(REF_SHAPE), "float_logits": "float model before calibration",
                      "fake_quant_logits": "Calibrator.model after run()"},
        "seconds": round(seconds, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "written_by": "scripts/make_peer_fixtures.sh -> scripts/peer_msmodelslim.py",
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def word_tokenizer():
    """A word-level tokenizer with VOCAB ids (byte-level BPE needs >= 256): the v1 CLI tokenizes
    its own calibration text; unknown words map to <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import _CORPUS
    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for word in " ".join(_CORPUS).split() + [chr(c) for c in range(ord("a"), ord("z") + 1)]:
        if word not in words and len(words) < VOCAB:
            words.append(word)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token="<|endoftext|>")


def run_v1_case(name: str, spec: dict, out_root: Path) -> dict:
    import msmodelslim
    from importlib.metadata import version

    out = out_root / name
    if out.exists():
        shutil.rmtree(out)
    src = Path(tempfile.mkdtemp(prefix="peer_msmodelslim_src_"))
    model = tiny_model(spec["arch"], tie=spec["tie"])
    model.save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    ids = reference_ids()
    float_logits = logits_of(model, ids)
    config_path = Path(msmodelslim.__file__).parent / spec["config"]
    command = [str(Path(sys.executable).parent / "msmodelslim"), "quant", "--model_type", spec["model_type"],
               "--model_path", str(src), "--save_path", str(out), "--device", "cpu",
               "--config_path", str(config_path), "--trust_remote_code", "False"]
    start = time.time()
    subprocess.run(command, check=True)
    seconds = time.time() - start
    shutil.rmtree(src)
    (out / "reference").mkdir()
    save_file({"input_ids": ids.contiguous(), "float_logits": float_logits},
              str(out / "reference" / "logits.safetensors"))
    manifest = {
        "tool": "msmodelslim", "tool_version": version("msmodelslim"),
        "api": "v1 CLI (msmodelslim quant, modelslim_v1 YAML)",
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": version("transformers"),
        "model": {"arch": spec["arch"], "vocab_size": VOCAB, "seed": SEED, "tie_word_embeddings": spec["tie"],
                  "dtype": "float32", "shape": "tests/tiny_models.py tiny_config",
                  "tokenizer": "word-level, scripts/peer_msmodelslim.py word_tokenizer"},
        "command": ["msmodelslim"] + command[1:6] + ["<model_path>", "--save_path", "<case dir>"] + command[8:11]
                   + [f"<msmodelslim package>/{spec['config']}"] + command[12:],
        "config": config_path.read_text(),
        "reference": {"input_ids": list(REF_SHAPE), "float_logits": "float model before quantization",
                      "fake_quant_logits": None},
        "seconds": round(seconds, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "written_by": "scripts/make_peer_fixtures.sh -> scripts/peer_msmodelslim.py",
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/peer_checkpoints/msmodelslim")
    every = [*CASES, *V1_CASES]
    parser.add_argument("--cases", default=",".join(every), help="comma-separated subset of: " + ", ".join(every))
    args = parser.parse_args()
    args.out = args.out.resolve()
    os.chdir(tempfile.mkdtemp(prefix="peer_msmodelslim_"))   # AntiOutlier writes features.npy to the cwd
    failures = {}
    for name in args.cases.split(","):
        try:
            manifest = (run_v1_case(name, V1_CASES[name], args.out) if name in V1_CASES
                        else run_case(name, CASES[name], args.out))
            print(f"[peer_msmodelslim] {name}: ok ({manifest['seconds']} s)", flush=True)
        except Exception as exc:      # keep going: report every case that the tool refused
            failures[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            print(f"[peer_msmodelslim] {name}: FAILED {failures[name]}", flush=True)
            shutil.rmtree(args.out / name, ignore_errors=True)
    if failures:
        sys.exit(f"{len(failures)} case(s) failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
