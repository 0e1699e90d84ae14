"""lm-evaluation-harness model backend ``salt-megatron``: a checkpoint at its own TP/PP, no export.

    lm_eval.simple_evaluate(model="salt-megatron", model_args={"load": "runs/x/ckpt"}, tasks=...)

(``tools/eval_tasks.py`` runs this under torchrun.) Every rank of the job runs lm-eval with the
same arguments; the backend reports rank 0 of a world of 1 to lm-eval, so every rank builds all
requests in the same order. Ranks split the work themselves: the world is TP x PP x DP
(:mod:`.runner` builds the groups), each data-parallel replica runs every DP-th batch, its
forwards are collective over its model-parallel group (TP collectives inside the model, PP
through megatron's forward-only schedule, results broadcast from the last stage), and the
replicas' results are summed (log-likelihoods) or gathered (generations) at the end of each
request list, so every rank returns the full answer to lm-eval.

Requests are handled as lm-eval's ``hf`` backend handles them on an exported model, so that
both give the same numbers: ``TemplateLM._encode_pair`` splits context and continuation
(trailing spaces move to the continuation), an empty context becomes ``prefix_token_id`` (the
tokenizer's BOS, else its EOD), inputs longer than ``max_length`` lose tokens on the left,
``loglikelihood_rolling`` uses lm-eval's disjoint rolling windows of ``max_length`` tokens, and
``generate_until`` decodes greedily until a stop string, the EOD token or ``max_gen_toks``.
Differences: the text is encoded with the checkpoint's own tokenizer (as the training data was;
an exported sentencepiece tokenizer can split a string that *starts* with whitespace
differently), requests are batched by length without the ``hf`` backend's one-token-continuation
cache (the same numbers, more compute), and generation recomputes the whole sequence per token
(no KV cache) and supports greedy decoding only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from salt_megatron.checkpoint.saved import LoadError
from salt_megatron.eval.runner import EvalModel, load_eval_model

Encoded = tuple[Any, list[int], list[int]]
"""lm-eval's tokenized loglikelihood request: (request strings or None, context, continuation)."""


@dataclass(frozen=True)
class _Generation:
    """One generate_until request, tokenized: its context ids, stop strings, token budget."""

    context: list[int]
    until: list[str]
    max_gen_toks: int


@register_model("salt-megatron", "salt_megatron")
class SaltMegatronLM(TemplateLM):
    """Our megatron-core GPT from a checkpoint, as an lm-eval causal LM (every rank builds one).

    ``load``/``step``: the checkpoint root and step (default: the latest). The layout's TP and
    PP divide the world; the rest of the world is data-parallel. ``micro_batch_size``: rows per
    forward (lm-eval's ``batch_size`` is taken as it). ``max_length``: the context window
    (default: the model's ``max_position_embeddings``, as the ``hf`` backend reads from an
    export's ``config.json``). ``prefix_token_id``: the token an empty context becomes.
    ``add_bos_token``: prepend BOS where lm-eval allows special tokens (default off: our
    training data has none). lm-eval's ``max_batch_size`` and ``device`` are ignored: each
    rank runs on its own device (its GPU, or the CPU).
    """

    backend = "causal"

    def __init__(
        self,
        load: str,
        step: int | None = None,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        micro_batch_size: int = 8,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        prefix_token_id: int | None = None,
        add_bos_token: bool = False,
        tokenizer_model: str | None = None,
        tokenizer_type: str | None = None,
        transformer_impl: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size is not None:
            if not str(batch_size).isdigit():
                raise LoadError(f"batch_size {batch_size!r}: salt-megatron needs an int")
            micro_batch_size = int(batch_size)
        if int(micro_batch_size) < 1 or int(max_gen_toks) < 1:
            raise LoadError("--micro-batch-size and --max-gen-toks must be >= 1")
        self.model: EvalModel = load_eval_model(
            load, None if step is None else int(step), int(tensor_model_parallel_size),
            int(pipeline_model_parallel_size), tokenizer_model, tokenizer_type, transformer_impl,
        )  # fmt: skip
        self.tok = tok = self.model.tokenizer
        self.micro_batch_size = int(micro_batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length or self.model.max_position_embeddings)
        self._prefix = None if prefix_token_id is None else int(prefix_token_id)
        self.add_bos_token = bool(add_bos_token)
        self._special = {i for i in (tok.unk, tok.bos, tok.eod, tok.pad) if i >= 0}
        self._eos_text = str(tok.inv_vocab.get(self.eot_token_id, ""))

    # ---- what lm-eval asks -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """The end-of-document token (the tokenizer's EOS), as the ``hf`` backend's EOS."""
        return int(self.tok.eod)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: the override, else BOS if any, else the EOD."""
        if self._prefix is not None:
            return self._prefix
        return int(self.tok.bos) if self.tok.bos >= 0 else self.eot_token_id

    @property
    def max_length(self) -> int:
        """Tokens per forward (the rolling window; contexts are cut to fit)."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """Default token budget of a generation (a task's ``max_gen_toks`` wins)."""
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        """Identifies the tokenizer in lm-eval's caches."""
        return f"salt-megatron-{self.tok.fingerprint[:16]}"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Text -> ids with the checkpoint's tokenizer; BOS only with ``add_bos_token``."""
        ids = list(self.tok.tokenize(string))
        if self.add_bos_token and add_special_tokens is not False and self.tok.bos >= 0:
            ids = [int(self.tok.bos), *ids]
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        """Ids -> text without the special tokens (unk, bos, eod, pad), as the ``hf`` backend's
        ``skip_special_tokens=True``."""
        return str(self.tok.detokenize([i for i in ids if i not in self._special]))

    def loglikelihood(  # type: ignore[override]
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """lm-eval's tokenization of (context, continuation) pairs, its bar on rank 0 only."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not _global_rank0())

    # ---- batches -----------------------------------------------------------------------------
    def _mine(self, batches: list[list[int]]) -> list[list[int]]:
        """The batches this data-parallel replica runs: every DP-th one."""
        lay = self.model.layout
        return batches[lay.dp_rank :: lay.dp]

    def _progress(self, total: int, desc: str, disable: bool) -> tqdm:
        return tqdm(total=total, desc=desc, disable=disable or not _global_rank0())

    def _batches(self, keys: list[Any]) -> list[list[int]]:
        """Indices sorted by ``keys`` (longest first, as lm-eval's ``Collator``), in batches."""
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        step = self.micro_batch_size
        return [order[i : i + step] for i in range(0, len(order), step)]

    def _pad(self, seqs: list[list[int]]) -> torch.Tensor:
        """Right-padded ``[b, s]`` int64 on the device (padding: the EOD id)."""
        width = max(len(s) for s in seqs)
        rows = [s + [self.eot_token_id] * (width - len(s)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int64).to(self._dev())

    def _dev(self) -> torch.device:
        from salt_megatron.runtime import device

        return device()

    # ---- loglikelihood -------------------------------------------------------------------------
    def _loglikelihood_tokens(  # type: ignore[override]
        self, requests: list[Encoded], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding gives the continuation)."""
        rows = [self._scored_row(ctx, cont) for _, ctx, cont in requests]
        keys = [(-len(ctx) - len(cont), tuple(ctx + cont)) for _, ctx, cont in requests]
        results_n2 = torch.zeros(len(rows), 2, dtype=torch.float64, device=self._dev())
        pbar = self._progress(len(rows), "salt-megatron loglikelihood", disable_tqdm)
        for batch in self._mine(self._batches(keys)):
            out_b2 = self.model.score(*self._scoring_batch([rows[i] for i in batch]))
            results_n2[torch.tensor(batch, device=self._dev())] = out_b2
            pbar.update(len(batch) * self.model.layout.dp)
        pbar.close()
        lay = self.model.layout
        if lay.dp > 1:
            dist.all_reduce(results_n2, group=lay.dp_group)  # each row from one replica
        answers = [(float(lp), bool(g)) for lp, g in results_n2.tolist()]  # one host read
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def _scoring_batch(
        self, rows: list[tuple[list[int], list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens_bs, rows_n, cols_n, targets_n)`` for :meth:`EvalModel.score`: each row's
        targets are predicted at its last ``len(targets)`` input positions."""
        rows_n: list[int] = []
        cols_n: list[int] = []
        targets_n: list[int] = []
        for r, (inputs, targets) in enumerate(rows):
            start = len(inputs) - len(targets)
            rows_n += [r] * len(targets)
            cols_n += range(start, len(inputs))
            targets_n += targets
        dev = self._dev()
        return (
            self._pad([inputs for inputs, _ in rows]),
            torch.tensor(rows_n, device=dev),
            torch.tensor(cols_n, device=dev),
            torch.tensor(targets_n, device=dev),
        )

    def _scored_row(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """(input ids, scored targets): the last ``max_length + 1`` tokens, minus the last as
        input (the ``hf`` backend's left truncation)."""
        if not ctx or not cont or len(cont) > self.max_length:
            raise LoadError(
                f"a request with {len(ctx)} context and {len(cont)} continuation tokens cannot be "
                f"scored in a window of {self.max_length} (--max-length)"
            )
        whole = (ctx + cont)[-(self.max_length + 1) :]
        return whole[:-1], cont

    def loglikelihood_rolling(  # type: ignore[override]
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[float]:
        """Log-likelihood of whole texts over disjoint windows of ``max_length`` tokens."""
        windows: list[Encoded] = []
        owners: list[int] = []
        for k, (text,) in enumerate(req.args for req in requests):
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            for ctx, cont in map(make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owners.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, scores):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------------
    def _plan(self, context: str, gen_kwargs: dict[str, Any]) -> _Generation:
        """Tokenize a request and read its stop strings and budget (greedy only)."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
            raise LoadError(
                f"generation arguments {gen_kwargs}: the salt-megatron backend decodes greedily "
                "(do_sample false, temperature 0)"
            )
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self._eos_text or None)
        budget = int(kwargs["max_gen_toks"])
        room = self.max_length - budget
        if room <= 0:
            raise LoadError(f"max_gen_toks {budget} leaves no context in {self.max_length} tokens")
        return _Generation(self.tok_encode(context)[-room:], until, budget)

    def generate_until(  # type: ignore[override]
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[str]:
        """Greedy continuations, cut at the first stop string (the EOD token ends one too)."""
        args = [req.args for req in requests]
        plans = [self._plan(ctx, dict(kw)) for ctx, kw in args]
        keys = [(-len(p.context), ctx) for p, (ctx, _) in zip(plans, args)]
        done: dict[int, str] = {}
        pbar = self._progress(len(plans), "salt-megatron generate_until", disable_tqdm)
        for batch in self._mine(self._batches(keys)):
            done.update(zip(batch, self._generate([plans[i] for i in batch])))
            pbar.update(len(batch) * self.model.layout.dp)
        pbar.close()
        lay = self.model.layout
        if lay.dp > 1:
            parts: list[Any] = [None] * lay.dp
            dist.all_gather_object(parts, done, group=lay.dp_group)
            done = {k: v for part in parts for k, v in part.items()}
        out = [done[i] for i in range(len(plans))]
        for (ctx, kw), text in zip(args, out):
            self.cache_hook.add_partial("generate_until", (ctx, kw), text)
        return out

    def _generate(self, plans: list[_Generation]) -> list[str]:
        """One batch: every row decoded greedily until it stops (finished rows leave the batch).

        Reads each step's ids on the host: the stop strings are text.
        """
        made: list[list[int]] = [[] for _ in plans]
        active = list(range(len(plans)))
        while active:
            seqs = [plans[i].context + made[i] for i in active]
            last_b = torch.tensor([len(s) - 1 for s in seqs], device=self._dev())
            ids = self.model.next_ids(self._pad(seqs), last_b).tolist()
            still = []
            for i, token in zip(active, ids):
                if token == self.eot_token_id:
                    continue
                made[i].append(int(token))
                text = self.tok_decode(made[i])
                if len(made[i]) < plans[i].max_gen_toks and not any(
                    stop and stop in text for stop in plans[i].until
                ):
                    still.append(i)
            active = still
        return [_cut(self.tok_decode(ids), plan.until) for ids, plan in zip(made, plans)]


def _global_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string (lm-eval's post-processing)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
