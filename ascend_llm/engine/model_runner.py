"""Owns the device, the model and the KV cache; turns a SchedulerOutput into sampled tokens."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ascend_llm.config import CacheConfig, ModelConfig
from ascend_llm.distributed.parallel_state import ParallelContext
from ascend_llm.engine.kv_cache import (KVCacheSpec, allocate_kv_caches, kv_cache_storage_dtype,
                                        num_kv_blocks)
from ascend_llm.engine.scheduler import SchedulerOutput
from ascend_llm.engine.sequence import Sequence
from ascend_llm.graph.model_graphs import DecodeGraphs
from ascend_llm.layers.attention import Attention
from ascend_llm.layers.kv_scales import bind_kv_cache_scales, checkpoint_kv_cache_dtype, load_kv_scales_json
from ascend_llm.layers.moe import EXPERT_TENSOR
from ascend_llm.layers.isolated_sampling import sample_isolated
from ascend_llm.layers.sampler import Sampler, SamplerOutput, compute_logprobs
from ascend_llm.loader import iter_safetensors_weights
from ascend_llm.models.forward_batch import ForwardBatch
from ascend_llm.models.hadamard_layers import check_online_hadamard_layers
from ascend_llm.models.registry import get_model_class
from ascend_llm.models.weight_utils import fused_shards, process_weights_after_loading
from ascend_llm.quant.audit import audit_model, check_strict, summary_line
from ascend_llm.ops import AttentionMetadata, build_op_set
from ascend_llm.platform import release_free_heap, resolve_dtype, torch_device
from ascend_llm.quant.registry import get_quant_config

logger = logging.getLogger(__name__)

_PROMPT_LOGITS_ROWS = 256


def cast_to_model_dtype(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                        dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Cast floating checkpoint matrices (dim > 1, not fp8) to the model dtype before loading,
    except those whose destination parameter is declared fp32 (ERNIE's e_score_correction_bias
    [1, E], fp32 routers, fp32 quantization scales): those keep the checkpoint's precision, so a
    bf16 run does not round them to bf16 on the way into an fp32 parameter."""
    keep = fp32_checkpoint_names(model) if dtype != torch.float32 else None
    for name, t in weights:
        if (t.is_floating_point() and t.dim() > 1 and t.dtype.itemsize > 1
                and not (keep is not None and keep(name))):
            t = t.to(dtype)
        yield name, t


def fp32_checkpoint_names(model: nn.Module) -> Callable[[str], bool]:
    """name -> whether checkpoint tensor `name` loads into an fp32 parameter: found by name,
    through the model's packed_modules_mapping (q_proj -> qkv_proj), or as a per-expert tensor
    of a FusedMoE layer (`...experts.{e}.{proj}.{suffix}` -> `w13_{suffix}` / `w2_{suffix}`)."""
    fp32 = {n for n, p in model.named_parameters(remove_duplicate=False) if p.dtype == torch.float32}
    packed = getattr(model, "packed_modules_mapping", {})

    def keep(name: str) -> bool:
        expert = EXPERT_TENSOR.match(name)
        if expert is not None:
            stack = "w2" if expert["proj"] == "down_proj" else "w13"
            return f"{expert['prefix']}.{stack}_{expert['suffix']}" in fp32
        for ckpt_part, (fused_part, _) in packed.items():
            name = name.replace(f".{ckpt_part}.", f".{fused_part}.")
        return name in fp32
    return keep


def last_token_hidden(out: SchedulerOutput, hidden: torch.Tensor) -> dict[int, list[float]]:
    """LAST pooling: the final hidden state of the last prompt token of each `return_embedding` sequence
    whose prompt ends in this step (hidden: [num_tokens, hidden_size], rows in scheduling order)."""
    pooled: dict[int, list[float]] = {}
    row = 0
    for item in out.scheduled:
        seq, start, n = item.seq, item.start_pos, item.num_new_tokens
        last = seq.num_prompt_tokens - 1
        if seq.sampling_params.return_embedding and seq.index == 0 and start <= last < start + n:
            pooled[seq.seq_id] = hidden[row + last - start].float().tolist()
        row += n
    return pooled


def sampling_rows(out: SchedulerOutput) -> list[Sequence]:
    """The sequence each sampled logits row belongs to, in row order. A row that verifies a
    draft sees the sequence as if the drafts before it were accepted (a view with those
    tokens appended), so penalties and min_tokens apply as in plain decoding."""
    rows: list[Sequence] = []
    for item in out.scheduled:
        if not item.do_sample:
            continue
        seq = item.seq
        rows.append(seq)
        for j in range(1, len(item.spec_token_ids) + 1):
            rows.append(Sequence(seq.seq_id, seq.request_id, seq.index, seq.prompt_token_ids,
                                 seq.sampling_params, token_ids=seq.token_ids + item.spec_token_ids[:j]))
    return rows


@dataclass(slots=True)
class PromptLogprobsChunk:
    """Logprobs of prompt tokens first_pos .. first_pos + len(logprobs) - 1 of one sequence."""
    first_pos: int
    logprobs: list[dict[int, float]]
    ranks: list[dict[int, int]]


@dataclass(slots=True)
class ModelRunnerOutput:
    """Sampled tokens (one per sampling sequence), and any prompt logprobs and embeddings, keyed by seq_id."""
    sampler_output: SamplerOutput
    prompt_logprobs: dict[int, PromptLogprobsChunk] = field(default_factory=dict)
    embeddings: dict[int, list[float]] = field(default_factory=dict)


class ModelRunner:
    """Builds the model on `backend`, sizes the paged KV cache, runs forward + sampling.

    Under tensor parallelism (`parallel` with world size > 1) it holds this rank's shard and
    cache; every rank runs `execute_model` on the same SchedulerOutput, only the driver samples.
    """

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, hf_config: Any,
                 model_dir: Path, backend: str, eos_token_ids: set[int],
                 parallel: ParallelContext | None = None) -> None:
        self.backend = backend
        self.parallel = parallel or ParallelContext(backend=backend)
        self.device = self.parallel.device if self.parallel.is_distributed else torch_device(backend)
        self.dtype = resolve_dtype(model_config.dtype, backend, hf_config)
        self.block_size = cache_config.block_size
        self.eos_token_ids = eos_token_ids
        torch.manual_seed(model_config.seed)
        self.kv_cache_dtype = checkpoint_kv_cache_dtype(cache_config.kv_cache_dtype, model_dir)
        self.model = self._load_model(model_config, hf_config, model_dir)
        self._bind_kv_cache(cache_config, hf_config)
        spec = KVCacheSpec.from_hf_config(hf_config, self.block_size,
                                          kv_cache_storage_dtype(self.kv_cache_dtype, self.dtype),
                                          self.parallel.world_size)
        self.num_blocks = self._agreed_num_blocks(num_kv_blocks(spec, cache_config, backend))
        self.kv_caches = allocate_kv_caches(spec, self.num_blocks, self.device)
        self.null_block = self.num_blocks   # the extra zeroed block padding points at
        self.sampler = Sampler(self.ops.get("apply_token_bitmask"))
        self.generators: dict[int, torch.Generator] = {}
        self.decode_graphs: DecodeGraphs | None = None   # set by the engine (graph.model_graphs)

    def _load_model(self, model_config: ModelConfig, hf_config: Any, model_dir: Path) -> nn.Module:
        model_cls = get_model_class(hf_config)
        quant_config = get_quant_config(model_config.quantization, hf_config, model_dir,
                                        fused_shards(model_cls.packed_modules_mapping))
        ops = build_op_set(self.backend)
        self.ops = ops
        extra = {"parallel": self.parallel} if self.parallel.is_distributed else {}
        if extra and not getattr(model_cls, "supports_tensor_parallel", False):
            raise ValueError(f"tensor_parallel_size: {model_cls.__name__} does not support tensor "
                             f"parallelism yet; use tensor_parallel_size 1")
        with torch.device(self.device):
            model = model_cls(hf_config, ops, quant_config, self.dtype, **extra)
        check_online_hadamard_layers(model, quant_config)
        weights = tqdm(iter_safetensors_weights(model_dir), desc="Loading weights", unit="tensor",
                       leave=False)
        model.load_weights(cast_to_model_dtype(model, weights, self.dtype))
        process_weights_after_loading(model)
        self.quant_audit = audit_model(model)
        logger.info("quantization audit on %s: %s", self.backend, summary_line(self.quant_audit))
        if model_config.quantization_strict:
            check_strict(self.quant_audit)
        if self.backend == "cpu":
            release_free_heap()   # loading left hundreds of MiB of freed, still-resident heap
        return model.eval()

    def _bind_kv_cache(self, cache_config: CacheConfig, hf_config: Any) -> None:
        """Give every attention layer its KV-cache kernels and scales (checkpoint, JSON, or
        calculated from the first batch)."""
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        json_scales = None
        if cache_config.quantization_param_path is not None:
            if self.kv_cache_dtype == "auto":
                logger.warning("quantization_param_path is ignored: the KV cache is not quantized "
                               "(kv_cache_dtype auto)")
            else:
                json_scales = load_kv_scales_json(cache_config.quantization_param_path, len(layers),
                                                  getattr(hf_config, "model_type", None),
                                                  self.parallel.rank, self.parallel.world_size)
        bind_kv_cache_scales(layers, self.kv_cache_dtype, cache_config.calculate_kv_scales,
                             json_scales, self.device)

    def _agreed_num_blocks(self, num_blocks: int) -> int:
        """The smallest block count over the ranks (free device memory differs per rank)."""
        if not self.parallel.is_distributed:
            return num_blocks
        count = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
        return int(self.ops.get("all_reduce")(count, self.parallel, "min").item())

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run one step; one sampled token per scheduled sequence with do_sample.

        A non-driver rank runs the same forward and LM-head collectives and returns None.
        """
        graphed = self.decode_graphs.run(out) if self.decode_graphs is not None else None
        if graphed is not None:              # a pure decode step, replayed from its bucket's graph
            hidden, logits = graphed
        else:
            batch = self._prepare(out)
            hidden = self.model(batch)                               # [num_tokens, hidden]
            logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
        if not self.parallel.is_driver:
            self._prompt_logprobs(out, hidden, {})     # same compute_logits calls as the driver
            return None
        seqs = sampling_rows(out)
        result = ModelRunnerOutput(sample_isolated(self.sampler, logits, seqs, self.eos_token_ids,
                                                   self.generators, self.device, out.grammar_bitmask))
        self._prompt_logprobs(out, hidden, result.prompt_logprobs)
        result.embeddings = last_token_hidden(out, hidden)
        return result

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor,
                         result: dict[int, PromptLogprobsChunk]) -> None:
        """Position p's logits score prompt token p + 1 (vLLM's prompt_logprobs)."""
        row = 0
        for item in out.scheduled:
            seq, start, n = item.seq, item.start_pos, item.num_new_tokens
            k = seq.sampling_params.prompt_logprobs
            last = min(start + n, seq.num_prompt_tokens - 1)     # exclusive end of scoring positions
            if k is not None and seq.index == 0 and start < last:
                result[seq.seq_id] = self._score_prompt(seq, hidden, row, start, last, k)
            row += n

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor, row: int, start: int, last: int,
                      k: int) -> PromptLogprobsChunk:
        """Logprobs of prompt tokens start+1..last from hidden rows row..; vocab-wide logits are
        made _PROMPT_LOGITS_ROWS rows at a time to bound memory ([rows, vocab] fp32)."""
        lps: list[dict[int, float]] = []
        ranks: list[dict[int, int]] = []
        for pos in range(start, last, _PROMPT_LOGITS_ROWS):
            end = min(pos + _PROMPT_LOGITS_ROWS, last)
            rows = torch.arange(row + pos - start, row + end - start, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))    # [rows, vocab]
            targets = torch.tensor(seq.token_ids[pos + 1:end + 1], device=self.device)
            chunk_lps, chunk_ranks = compute_logprobs(logits, targets, [k] * (end - pos))
            lps += chunk_lps
            ranks += chunk_ranks
        return PromptLogprobsChunk(start + 1, lps, ranks)

    def _prepare(self, out: SchedulerOutput) -> ForwardBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        logits_indices: list[int] = []
        query_lens, context_lens, block_tables = [], [], []
        bs = self.block_size
        for item in out.scheduled:
            seq, start, end = item.seq, item.start_pos, item.start_pos + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end - len(item.spec_token_ids)])
            input_ids.extend(item.spec_token_ids)
            positions.extend(range(start, end))
            table = seq.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(end - start)
            context_lens.append(end)
            block_tables.append(table)
            if item.do_sample:    # the last token, plus one row per draft
                logits_indices.extend(range(len(input_ids) - item.num_sampled_rows, len(input_ids)))
        meta = AttentionMetadata.build(query_lens, context_lens, block_tables, slot_mapping, bs,
                                       self.null_block, self.device)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        return ForwardBatch(as_tensor(input_ids), as_tensor(positions), meta, self.kv_caches,
                            as_tensor(logits_indices))

    def free_seq_state(self, seq_id: int) -> None:
        """Forget per-sequence sampler state (seeded generators) of a finished sequence."""
        self.generators.pop(seq_id, None)
