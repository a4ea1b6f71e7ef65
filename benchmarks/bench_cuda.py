"""CUDA kernel and decode benchmark (run on a GPU; exits with a message elsewhere).

1. Measured device copy bandwidth (the memory limit every memory-bound number is compared to).
2. GEMM throughput at M >= 2048 on the Llama-2-7B shapes 4096x4096 and 11008x4096 (n x k):
   bf16 (cuBLAS), fp8 per-tensor and row-wise (`torch._scaled_mm`), fp8 128x128 block (Triton),
   W8A8 int8 (Triton, fused dequant; and `torch._int_mm` for reference), each as TFLOP/s and fraction of
   the spec dense peak of the GPU when it is known.
3. Memory-bound kernels at decode sizes: weight-only int8/int4 GEMV (M=1), rms_norm,
   silu_and_mul, paged-attention decode: time, bytes moved, GB/s, fraction of copy bandwidth.
4. Batch-1 decode tok/s of a Llama-2-7B-shaped model with random weights per quantization
   method (ascend-llm on "cuda"), vs the bandwidth limit (weight bytes / copy bandwidth) and vs
   HF transformers `generate` on the same weights, in the same run.
5. Offline throughput of the same model: --offline-requests (256) requests of 512 prompt + 128 new
   tokens per configuration (bf16, fp8 and int8 KV cache, quantized weights), against HF's batch-1
   rate from step 4, with the KV blocks that fit (an fp8 / int8 cache holds twice the blocks of a
   bf16 one), the weights' GPU memory and the peak allocated memory.

Writes benchmarks/results/cuda_<gpu>_<date>.json and prints a table. Formulas: results/NOTES.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5)
GEMM_SHAPES = [(4096, 4096), (11008, 4096)]               # (n, k)
# spec dense (no sparsity) tensor-core peaks, TFLOP/s: (bf16, fp8, int8)
SPEC_PEAKS = {"H100 80GB HBM3": (989.0, 1979.0, 1979.0), "H100 SXM": (989.0, 1979.0, 1979.0),
              "H200": (989.0, 1979.0, 1979.0), "H100 PCIe": (756.0, 1513.0, 1513.0)}
METHODS = [None, "wint8", "wint4", "fp8", "block_wise_fp8", "w8a8", "w8a8_dynamic"]
# msModelSlim layer types of the W8A8 rows, whose checkpoints are written from the random model
W8A8_TYPES = {"w8a8": "W8A8", "w8a8_dynamic": "W8A8_DYNAMIC"}


def require_cuda() -> None:
    """Exit with a clear message where there is no CUDA device or no triton."""
    if not torch.cuda.is_available():
        sys.exit("bench_cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                 "run this on a CUDA GPU machine")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_cuda: triton is not installed (pip install 'ascend-llm[cuda]')")


def cuda_time(fn: Callable[[], Any], iters: int = 50, warmup: int = 10) -> float:
    """Median seconds per call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_time(lambda: dst.copy_(src), iters=20)
    return 2 * src.numel() / seconds


def _peak(kind: int) -> float | None:
    name = torch.cuda.get_device_name()
    for key, peaks in SPEC_PEAKS.items():
        if key in name:
            return peaks[kind]
    return None


def gemm_rows(m: int) -> list[dict]:
    from ascend_llm.numerics import primitives as P
    from ascend_llm.ops.triton import fp8, int8_gemm
    rows = []
    for n, k in GEMM_SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq8, ws8 = P.quantize_per_channel(w, 8)
        xq8, xs8 = int8_gemm.dynamic_quant_per_token(x)
        wf8, wsf8 = P.quantize_fp8_per_tensor(w)
        xf8, xsf8 = fp8.quantize_fp8_per_tensor(x)
        xr8, xsr8 = fp8.quantize_fp8_per_token(x)                           # [m, k], [m, 1]
        wsr8 = w.float().abs().amax(dim=1, keepdim=True) / P.FP8_MAX          # [n, 1]
        wr8 = P.fp8_cast(w.float() / wsr8)
        wb8, wsb8 = P.quantize_fp8_block(w)
        xb8, xsb8 = fp8.quantize_fp8_per_token_group(x, 128)
        cases = {
            "bf16 cuBLAS": (lambda: F.linear(x, w), 2, 0),
            "fp8 per-tensor _scaled_mm": (lambda: torch._scaled_mm(
                xf8, wf8.t(), scale_a=xsf8, scale_b=wsf8, out_dtype=torch.bfloat16), 1, 1),
            "fp8 row-wise _scaled_mm": (lambda: torch._scaled_mm(
                xr8, wr8.t(), scale_a=xsr8, scale_b=wsr8.view(1, -1), out_dtype=torch.bfloat16), 1, 1),
            "fp8 block 128x128 Triton": (lambda: fp8.scaled_fp8_gemm(
                xb8, xsb8, wb8, wsb8, (128, 128), None, torch.bfloat16), 1, 1),
            "W8A8 int8 Triton (dequant fused)": (lambda: int8_gemm.int8_gemm(
                xq8, wq8, ws8, token_scale=xs8, out_dtype=torch.bfloat16), 1, 2),
            "int8 torch._int_mm (int32 out)": (lambda: torch._int_mm(xq8, wq8.t()), 1, 2),
        }
        bf16_seconds = None
        for name, (fn, in_bytes, kind) in cases.items():
            try:
                seconds = cuda_time(fn)
            except Exception as exc:                        # noqa: BLE001 - report, keep measuring
                logging.exception("GEMM %s at %dx%dx%d failed", name, m, n, k)
                rows.append({"kernel": name, "m": m, "n": n, "k": k, "error": repr(exc)})
                continue
            bf16_seconds = bf16_seconds or seconds                  # the first case is bf16
            flops = 2 * m * n * k
            peak = _peak(kind)
            rows.append({"kernel": name, "m": m, "n": n, "k": k, "seconds": seconds, "flops": flops,
                         "bytes": in_bytes * (m * k + n * k) + 2 * m * n,
                         "tflops": flops / seconds / 1e12, "x_bf16": bf16_seconds / seconds,
                         "fraction_of_spec_peak": None if peak is None else flops / seconds / 1e12 / peak})
    return rows


def memory_bound_rows(bandwidth: float) -> list[dict]:
    import types
    from ascend_llm.numerics import primitives as P
    from ascend_llm.ops.attention_metadata import AttentionMetadata
    from ascend_llm.ops.triton import norm_rope_act, paged_attention, weight_only
    rows = []

    def add(name: str, fn: Callable[[], Any], nbytes: int, flops: int) -> None:
        try:
            seconds = cuda_time(fn, iters=100)
        except Exception as exc:                            # noqa: BLE001 - report, keep measuring
            logging.exception("%s failed", name)
            rows.append({"kernel": name, "error": repr(exc)})
            return
        rows.append({"kernel": name, "seconds": seconds, "bytes": nbytes, "flops": flops,
                     "gb_s": nbytes / seconds / 1e9, "fraction_of_copy_bw": nbytes / seconds / bandwidth})

    for n, k in GEMM_SHAPES:
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda") * 0.02
        wb = w.bfloat16()
        add(f"bf16 GEMV cuBLAS {n}x{k}", lambda: F.linear(x, wb), 2 * n * k + 2 * (k + n), 2 * n * k)
        for bits in (8, 4):
            q, s = P.quantize_per_channel(w, bits)
            q = P.pack_int4(q) if bits == 4 else q
            layer = types.SimpleNamespace(weight=q, weight_scale=s, quant_bits=bits, in_features_k=k)
            add(f"wint{bits} GEMV Triton {n}x{k}",
                lambda layer=layer: weight_only.weight_only_matmul(layer, x, None),
                q.numel() + 4 * n + 2 * (k + n), 2 * n * k)
    h = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    add("rms_norm 1x4096", lambda: norm_rope_act.rms_norm(h, g, 1e-5), 3 * 2 * 4096, 4 * 4096)
    gu = torch.randn(1, 2 * 11008, device="cuda", dtype=torch.bfloat16)
    add("silu_and_mul 1x11008", lambda: norm_rope_act.silu_and_mul(gu), 3 * 2 * 11008, 5 * 11008)
    ctx, block = 4096, 16                                  # one sequence, 4096 cached tokens
    blocks = ctx // block
    k_cache = torch.randn(blocks + 1, block, 32, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    meta = AttentionMetadata.build([1], [ctx], [list(range(blocks))], [ctx - 1], block, blocks,
                                   torch.device("cuda"))
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kv_bytes = 2 * ctx * 32 * 128 * 2
    add("paged_attention decode ctx 4096 (32 heads x 128)",
        lambda: paged_attention.paged_attention(q, k_cache, v_cache, meta, 128 ** -0.5),
        kv_bytes, 4 * ctx * 32 * 128)
    return rows


def weight_bytes(method: str | None) -> int:
    """Bytes of weights one decode step reads (Llama-2-7B; embeddings: one row, lm_head: all)."""
    c = LLAMA2_7B
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    linear = layers * (4 * h * h + 3 * h * i)                          # qkv + o, gate + up + down
    per_param = {None: 2.0, "wint8": 1.0, "wint4": 0.5, "fp8": 1.0, "block_wise_fp8": 1.0,
                 "w8a8": 1.0, "w8a8_dynamic": 1.0}[method]
    out_channels = layers * (4 * h + 3 * i)
    scales = {None: 0, "wint8": 4 * out_channels, "wint4": 4 * out_channels, "fp8": 4 * layers * 7,
              "block_wise_fp8": 4 * linear // (128 * 128),
              "w8a8": 8 * out_channels,                 # deq_scale + quant_bias per channel
              "w8a8_dynamic": 4 * out_channels}[method]
    return int(linear * per_param) + scales + 2 * vocab * h + 2 * h + 2 * h * (2 * layers + 1)   # head, row, norms


def make_random_llama(path: Path) -> Path:
    """A Llama-2-7B-shaped HF directory with random bf16 weights (and a small tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B, torch_dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    _save_tokenizer(path)
    return path


def _save_tokenizer(path: Path) -> None:
    try:
        from ascend_llm.loader import resolve_model_path
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct")).save_pretrained(path)
    except Exception:                                       # noqa: BLE001 - any source will do
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.tiny_models import make_tokenizer
        make_tokenizer().save_pretrained(path)


def hf_decode(model_dir: Path, prompt_len: int, output_len: int) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(3, 32000, (1, prompt_len), device="cuda")

    def generate(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        generate(4)
        t_prefill, t_total = generate(1), generate(output_len)
    del model
    torch.cuda.empty_cache()
    return (output_len - 1) / (t_total - t_prefill)


def make_random_w8a8(float_dir: Path, method: str) -> Path:
    """An msModelSlim checkpoint of the random model with every decoder Linear of the method's type,
    quantized on the GPU without calibration (static activation ranges fixed: speed only)."""
    out = float_dir.parent / f"{float_dir.name}-{method}"
    if (out / "quant_model_description.json").exists():
        return out
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.quant.w8a8_writer import write_uncalibrated_w8a8_checkpoint
    write_uncalibrated_w8a8_checkpoint(float_dir, out, W8A8_TYPES[method], device="cuda")
    torch.cuda.empty_cache()
    return out


def checkpoint_for(model_dir: Path, method: str | None) -> tuple[Path, str | None]:
    """(directory, quantization argument) of a row: the W8A8 rows load their msModelSlim checkpoint,
    the other methods quantize the random model online."""
    if method in W8A8_TYPES:
        return make_random_w8a8(model_dir, method), "ascend"
    return model_dir, method


def ours_decode(model_dir: Path, method: str | None, prompt_len: int, output_len: int) -> float:
    from ascend_llm import LLM, SamplingParams
    model_dir, quantization = checkpoint_for(model_dir, method)
    # batch 1 only: graph buckets up to 8 sequences keep the capture short
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", quantization=quantization, max_model_len=2048,
              enable_prefix_caching=False, kv_cache_memory_gb=4.0, max_num_seqs=8)
    prompt = torch.randint(3, 32000, (prompt_len,)).tolist()

    def run(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(4)
    t_prefill, t_total = run(1), run(output_len)
    del llm
    torch.cuda.empty_cache()
    return (output_len - 1) / (t_total - t_prefill)


def decode_rows(model_dir: Path, bandwidth: float, prompt_len: int, output_len: int,
                methods: list[str | None], rows: list[dict], on_row: Callable[[], None]) -> float:
    """Append HF's row, then one per method, to `rows`, calling on_row() after each (saves as it goes);
    returns HF's rate."""
    hf = hf_decode(model_dir, prompt_len, output_len)
    rows.append({"method": "HF transformers bf16", "decode_tok_s": hf, "weight_bytes": weight_bytes(None),
                 "limit_tok_s": bandwidth / weight_bytes(None)})
    on_row()
    for method in methods:
        try:
            rate = ours_decode(model_dir, method, prompt_len, output_len)
        except Exception as exc:                            # noqa: BLE001 - report, keep measuring
            logging.exception("decode with quantization=%s failed", method)
            rows.append({"method": f"ascend-llm {method or 'bf16'}", "error": repr(exc)})
            on_row()
            continue
        limit = bandwidth / weight_bytes(method)
        rows.append({"method": f"ascend-llm {method or 'bf16'}", "decode_tok_s": rate,
                     "weight_bytes": weight_bytes(method), "limit_tok_s": limit,
                     "fraction_of_limit": rate / limit, "x_hf": rate / hf})
        on_row()
    return hf


def _print_rows(rows: list[dict], key: str, width: int, cells: Callable[[dict], str]) -> None:
    """One line per row: its name, then cells(row), or the error it ended with."""
    for r in rows:
        print(f"{r[key]:<{width}} " + (f"error: {r['error']}" if "error" in r else cells(r)))


def print_tables(result: dict) -> None:
    print(f"\n{result['gpu']}  copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s")
    print(f"\n{'GEMM':<36} {'m':>5} {'n':>6} {'k':>5} {'TFLOP/s':>8} {'x bf16':>7} {'of peak':>8}")
    _print_rows(result["gemm"], "kernel", 36, lambda r: (
        f"{r['m']:>5} {r['n']:>6} {r['k']:>5} {r['tflops']:8.1f} {r['x_bf16']:7.2f} "
        f"{'-' if r['fraction_of_spec_peak'] is None else format(r['fraction_of_spec_peak'], '.2f'):>8}"))
    print(f"\n{'memory-bound kernel':<50} {'us':>8} {'GB/s':>7} {'of copy BW':>10}")
    _print_rows(result["memory_bound"], "kernel", 50, lambda r: (
        f"{r['seconds'] * 1e6:8.1f} {r['gb_s']:7.0f} {r['fraction_of_copy_bw']:10.2f}"))
    print(f"\n{'batch-1 decode':<30} {'tok/s':>8} {'limit':>8} {'of limit':>8} {'x HF':>6}")
    _print_rows(result.get("decode", []), "method", 30, lambda r: (
        f"{r['decode_tok_s']:8.1f} {r['limit_tok_s']:8.1f} "
        f"{r['decode_tok_s'] / r['limit_tok_s']:8.2f} {r.get('x_hf', 1.0):6.2f}"))
    if result.get("offline"):
        first = result["offline"][0]
        title = f"offline ({first['num_requests']} x {first['prompt_len']}+{first['output_len']})"
        print(f"\n{title:<30} {'out tok/s':>9} {'x HF b1':>8} {'KV blocks':>9} {'weights GiB':>11} {'peak GiB':>9}")
        _print_rows(result["offline"], "config", 30, lambda r: (
            f"{r['output_tok_s']:9.0f} {r.get('x_hf_batch1', float('nan')):8.1f} {r['num_kv_blocks']:9d} "
            f"{r['weights_gib']:11.2f} {r['peak_allocated_gib']:9.2f}"))


# offline rows: (label, quantization method or None, kv_cache_dtype)
OFFLINE_CONFIGS = [("bf16", None, "auto"), ("bf16, fp8 KV cache", None, "fp8"), ("bf16, int8 KV cache", None, "int8"),
                   ("wint4", "wint4", "auto"), ("block_wise_fp8", "block_wise_fp8", "auto"),
                   ("w8a8_dynamic, fp8 KV cache", "w8a8_dynamic", "fp8")]


def ours_offline(model_dir: Path, method: str | None, kv_cache_dtype: str, num_requests: int,
                 prompt_len: int, output_len: int) -> dict:
    """One offline run of num_requests random prompts; rates, KV blocks and GPU memory."""
    from ascend_llm import LLM, SamplingParams
    model_dir, quantization = checkpoint_for(model_dir, method)
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", quantization=quantization,
              kv_cache_dtype=kv_cache_dtype, max_model_len=prompt_len + output_len + 16,
              gpu_memory_utilization=0.85, max_num_seqs=num_requests, max_num_batched_tokens=8192)
    runner = llm.llm_engine.model_runner
    weight_bytes_gpu = sum(t.numel() * t.element_size() for t in
                           [*runner.model.parameters(), *runner.model.buffers()] if t.is_cuda)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 32000, (num_requests, prompt_len), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=params, use_tqdm=False)     # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    new_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    row = {"seconds": seconds, "output_tok_s": new_tokens / seconds,
           "total_tok_s": (new_tokens + num_requests * prompt_len) / seconds,
           "num_kv_blocks": runner.num_blocks, "block_size": runner.block_size,
           "weights_gib": weight_bytes_gpu / 2**30, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    del llm, runner, outs
    torch.cuda.empty_cache()
    return row


def offline_rows(model_dir: Path, hf_batch1: float | None, num_requests: int, prompt_len: int, output_len: int,
                 rows: list[dict], on_row: Callable[[], None]) -> None:
    """Append one row per OFFLINE_CONFIGS entry to `rows`, calling on_row() after each."""
    for label, method, kv_cache_dtype in OFFLINE_CONFIGS:
        row: dict[str, Any] = {"config": label, "num_requests": num_requests, "prompt_len": prompt_len,
                               "output_len": output_len}
        try:
            row.update(ours_offline(model_dir, method, kv_cache_dtype, num_requests, prompt_len, output_len))
            if hf_batch1:
                row["x_hf_batch1"] = row["output_tok_s"] / hf_batch1
        except Exception as exc:                            # noqa: BLE001 - report, keep measuring
            logging.exception("offline run %s failed", label)
            row["error"] = repr(exc)
        rows.append(row)
        on_row()


def parse_methods(text: str) -> list[str | None]:
    """'bf16,wint8' -> [None, "wint8"]; an unknown name exits naming it and the known ones."""
    known = {m or "bf16": m for m in METHODS}
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        sys.exit(f"bench_cuda: --methods {text!r}: unknown {unknown or 'empty list'}; choose from {', '.join(known)}")
    return [known[name] for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=4096, help="GEMM rows (>= 2048)")
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "llama2-7b-random"))
    parser.add_argument("--skip-decode", action="store_true", help="kernels only (no 7B model)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--methods", default=",".join(m or "bf16" for m in METHODS),
                        help="comma-separated decode rows (bf16 = unquantized)")
    parser.add_argument("--offline-requests", type=int, default=256, help="0 skips the offline rows")
    parser.add_argument("--offline-prompt-len", type=int, default=512)
    parser.add_argument("--offline-output-len", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="", help="appended to the JSON file name (runs of one day apart)")
    args = parser.parse_args()
    require_cuda()
    if args.m < 2048:
        sys.exit(f"bench_cuda: --m {args.m}: the GEMM comparison is defined at M >= 2048")
    logging.basicConfig(level=logging.WARNING)
    methods = parse_methods(args.methods)
    bandwidth = copy_bandwidth()
    result = {"gpu": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(),
              "torch": torch.__version__, "copy_bandwidth_gb_s": bandwidth / 1e9,
              "gemm": gemm_rows(args.m), "memory_bound": memory_bound_rows(bandwidth)}
    gpu = result["gpu"].replace(" ", "_").replace("/", "_")
    path = Path(args.out) / f"cuda_{gpu}_{result['date']}{'_' + args.tag if args.tag else ''}.json"
    save = lambda: save_result(result, path)            # noqa: E731 - after every stage: a capped run keeps its rows
    save()
    if not args.skip_decode:
        model_dir = make_random_llama(Path(args.model_dir))
        result["decode"] = []
        hf = decode_rows(model_dir, bandwidth, args.prompt_len, args.output_len, methods, result["decode"], save)
        if args.offline_requests > 0:
            result["offline"] = []
            offline_rows(model_dir, hf, args.offline_requests, args.offline_prompt_len, args.offline_output_len,
                         result["offline"], save)
    print_tables(result)
    print(f"\nwritten {path}")


def save_result(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
