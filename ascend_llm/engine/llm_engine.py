"""LLMEngine: add_request / step / abort. step() = schedule -> execute -> update."""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable

from ascend_llm.executor.launch import create_executor, validate_tp_config
from ascend_llm.executor.worker import WorkerSpec
from ascend_llm.engine.arg_utils import EngineArgs
from ascend_llm.engine.kv_cache import fit_max_model_len
from ascend_llm.engine.model_runner import ModelRunner, ModelRunnerOutput
from ascend_llm.engine.request_state import RequestState
from ascend_llm.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from ascend_llm.engine.sequence import Sequence, SequenceStatus
from ascend_llm.engine.structured_output import StructuredOutputManager
from ascend_llm.graph.compile import require_torchair
from ascend_llm.graph.model_graphs import create_decode_graphs
from ascend_llm.layers.sampler import SamplerOutput
from ascend_llm.loader import load_hf_config, load_tokenizer, resolve_model_path
from ascend_llm.models.registry import get_model_class
from ascend_llm.outputs import RequestMetrics, RequestOutput
from ascend_llm.platform import resolve_device
from ascend_llm.quant.kernel_bench import DEFAULT_BATCH_SIZES, KernelBench, bench_model
from ascend_llm.sampling_params import SamplingParams, StructuredOutputsParams
from ascend_llm.spec_decode import accepted_tokens

logger = logging.getLogger(__name__)


class LLMEngine:
    """Continuous-batching engine over one model replica."""

    def __init__(self, args: EngineArgs) -> None:
        model_config, cache_config = args.model_config(), args.cache_config()
        self.cache_config = cache_config
        parallel_config = args.parallel_config()
        device_config = args.device_config()
        self.model_dir = resolve_model_path(model_config.model)
        self.hf_config = load_hf_config(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir, model_config.tokenizer)
        self.max_model_len = _max_model_len(self.hf_config, model_config.max_model_len)
        self.eos_token_ids = _eos_token_ids(self.hf_config, self.tokenizer)
        self.vocab_size = self.hf_config.vocab_size
        self.backend = resolve_device(device_config.device)
        if device_config.torchair_graph and not device_config.enforce_eager:
            require_torchair(self.backend)
        self.served_model_name = model_config.served_model_name or model_config.model
        validate_tp_config(self.hf_config, parallel_config.tensor_parallel_size,
                           get_model_class(self.hf_config))
        # tensor parallelism: worker ranks plus this process as rank 0 (None: one process)
        self.executor = create_executor(parallel_config, WorkerSpec(
            model_config, cache_config, str(self.model_dir), self.backend, frozenset(self.eos_token_ids)))
        if self.executor is None:
            self.model_runner = ModelRunner(model_config, cache_config, self.hf_config, self.model_dir,
                                            self.backend, self.eos_token_ids)
        else:
            self.model_runner = self.executor.driver_runner
        self.max_model_len = fit_max_model_len(self.max_model_len, model_config.max_model_len is not None,
                                               self.model_runner.num_blocks, cache_config.block_size)
        self.scheduler_config = args.scheduler_config(self.max_model_len)
        graph_args = (device_config.enforce_eager, self.scheduler_config.max_num_seqs, self.max_model_len,
                      device_config.torchair_graph)
        if self.executor is None:   # decode ACL / CUDA graphs; under TP every rank captures its own
            self.model_runner.decode_graphs = create_decode_graphs(self.model_runner, *graph_args)
        else:
            self.executor.capture_decode_graphs(*graph_args)
        self.speculative_config = args.speculative()
        self.scheduler = Scheduler(self.scheduler_config, cache_config, self.model_runner.num_blocks,
                                   self.eos_token_ids, self.speculative_config)
        self.structured_output = StructuredOutputManager(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self.step_num_tokens = 0      # tokens computed by the last step (prefill chunks + decodes)
        logger.info("engine ready: %s on %s, max_model_len=%d", self.model_dir, self.backend,
                    self.max_model_len)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                    prompt_token_ids: list[int] | None = None,
                    arrival_time: float | None = None) -> None:
        """Validate and queue a request; raises ValueError naming the bad field."""
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params: expected a SamplingParams instance")
        token_ids = self._prompt_token_ids(prompt, prompt_token_ids)
        self._check_token_constraints(params)
        arrival = time.time() if arrival_time is None else arrival_time
        seqs = [Sequence(next(self._seq_ids), request_id, i, list(token_ids), params, arrival)
                for i in range(params.n)]
        self.structured_output.add_seqs(seqs)     # compiles (or finds cached) the grammar
        self.requests[request_id] = RequestState(request_id, prompt, token_ids, params, seqs,
                                                 RequestMetrics(arrival, num_prompt_tokens=len(token_ids)))
        for seq in seqs:
            self.scheduler.add_seq(seq)

    def _prompt_token_ids(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("prompt: must be a string (or pass prompt_token_ids)")
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        token_ids = list(prompt_token_ids)
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens leave no room to generate within "
                             f"max_model_len={self.max_model_len} (the prompt must be shorter)")
        return token_ids

    def quantization_audit(self) -> list:
        """The per-layer quantization audit of the driver's model (`quant/audit.py`)."""
        return list(getattr(self.model_runner, "quant_audit", []))

    def kernel_bench(self, batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                     clock: Callable[[], float] | None = None) -> KernelBench:
        """Each distinct linear shape of the driver's model timed with its bound kernels against
        the float kernel on this backend (`quant/kernel_bench.py`, `inspect --bench`)."""
        runner = self.model_runner
        return bench_model(runner.model, runner.dtype, self.backend, batch_sizes, clock)

    def _check_token_constraints(self, params: SamplingParams) -> None:
        """logit_bias / allowed_token_ids ids inside the vocabulary; structured outputs not with
        speculative decoding (its drafts would need the grammar matcher rolled back)."""
        vocab = self.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or {}), ("allowed_token_ids", params.allowed_token_ids or [])):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary (vocab size {vocab}; "
                                 f"ids are 0..{vocab - 1})")
        if params.structured_outputs is not None and self.speculative_config is not None:
            raise ValueError("structured_outputs: not supported together with speculative decoding "
                             "(--speculative-config); start the server without it for structured outputs")

    def compile_grammar(self, spec: StructuredOutputsParams) -> None:
        """Compile `spec` into the grammar cache (thread-safe: the async engine calls it off the
        engine loop); ValueError naming structured_outputs if it does not compile."""
        self.structured_output.compile(spec)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown ids are ignored."""
        state = self.requests.pop(request_id, None)
        self.scheduler.abort_request(request_id)
        for seq in state.seqs if state is not None else ():
            self.model_runner.free_seq_state(seq.seq_id)
        if state is not None:
            self.structured_output.release(state.seqs)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns outputs of requests that made progress."""
        out = self.scheduler.schedule()
        self.step_num_tokens = sum(item.num_new_tokens for item in out.scheduled)
        if out.is_empty:
            return []
        now = time.time()
        out.grammar_bitmask = self.structured_output.bitmask(out)
        if self.executor is None:
            result = self.model_runner.execute_model(out)
        else:
            result = self.executor.execute_model(out)
        sampled = result.sampler_output
        first_rows, tokens = _emitted_tokens(out, sampled.sampled_token_ids)
        for request_id, reason in _failed_requests(out, first_rows, sampled.failed_rows).items():
            self._fail_request(request_id, reason)    # before update, which skips finished seqs
        self.scheduler.update(out, tokens)
        self._advance_grammars(out)
        touched: dict[str, RequestState] = {}
        for item, row in zip(out.scheduled, first_rows):
            state = self.requests.get(item.seq.request_id)
            if state is None:
                continue
            if state.error is None:
                self._process_item(state, item, row, result, now)
            touched[state.request_id] = state
        return [self._emit(state) for state in touched.values()]

    def _advance_grammars(self, out: SchedulerOutput) -> None:
        """Feed each grammar sequence's new tokens to its matcher; a terminated grammar finishes
        the sequence (stop), a rejected token fails its request."""
        matchers = self.structured_output
        if not matchers.matchers:
            return
        for item in out.scheduled:
            seq = item.seq
            if item.num_appended == 0 or seq.seq_id not in matchers.matchers:
                continue
            error = matchers.accept(seq, seq.token_ids[-item.num_appended:])
            if error is not None:
                self._fail_request(seq.request_id, error)
            elif matchers.is_terminated(seq) and not seq.is_finished:
                self.scheduler.finish_seq(seq, SequenceStatus.FINISHED_STOPPED)

    def _process_item(self, state: RequestState, item: ScheduledSequence, first_row: int,
                      result: ModelRunnerOutput, now: float) -> None:
        """Record one scheduled item's prompt logprobs and new tokens; a failure here (e.g. in
        detokenization) fails this request only."""
        try:
            _mark_scheduled(state, now)
            chunk = result.prompt_logprobs.get(item.seq.seq_id)
            if chunk is not None:
                state.record_prompt_logprobs(chunk.first_pos, chunk.logprobs, chunk.ranks, self.tokenizer)
            embedding = result.embeddings.get(item.seq.seq_id)
            if embedding is not None:
                state.embedding = embedding
            self._on_tokens(state, item, first_row, result.sampler_output)
        except Exception as exc:
            logger.exception("post-processing failed for request %s", state.request_id)
            self._fail_request(state.request_id, f"post-processing failed: {type(exc).__name__}: {exc}")

    def _fail_request(self, request_id: str, reason: str) -> None:
        """Finish the request with finish_reason "error" and `reason`, freeing its KV blocks;
        the rest of the batch is untouched."""
        state = self.requests.get(request_id)
        if state is None or state.error is not None:
            return
        logger.warning("request %s failed: %s", request_id, reason)
        state.error = reason
        self.scheduler.abort_request(request_id, SequenceStatus.FINISHED_ERROR)
        for seq in state.seqs:
            self.model_runner.free_seq_state(seq.seq_id)
        self.structured_output.release(state.seqs)

    def _on_tokens(self, state: RequestState, item: ScheduledSequence, first_row: int,
                   sampled: SamplerOutput) -> None:
        """Detokenize, record logprobs and check stop strings for each token the step appended
        to item.seq (row first_row + j produced its j-th token); a stop string ends the
        sequence there, dropping any accepted drafts after it."""
        seq = item.seq
        num_before = seq.num_tokens - item.num_appended
        for j in range(item.num_appended):
            row = first_row + j
            stopped = self._on_token(state, seq, seq.token_ids[num_before + j], sampled.logprobs[row],
                                     sampled.ranks[row], num_before + j + 1)
            if stopped:
                del seq.token_ids[num_before + j + 1:]
                break

    def _on_token(self, state: RequestState, seq: Sequence, token: int,
                  logprobs: dict[int, float] | None, ranks: dict[int, int] | None,
                  num_tokens: int) -> bool:
        """Account for one new token (the seq's num_tokens-th); True if a stop string ended it."""
        now = time.time()
        state.metrics.first_token_time = state.metrics.first_token_time or now
        state.metrics.last_token_time = now
        state.metrics.num_generation_tokens += 1
        state.record_logprobs(seq, token, logprobs, ranks, self.tokenizer)
        stop = state.update_text(seq, self.tokenizer, num_tokens)
        if stop is not None:   # also overrides an eos/length finish this same token caused
            self.scheduler.finish_seq(seq, SequenceStatus.FINISHED_STOPPED, stop)
        if seq.is_finished:
            self.model_runner.free_seq_state(seq.seq_id)
        return stop is not None

    def _emit(self, state: RequestState) -> RequestOutput:
        output = state.to_output()
        if output.finished:
            self.requests.pop(state.request_id, None)
            self.structured_output.release(state.seqs)
        return output

    def check_health(self) -> str | None:
        """None when the engine can step, else why not (a tensor-parallel worker died)."""
        return None if self.executor is None else self.executor.check_health()

    def shutdown(self) -> None:
        """Stop tensor-parallel workers and leave the process group (no-op for one process)."""
        if self.executor is not None:
            self.executor.shutdown()

    def stats(self) -> dict[str, Any]:
        """Gauges and counters for metrics endpoints and benchmarks."""
        scheduler, bm = self.scheduler, self.scheduler.block_manager
        return {"num_running": scheduler.num_running, "num_waiting": scheduler.num_waiting,
                "num_unfinished": len(self.requests),
                "kv_cache_usage": scheduler.kv_cache_usage, "num_preemptions": scheduler.num_preemptions,
                "prefix_queries_tokens": bm.num_prefix_queries_tokens,
                "prefix_hit_tokens": bm.num_prefix_hit_tokens,
                "num_free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
                "spec_decode_num_draft_tokens": scheduler.num_draft_tokens,
                "spec_decode_num_accepted_tokens": scheduler.num_accepted_tokens,
                "step_num_tokens": self.step_num_tokens}


def _emitted_tokens(out: SchedulerOutput, sampled: list[int]) -> tuple[list[int], list[list[int]]]:
    """Per scheduled item: its first sampled row, and the tokens it emits (none, the sampled
    token, or for a speculative item the accepted drafts plus one sampled token)."""
    first_rows: list[int] = []
    tokens: list[list[int]] = []
    row = 0
    for item in out.scheduled:
        first_rows.append(row)
        rows = sampled[row:row + item.num_sampled_rows]
        tokens.append(accepted_tokens(item.spec_token_ids, rows) if rows else [])
        row += item.num_sampled_rows
    if row != len(sampled):
        raise ValueError(f"step: the model sampled {len(sampled)} rows for {row} scheduled rows")
    return first_rows, tokens


def _failed_requests(out: SchedulerOutput, first_rows: list[int],
                     failed_rows: dict[int, str]) -> dict[str, str]:
    """request_id -> reason for every request one of whose sampled rows failed."""
    failed: dict[str, str] = {}
    for item, first in zip(out.scheduled, first_rows):
        for row in range(first, first + item.num_sampled_rows):
            if row in failed_rows:
                failed.setdefault(item.seq.request_id, failed_rows[row])
    return failed


def _mark_scheduled(state: RequestState, now: float) -> None:
    if state.metrics.first_scheduled_time is None:
        state.metrics.first_scheduled_time = now
        state.metrics.time_in_queue = now - state.metrics.arrival_time


def _max_model_len(hf_config: Any, requested: int | None) -> int:
    limit = int(getattr(hf_config, "max_position_embeddings", 0) or 2048)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len: {requested} exceeds the model's max_position_embeddings ({limit})")
    return requested


def _eos_token_ids(hf_config: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
