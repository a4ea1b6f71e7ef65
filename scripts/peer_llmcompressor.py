"""Write compressed-tensors golden fixtures with llm-compressor itself (run by
scripts/make_peer_fixtures_llmcompressor.sh inside its own virtualenv, never by the runtime).

For each case: a tiny random float Llama is quantized by `llmcompressor.oneshot` and saved with
`save_compressed=True`; transformers then loads the saved checkpoint back (compressed-tensors
decompresses it) and its logits on a fixed [2, 8] input are the format's reference. Written to
<out>/<case>/: the checkpoint (config.json + model.safetensors), reference.safetensors
(`input_ids` [2, 8] int64, `logits` [2, 8, vocab] fp32 of the decompressed checkpoint,
`float_logits` of the float model before quantization) and MANIFEST.json.

    python scripts/peer_llmcompressor.py --out tests/fixtures/peer_checkpoints/llmcompressor [--cases a,b]
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

VOCAB = 128
SEED = 0


# cases whose scheme needs wider layers: FP8_BLOCK's per-token-group (128) activations need k >= 128
WIDER = {"llama_fp8_block": dict(hidden_size=128, intermediate_size=256)}


def tiny_model(arch: str, case: str = ""):
    """A tiny random float model, initialised like tests/tiny_models.py (larger-than-default init)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    common.update(WIDER.get(case, {}))
    torch.manual_seed(SEED)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1000000.0))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and p.shape[0] == common["hidden_size"]:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
    return model.eval()


def calib_dataset(num: int = 16, length: int = 32):
    """Pre-tokenized random calibration samples (no tokenizer needed)."""
    from datasets import Dataset
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (num, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * num})


def tiny_tokenizer():
    """A word-level tokenizer over the 128 ids (oneshot wants a processor when given a dataset)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0",
                                   bos_token="t1", eos_token="t2")


def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))


def _group(num_bits, wtype, strategy, group_size=None, symmetric=True, act=None, actorder=None):
    weights = {"num_bits": num_bits, "type": wtype, "strategy": strategy, "symmetric": symmetric,
               "dynamic": False}
    if actorder is not None:
        weights["actorder"] = actorder
    if group_size is not None:
        weights["group_size"] = group_size
    group = {"targets": ["Linear"], "weights": weights}
    if act is not None:
        group["input_activations"] = act
    return {"group_0": group}


def recipes():
    """case -> (arch, recipe builder, needs calibration data, settings for the manifest)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier
    ignore = ["lm_head"]
    static_int8_act = {"num_bits": 8, "type": "int", "strategy": "tensor", "symmetric": True,
                       "dynamic": False}
    return {
        "llama_w8a8_int8_dynamic": ("llama", lambda: [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)], True,
            "SmoothQuant(0.8) + GPTQ scheme W8A8: int8 channel sym weights, dynamic per-token int8 activations"),
        "llama_w8a8_int8_static": ("llama", lambda: [
            QuantizationModifier(config_groups=_group(8, "int", "channel", act=static_int8_act),
                                 ignore=ignore)], True,
            "QuantizationModifier: int8 channel sym weights, static per-tensor sym int8 activations"),
        "qwen2_w8a8_int8_static_asym": ("qwen2", lambda: [
            QuantizationModifier(config_groups=_group(8, "int", "tensor", act=dict(static_int8_act, symmetric=False)),
                                 ignore=ignore)], True,
            "QuantizationModifier on Qwen2 (q/k/v biases): int8 per-tensor sym weights, static per-tensor "
            "asymmetric int8 activations (input_zero_point)"),
        "llama_fp8": ("llama", lambda: [QuantizationModifier(targets="Linear", scheme="FP8", ignore=ignore)],
                      True, "QuantizationModifier scheme FP8: e4m3 per-tensor weights, static per-tensor activations"),
        "llama_fp8_dynamic": ("llama", lambda: [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC",
                                                                     ignore=ignore)], False,
                              "QuantizationModifier scheme FP8_DYNAMIC: e4m3 channel weights, dynamic per-token"),
        "llama_fp8_dynamic_kv_fp8": ("llama", lambda: [QuantizationModifier(
            targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore,
            kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                             "symmetric": True})], True,
            "QuantizationModifier scheme FP8_DYNAMIC plus an FP8 KV-cache scheme (static per-tensor "
            "k_scale / v_scale per attention layer)"),
        "llama_w4a16_g32": ("llama", lambda: [GPTQModifier(config_groups=_group(4, "int", "group", 32),
                                                           ignore=ignore)], True,
                            "GPTQ: int4 sym weights, group 32, pack-quantized"),
        "llama_w4a16_g32_asym": ("llama", lambda: [QuantizationModifier(
            config_groups=_group(4, "int", "group", 32, symmetric=False), ignore=ignore)], False,
            "QuantizationModifier: int4 asym weights (packed zero points), group 32, pack-quantized"),
        "llama_w8a16_g32": ("llama", lambda: [QuantizationModifier(config_groups=_group(8, "int", "group", 32),
                                                                    ignore=ignore)], False,
                            "QuantizationModifier: int8 sym weights, group 32, pack-quantized"),
        "qwen2_w8a8_int8_dynamic": ("qwen2", lambda: [
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)], True,
            "GPTQ scheme W8A8 on Qwen2 (q/k/v biases): int8 channel weights, dynamic per-token activations"),
        "llama_fp8_block": ("llama", lambda: [QuantizationModifier(targets="Linear", scheme="FP8_BLOCK",
                                                                   ignore=ignore)], False,
                            "QuantizationModifier scheme FP8_BLOCK: e4m3 weights in 128 x 128 blocks, dynamic "
                            "per-token-group (128) activations"),
        "llama_w4a16_g32_actorder_weight": ("llama", lambda: [GPTQModifier(
            config_groups=_group(4, "int", "group", 32, actorder="weight"), ignore=ignore)], True,
            "GPTQ with actorder 'weight' (columns quantized in activation order, stored in the original order "
            "with contiguous groups, no weight_g_idx; llm-compressor 0.14 removed 'group'): int4 sym, group 32"),
        "qwen2_w4a16_g32": ("qwen2", lambda: [GPTQModifier(config_groups=_group(4, "int", "group", 32),
                                                           ignore=ignore)], True,
                            "GPTQ: int4 sym weights, group 32, pack-quantized, on Qwen2"),
    }


@torch.inference_mode()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float().contiguous()


def write_case(case: str, out_root: Path) -> None:
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    arch, recipe, needs_data, settings = recipes()[case]
    out = out_root / case
    if out.exists():
        shutil.rmtree(out)
    float_dir = Path(tempfile.mkdtemp(prefix=f"{case}-float-"))
    tiny_model(arch, case).save_pretrained(float_dir)   # oneshot re-reads the model's config from disk
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    ids = input_ids()
    float_logits = _logits(model, ids)
    kwargs = dict(dataset=calib_dataset(), num_calibration_samples=16, max_seq_length=32,
                  processor=tiny_tokenizer()) if needs_data else {}
    oneshot(model=model, recipe=recipe(), **kwargs)
    model.save_pretrained(out, save_compressed=True)
    for extra in ("recipe.yaml", "generation_config.json"):
        (out / extra).unlink(missing_ok=True)
    shutil.rmtree(float_dir)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    save_file({"input_ids": ids, "logits": _logits(back, ids), "float_logits": float_logits},
              str(out / "reference.safetensors"))
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    manifest = {
        "tool": "llmcompressor", "tool_version": version("llmcompressor"),
        "compressed_tensors_version": version("compressed-tensors"),
        "transformers_version": version("transformers"), "torch_version": torch.__version__,
        "case": case, "arch": arch, "settings": settings, "calibration": (
            "16 random token sequences of 32 (seed 1)" if needs_data else "none (data-free)"),
        "format": quant.get("format"), "model": "tiny random float32: hidden {hidden_size}, intermediate {intermediate_size}, 2 layers, "
        "4 heads / 2 KV heads, vocab 128, seed 0, untied".format(
            **{"hidden_size": 64, "intermediate_size": 96, **WIDER.get(case, {})}),
        "reference": "reference.safetensors: input_ids [2, 8] (seed 2); logits = transformers "
                     "AutoModelForCausalLM on this saved checkpoint (decompressed), fp32; float_logits = "
                     "the float model before oneshot",
        "date": datetime.date.today().isoformat(),
        "script": "scripts/make_peer_fixtures_llmcompressor.sh (driver scripts/peer_llmcompressor.py)",
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{case}: format {quant.get('format')} -> {out}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c] or list(recipes())
    unknown = [c for c in cases if c not in recipes()]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(recipes())}")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for case in cases:
        try:
            write_case(case, args.out)
        except Exception as exc:          # report every case, then fail
            import traceback
            traceback.print_exc()
            print(f"{case}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            failed.append(case)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
