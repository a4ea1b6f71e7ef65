"""Batched token sampler for one engine step (vLLM semantics).

Order of operations on the logits (fp32, on the logits' device):
penalties (repetition, frequency, presence) -> min_tokens mask -> logit_bias ->
allowed_token_ids mask -> grammar bitmask (structured outputs) -> greedy argmax
for greedy rows | temperature -> top-k -> top-p -> min-p -> exponential-race
sampling for random rows. Logprobs are taken from the raw model logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from ascend_llm.ops.cpu_logits import apply_token_bitmask as reference_apply_token_bitmask

if TYPE_CHECKING:
    from ascend_llm.engine.sequence import Sequence
    from ascend_llm.sampling_params import SamplingParams

_NEG_INF = float("-inf")
NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or inf) for this request"
NO_ALLOWED_TOKEN = ("no token is allowed: min_tokens, allowed_token_ids, logit_bias and the "
                    "structured-output grammar together exclude every token")

ApplyTokenBitmask = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class GrammarBitmask:
    """The structured-output masks of one step: bitmask row `rows[seq_id]` constrains the
    sequence `seq_id` (rows of sequences without a grammar are absent)."""
    bitmask: torch.Tensor                      # [num_grammar_seqs, ceil(vocab / 32)] int32, CPU
    rows: dict[int, int]                       # seq_id -> bitmask row


@dataclass
class SamplingMetadata:
    """Per-row sampling tensors for the sequences of one step (row i = seqs[i]).

    Optional tensors are None when no row needs that feature, which is what the
    fast paths key on. Greedy rows carry temperature 1, top_k 0, top_p 1, min_p 0
    so they never trigger the random-sampling transforms.
    """
    temperature: torch.Tensor                 # [num_seqs] fp32
    greedy_mask: torch.Tensor                 # [num_seqs] bool
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None = None         # [num_seqs] int64, 0 = disabled
    max_top_k: int = 0                        # largest top_k of any row (host int, no sync)
    top_p: torch.Tensor | None = None         # [num_seqs] fp32
    min_p: torch.Tensor | None = None         # [num_seqs] fp32
    repetition_penalty: torch.Tensor | None = None  # [num_seqs] fp32
    frequency_penalty: torch.Tensor | None = None   # [num_seqs] fp32
    presence_penalty: torch.Tensor | None = None    # [num_seqs] fp32
    prompt_token_ids: torch.Tensor | None = None    # [num_seqs, max_prompt_len] int64, -1 pad
    output_token_ids: torch.Tensor | None = None    # [num_seqs, max_output_len] int64, -1 pad
    min_tokens_rows: torch.Tensor | None = None     # [num_masked] int64
    min_tokens_cols: torch.Tensor | None = None     # [num_masked] int64 token ids to ban
    bias_rows: torch.Tensor | None = None           # [num_biased] int64 (logit_bias)
    bias_cols: torch.Tensor | None = None           # [num_biased] int64 token ids
    bias_values: torch.Tensor | None = None         # [num_biased] fp32
    allowed_rows: torch.Tensor | None = None        # [num_restricted] int64 rows with allowed_token_ids
    allowed_pair_rows: torch.Tensor | None = None   # [num_pairs] int64 index into allowed_rows
    allowed_pair_cols: torch.Tensor | None = None   # [num_pairs] int64 token ids those rows keep
    token_bitmask: torch.Tensor | None = None       # [num_grammar_rows, num_words] int32
    bitmask_rows: torch.Tensor | None = None        # [num_grammar_rows] int64 rows it constrains
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> generator
    num_logprobs: list[int | None] = field(default_factory=list)         # per row
    need_temperature: bool = False

    @property
    def num_seqs(self) -> int:
        return self.temperature.shape[0]

    @property
    def no_penalties(self) -> bool:
        return (self.repetition_penalty is None and self.frequency_penalty is None
                and self.presence_penalty is None)

    @property
    def has_constraints(self) -> bool:
        return (self.bias_rows is not None or self.allowed_rows is not None
                or self.token_bitmask is not None)

    @property
    def max_num_logprobs(self) -> int | None:
        wanted = [k for k in self.num_logprobs if k is not None]
        return max(wanted) if wanted else None

    @classmethod
    def build(cls, seqs: list["Sequence"], eos_token_ids: Iterable[int] | int | None,
              generators: dict[int, torch.Generator], device: torch.device | str,
              grammar: GrammarBitmask | None = None) -> "SamplingMetadata":
        """Collect the sampling state of `seqs`.

        For every seeded random sequence a generator seeded with
        `seed + seq.index` (so the n outputs of one request differ) is created
        once and kept in `generators[seq.seq_id]`; the caller owns the dict and
        drops entries of finished sequences. `grammar` holds the step's structured-output
        bitmasks by sequence.
        """
        params = [seq.sampling_params for seq in seqs]
        greedy = [p.is_greedy for p in params]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        metadata = cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            greedy_mask=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            need_temperature=any(t != 1.0 for t in temps),
            generators=_row_generators(seqs, generators, device),
            num_logprobs=[p.logprobs for p in params],
        )
        _fill_filters(metadata, params, greedy, device)
        _fill_penalties(metadata, seqs, device)
        _fill_min_tokens(metadata, seqs, _as_id_set(eos_token_ids), device)
        _fill_logit_bias(metadata, params, device)
        _fill_allowed_token_ids(metadata, params, device)
        _fill_grammar(metadata, seqs, grammar, device)
        return metadata


@dataclass
class SamplerOutput:
    """The step's sampled tokens, one per row, plus requested logprobs.

    A row in `failed_rows` (e.g. its logits were NaN / inf) has token -1 and no logprobs;
    the other rows are sampled exactly as if it were not there.

    `logprobs[i]` maps token id -> raw-logits logprob for the sampled token and
    row i's top-k tokens (None when the row asked for none); `ranks[i]` maps the
    same ids to their rank (1 = most likely).
    """
    sampled_token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    ranks: list[dict[int, int] | None]
    sampled_token_tensor: torch.Tensor | None = None   # [num_seqs] int64, on device
    failed_rows: dict[int, str] = field(default_factory=dict)  # row -> why it has no token (-1)


class Sampler(nn.Module):
    """Samples one token per row of `logits` according to `SamplingMetadata`.

    `apply_token_bitmask` is the backend's kernel of the op of that name (the op registry's;
    default the plain-torch reference).
    """

    def __init__(self, apply_token_bitmask: ApplyTokenBitmask | None = None) -> None:
        super().__init__()
        self.apply_token_bitmask = apply_token_bitmask or reference_apply_token_bitmask

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        raw = logits.float()                          # [num_seqs, vocab_size]
        non_finite = ~torch.isfinite(raw.amax(dim=-1))  # [num_seqs]: a NaN / +inf, or all -inf
        processed = apply_penalties(raw, metadata)
        processed = apply_min_tokens(processed, metadata)
        processed, masked = self._constrain(processed, metadata)
        failed_mask = non_finite if masked is None else non_finite | masked
        sampled = sample(processed, metadata).masked_fill(failed_mask, -1)  # [num_seqs] int64
        token_ids = sampled.tolist()
        failed = {row: NON_FINITE_LOGITS if bool(non_finite[row]) else NO_ALLOWED_TOKEN
                  for row, token in enumerate(token_ids) if token < 0}
        num_logprobs = [None if row in failed else k for row, k in enumerate(metadata.num_logprobs)]
        logprobs, ranks = compute_logprobs(raw, sampled, num_logprobs)
        return SamplerOutput(sampled_token_ids=token_ids, logprobs=logprobs, ranks=ranks,
                             sampled_token_tensor=sampled, failed_rows=failed)

    def _constrain(self, logits: torch.Tensor, metadata: SamplingMetadata
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logit_bias, allowed_token_ids and the grammar bitmask; also the rows [num_seqs] bool
        these left without any allowed token (None when none of them applies)."""
        if not metadata.has_constraints:
            return logits, None
        logits = apply_logit_bias(logits, metadata)
        logits = apply_allowed_token_ids(logits, metadata)
        if metadata.token_bitmask is not None:
            logits = self.apply_token_bitmask(logits, metadata.token_bitmask, metadata.bitmask_rows)
        return logits, logits.amax(dim=-1) == _NEG_INF


# ---------------------------------------------------------------- metadata helpers

def _as_id_set(ids: Iterable[int] | int | None) -> set[int]:
    if ids is None:
        return set()
    if isinstance(ids, int):
        return {ids}
    return {int(i) for i in ids}


def _row_generators(seqs: list["Sequence"], generators: dict[int, torch.Generator],
                    device: torch.device | str) -> dict[int, torch.Generator]:
    """row -> persistent generator for seeded random rows (created on first sight)."""
    rows: dict[int, torch.Generator] = {}
    for row, seq in enumerate(seqs):
        params = seq.sampling_params
        if params.seed is None or params.is_greedy:
            continue
        generator = generators.get(seq.seq_id)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed + seq.index)
            generators[seq.seq_id] = generator
        rows[row] = generator
    return rows


def _fill_filters(metadata: SamplingMetadata, params: list["SamplingParams"], greedy: list[bool],
                  device: torch.device | str) -> None:
    """top-k / top-p / min-p tensors, each only if some random row uses it."""
    top_k = [0 if g else p.top_k for p, g in zip(params, greedy)]
    top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
    min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
    if any(k > 0 for k in top_k):
        metadata.top_k = torch.tensor(top_k, dtype=torch.int64, device=device)
        metadata.max_top_k = max(top_k)
    if any(p < 1.0 for p in top_p):
        metadata.top_p = torch.tensor(top_p, dtype=torch.float32, device=device)
    if any(p > 0.0 for p in min_p):
        metadata.min_p = torch.tensor(min_p, dtype=torch.float32, device=device)


def _fill_penalties(metadata: SamplingMetadata, seqs: list["Sequence"],
                    device: torch.device | str) -> None:
    """Penalty tensors and the token-id tables they need, only if some row uses them."""
    params = [seq.sampling_params for seq in seqs]
    rep = [p.repetition_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    use_rep = any(r != 1.0 for r in rep)
    use_out = use_rep or any(f != 0.0 for f in freq) or any(p != 0.0 for p in pres)
    if not use_out:
        return
    if use_rep:
        metadata.repetition_penalty = torch.tensor(rep, dtype=torch.float32, device=device)
        metadata.prompt_token_ids = _pad_token_ids([s.prompt_token_ids for s in seqs], device)
    if any(f != 0.0 for f in freq):
        metadata.frequency_penalty = torch.tensor(freq, dtype=torch.float32, device=device)
    if any(p != 0.0 for p in pres):
        metadata.presence_penalty = torch.tensor(pres, dtype=torch.float32, device=device)
    metadata.output_token_ids = _pad_token_ids([s.output_token_ids for s in seqs], device)


def _pad_token_ids(rows: list[list[int]], device: torch.device | str) -> torch.Tensor:
    """Right-pad with -1 into one [num_rows, max_len] int64 tensor."""
    max_len = max((len(r) for r in rows), default=0)
    padded = [list(r) + [-1] * (max_len - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.int64, device=device).reshape(len(rows), max_len)


def _fill_min_tokens(metadata: SamplingMetadata, seqs: list["Sequence"], eos_ids: set[int],
                     device: torch.device | str) -> None:
    """(row, token) pairs to ban: EOS (unless ignore_eos, as in vLLM where EOS is then
    not a stop token) and stop_token_ids, while a row has < min_tokens outputs."""
    rows: list[int] = []
    cols: list[int] = []
    for row, seq in enumerate(seqs):
        params = seq.sampling_params
        if seq.num_output_tokens >= params.min_tokens:
            continue
        banned = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            banned |= eos_ids
        for token_id in sorted(banned):
            rows.append(row)
            cols.append(token_id)
    if rows:
        metadata.min_tokens_rows = torch.tensor(rows, dtype=torch.int64, device=device)
        metadata.min_tokens_cols = torch.tensor(cols, dtype=torch.int64, device=device)


def _fill_logit_bias(metadata: SamplingMetadata, params: list["SamplingParams"],
                     device: torch.device | str) -> None:
    """(row, token, bias) triples of every row with a logit_bias."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            rows.append(row)
            cols.append(token_id)
            values.append(bias)
    if rows:
        metadata.bias_rows = torch.tensor(rows, dtype=torch.int64, device=device)
        metadata.bias_cols = torch.tensor(cols, dtype=torch.int64, device=device)
        metadata.bias_values = torch.tensor(values, dtype=torch.float32, device=device)


def _fill_allowed_token_ids(metadata: SamplingMetadata, params: list["SamplingParams"],
                            device: torch.device | str) -> None:
    """The rows with allowed_token_ids and the (row, token) pairs they keep."""
    rows = [row for row, p in enumerate(params) if p.allowed_token_ids]
    if not rows:
        return
    pair_rows = [i for i, row in enumerate(rows) for _ in params[row].allowed_token_ids]
    pair_cols = [t for row in rows for t in params[row].allowed_token_ids]
    metadata.allowed_rows = torch.tensor(rows, dtype=torch.int64, device=device)
    metadata.allowed_pair_rows = torch.tensor(pair_rows, dtype=torch.int64, device=device)
    metadata.allowed_pair_cols = torch.tensor(pair_cols, dtype=torch.int64, device=device)


def _fill_grammar(metadata: SamplingMetadata, seqs: list["Sequence"], grammar: GrammarBitmask | None,
                  device: torch.device | str) -> None:
    """The bitmask rows of this step's sequences that have a grammar, moved to `device`."""
    if grammar is None:
        return
    pairs = [(row, grammar.rows[seq.seq_id]) for row, seq in enumerate(seqs) if seq.seq_id in grammar.rows]
    if not pairs:
        return
    rows, mask_rows = zip(*pairs)
    metadata.token_bitmask = grammar.bitmask[list(mask_rows)].to(device)
    metadata.bitmask_rows = torch.tensor(rows, dtype=torch.int64, device=device)


# ---------------------------------------------------------------- logits transforms

def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each vocab id occurs per row; -1 padding and out-of-range ids are dropped."""
    num_rows = token_ids.shape[0]
    valid = (token_ids >= 0) & (token_ids < vocab_size)
    index = torch.where(valid, token_ids, vocab_size)               # [num_rows, len]
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]                                   # [num_rows, vocab_size]


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """vLLM penalties (returns a new tensor):
    repetition: tokens seen in prompt or output get logit/r if > 0 else logit*r;
    frequency: logit -= f * output_count; presence: logit -= p * (output_count > 0)."""
    if metadata.no_penalties:
        return logits
    vocab_size = logits.shape[1]
    output_counts = _token_counts(metadata.output_token_ids, vocab_size)  # [num_seqs, vocab]
    output_seen = output_counts > 0                                       # [num_seqs, vocab]
    if metadata.repetition_penalty is not None:
        prompt_seen = _token_counts(metadata.prompt_token_ids, vocab_size) > 0
        penalty = metadata.repetition_penalty.unsqueeze(1)                # [num_seqs, 1]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(prompt_seen | output_seen, penalised, logits)
    if metadata.frequency_penalty is not None:
        logits = logits - metadata.frequency_penalty.unsqueeze(1) * output_counts
    if metadata.presence_penalty is not None:
        logits = logits - metadata.presence_penalty.unsqueeze(1) * output_seen.float()
    return logits


def apply_min_tokens(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """-inf for the banned (row, token) pairs of rows still below min_tokens."""
    if metadata.min_tokens_rows is None:
        return logits
    num_seqs, vocab_size = logits.shape
    cols = metadata.min_tokens_cols.clamp(max=vocab_size)     # out-of-vocab ids -> spare column
    banned = torch.zeros(num_seqs, vocab_size + 1, dtype=torch.bool, device=logits.device)
    banned[metadata.min_tokens_rows, cols] = True
    return logits.masked_fill(banned[:, :vocab_size], _NEG_INF)


def apply_logit_bias(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Add each row's logit_bias (ids past the logits' width are dropped)."""
    if metadata.bias_rows is None:
        return logits
    vocab_size = logits.shape[1]
    keep = metadata.bias_cols < vocab_size                              # [num_biased]
    index = (metadata.bias_rows[keep], metadata.bias_cols[keep])
    return logits.index_put(index, metadata.bias_values[keep], accumulate=True)


def apply_allowed_token_ids(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """-inf for every token outside a restricted row's allowed_token_ids."""
    if metadata.allowed_rows is None:
        return logits
    num_seqs, vocab_size = logits.shape
    cols = metadata.allowed_pair_cols.clamp(max=vocab_size)            # out-of-vocab ids -> spare column
    allowed = torch.zeros(metadata.allowed_rows.shape[0], vocab_size + 1, dtype=torch.bool,
                          device=logits.device)                         # [num_restricted, vocab + 1]
    allowed[metadata.allowed_pair_rows, cols] = True
    banned = torch.zeros(num_seqs, vocab_size, dtype=torch.bool, device=logits.device)
    banned[metadata.allowed_rows] = ~allowed[:, :vocab_size]
    return logits.masked_fill(banned, _NEG_INF)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return logits / temperature.unsqueeze(1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None, max_top_k: int = 0) -> torch.Tensor:
    """Mask everything outside each row's top-k (ties with the k-th kept) and outside
    the smallest set whose probability reaches top_p (the top token always kept).
    `max_top_k` (largest k of any row) lets top-k alone use topk instead of a sort."""
    if top_k is None and top_p is None:
        return logits
    if top_p is None and max_top_k > 0:
        return _apply_top_k_only(logits, top_k, max_top_k)
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)    # [num_seqs, vocab]
    if top_k is not None:
        keep = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
        kth = sorted_logits.gather(1, (vocab_size - keep).unsqueeze(1))  # [num_seqs, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [num_seqs, vocab]
        drop = cumulative <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """top-k without a full sort: threshold at each row's k-th largest logit."""
    vocab_size = logits.shape[1]
    max_k = min(max_top_k, vocab_size)
    keep = torch.where(top_k > 0, top_k.clamp(max=max_k), 1)       # [num_seqs]
    top_values = logits.topk(max_k, dim=-1).values                  # [num_seqs, max_k]
    kth = top_values.gather(1, (keep - 1).unsqueeze(1))              # [num_seqs, 1]
    disabled = (top_k <= 0).unsqueeze(1)
    kth = kth.masked_fill(disabled, _NEG_INF)
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability."""
    if min_p is None:
        return logits
    probs = logits.softmax(dim=-1)                                   # [num_seqs, vocab]
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, _NEG_INF)


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Draw one token per row with probability `probs` via argmax(p / Exp(1)).

    Seeded rows draw their noise only from their own generator, so their result
    does not depend on the other rows of the batch.
    """
    noise = torch.empty_like(probs)                                  # [num_seqs, vocab]
    if len(generators) < probs.shape[0]:
        noise.exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return probs.div(noise).argmax(dim=-1)


def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Token ids [num_seqs] from processed logits: argmax for greedy rows, random otherwise."""
    if metadata.all_greedy:
        return logits.argmax(dim=-1)
    greedy = None if metadata.all_random else logits.argmax(dim=-1)  # [num_seqs]
    if metadata.need_temperature:
        logits = apply_temperature(logits, metadata.temperature)
    logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p, metadata.max_top_k)
    logits = apply_min_p(logits, metadata.min_p)
    random = exponential_race(logits.softmax(dim=-1), metadata.generators)
    if greedy is None:
        return random
    return torch.where(metadata.greedy_mask, greedy, random)


# ---------------------------------------------------------------- logprobs

def compute_logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor,
                     num_logprobs: list[int | None]
                     ) -> tuple[list[dict[int, float] | None], list[dict[int, int] | None]]:
    """Per row: {token: logprob} and {token: rank} for `token_ids[row]` and the row's
    top-k tokens, from log_softmax(raw_logits). Rows with k None get None.

    Also usable for prompt logprobs (rows = prompt positions, token_ids = next tokens).
    """
    num_rows = len(num_logprobs)
    logprobs: list[dict[int, float] | None] = [None] * num_rows
    ranks: list[dict[int, int] | None] = [None] * num_rows
    wanted = [row for row, k in enumerate(num_logprobs) if k is not None]
    if not wanted:
        return logprobs, ranks
    index = torch.tensor(wanted, dtype=torch.int64, device=raw_logits.device)
    row_logprobs = raw_logits.index_select(0, index).float().log_softmax(dim=-1)
    # row_logprobs: [num_wanted, vocab_size]
    chosen = token_ids.index_select(0, index).unsqueeze(1)           # [num_wanted, 1]
    chosen_logprob = row_logprobs.gather(1, chosen)                  # [num_wanted, 1]
    chosen_rank = (row_logprobs > chosen_logprob).sum(dim=-1) + 1    # [num_wanted]
    max_k = max(num_logprobs[row] for row in wanted)
    top_logprobs, top_ids = row_logprobs.topk(max_k, dim=-1)         # [num_wanted, max_k]
    chosen_ids = chosen.squeeze(1).tolist()
    chosen_lps = chosen_logprob.squeeze(1).tolist()
    chosen_ranks = chosen_rank.tolist()
    top_ids_list, top_lps_list = top_ids.tolist(), top_logprobs.tolist()
    for i, row in enumerate(wanted):
        k = num_logprobs[row]
        lp_dict = {chosen_ids[i]: chosen_lps[i]}
        rank_dict = {chosen_ids[i]: chosen_ranks[i]}
        for position in range(k):
            token = top_ids_list[i][position]
            if token not in lp_dict:
                lp_dict[token] = top_lps_list[i][position]
                rank_dict[token] = position + 1
        logprobs[row], ranks[row] = lp_dict, rank_dict
    return logprobs, ranks
