"""Scoring engine: summed completion log-probs of chosen and rejected under one causal LM, batched and exact.

Three layouts give the same numbers (to fp32 rounding):

- ``"prefix"`` (default): one row per pair, ``[prompt, chosen, rejected]``, with a 4D attention mask that keeps the
  rejected tokens from seeing the chosen ones and restarts their positions at the prompt length. The prompt is run
  through the model once for both responses.
- ``"packed"``: the same pair segments, several to a row of fixed length, under a FlexAttention block mask
  (``prefdiag.flex``) that skips the blocks no query may see; for GPUs. If the model or torch cannot run it, the
  first batch falls back to ``"prefix"`` with a warning.
- ``"separate"``: two rows per pair, ``prompt + chosen`` and ``prompt + rejected``, exactly the sequences TRL's
  DPOTrainer builds. It is the reference layout the fast one is tested against.

Only the hidden states that predict a completion token go through the LM head, in chunks, with the log-softmax taken
in fp32 and the per-token log-probs summed in fp64: no ``[batch, seq, vocab]`` logits tensor ever exists.

Masks follow the model's attention: sliding-window layers (Mistral, Phi-3, Gemma 2/3, Qwen2 with windows) get the
window in their mask, per layer type. A model these masks cannot describe (layers that are not attention, as in
Mamba and hybrids; ALiBi, as in Bloom and MPT) is scored in TRL's own way, separate right-padded rows with a 2D
padding mask, whatever the layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prefdiag import flex
from prefdiag.ches import ResponseSums
from prefdiag.engine_checks import (
    last_hidden_and_logits,
    logits_close,
    model_name,
    name_non_finite_weights,
    refuse_rows_beyond_memory,
    takes_logits_to_keep,
)
from prefdiag.errors import RunError, first_line
from prefdiag.lm_head import LMHead, logps_from_logits
from prefdiag.options import BATCH_TOKENS
from prefdiag.masks import attention_windows, dense_masks  # noqa: F401  (attention_windows: re-exported)
from prefdiag.rows import (  # noqa: F401  (LAYOUTS, pack_rows, next_batch: re-exported)
    _CHOSEN,
    _PAD,
    _REJECTED,
    LAYOUTS,
    _longest_first,
    _Row,
    build_rows,
    next_batch,
    pack_rows,
)
from prefdiag.tokenization import TokenizedPairs

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ScoreSettings:
    """How to batch the work; none of it changes the numbers."""

    batch_tokens: int = BATCH_TOKENS["cpu"]  # padded tokens per forward pass (rows x longest row)
    layout: str = "prefix"
    pack_tokens: int = 4096  # "packed": the row length (at least the longest pair, at most batch_tokens)
    padding_side: str = "right"
    head_chunk_bytes: int = 256 * 2**20  # upper bound for one fp32 logits chunk
    ches: bool = False  # also sum the hidden states of each response: extras "ches" and "ches_norm" (prefdiag.ches)


class LogProbScorer:
    """Computes summed completion log-probs for rows with one causal LM (any Hugging Face architecture)."""

    def __init__(self, model: torch.nn.Module, settings: ScoreSettings | None = None) -> None:
        self.model = model
        self.settings = settings or ScoreSettings()
        self.body = model.base_model if model.base_model is not model else None
        self.head = model.get_output_embeddings()
        self.lm_head = LMHead(model, self.settings.head_chunk_bytes) if self.head is not None else None
        self.attn_implementation = getattr(model.config, "_attn_implementation", "eager") or "eager"
        self.device = model.get_input_embeddings().weight.device  # where inputs go; a sharded model ends elsewhere
        self.use_full_forward = self.body is None or self.head is None
        self.windows = attention_windows(model)
        if self.windows is None and self.settings.layout != "separate":
            log.info("%s builds its own attention masks: scoring separate rows", type(model).__name__)
            self.settings = dataclasses.replace(self.settings, layout="separate")
        if self.settings.layout == "packed" and not flex.available():
            log.warning("this torch has no FlexAttention (torch >= 2.5): using the prefix layout")
            self.settings = dataclasses.replace(self.settings, layout="prefix")
        elif self.settings.layout == "packed" and not flex.compiles_on(self.device.type):
            log.info("the packed layout is meant for CUDA; on %s its attention runs unfused and slowly", self.device)
        self._checked_head = False
        self._checked_weights = False
        self.batches_done = 0
        self.first_batch_seconds = 0.0
        self.tokens = {"real": 0, "computed": 0}  # model inputs: real tokens, and real plus padding
        self.pack_length = 0
        self.extras: dict[str, np.ndarray] = {}  # further per-pair float64 columns (NaN where unscored)

    # -- public -------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(
        self,
        tokenized: TokenizedPairs,
        progress: Callable[[int], None] | None = None,
        pairs: Sequence[int] | None = None,
        on_pairs_done: Callable[[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (chosen_logp, rejected_logp) per pair as float64 arrays; NaN for pairs TRL would drop and for
        pairs not in ``pairs``. ``on_pairs_done(indices, chosen, rejected, extras)`` is called as pairs finish;
        ``extras`` maps the name of each further per-pair column the engine computed to its values for ``indices``
        (empty when there is none); after the run, ``self.extras`` holds those columns for every pair."""
        rows = build_rows(tokenized, "prefix" if self.settings.layout == "packed" else self.settings.layout, pairs)
        totals = np.zeros(2 * len(tokenized), dtype=np.float64)
        # Identical completions have identical log-probs by definition: make the tie exact (ties count as wrong,
        # as in TRL), rather than a 1e-6 margin from summation order deciding which side "wins".
        same = tokenized.tied
        rows_left = np.bincount([row.pair for row in rows], minlength=len(tokenized))
        self.extras = {}
        sums = ResponseSums() if self.settings.ches else None
        if sums is not None:
            self.extras = {"ches": np.full(len(tokenized), np.nan), "ches_norm": np.full(len(tokenized), np.nan)}
        if rows:
            dense = self.windows is not None and self.settings.layout != "packed"
            refuse_rows_beyond_memory(self.model, rows, self.device, dense_mask=dense,
                                      full_logits=self.use_full_forward)
        if not self._checked_head and rows and not self._checks_on_first_batch():
            self._check_head_path(rows[0])  # a model without logits_to_keep: four small forward passes
        batches = self._plan(rows, _longest_first(rows))  # longest first: an out-of-memory comes early
        done_batches = 0
        while done_batches < len(batches):
            bins = batches[done_batches]
            started = time.perf_counter()
            try:
                values, slots, hidden_sums = self._forward([[rows[k] for k in b] for b in bins])
            except Exception as exc:
                self._recover(exc, sum(map(len, bins)), max(sum(len(rows[k].input_ids) for k in b) for b in bins))
                batches = self._plan(rows, _longest_first(rows, batches[done_batches:]))  # the rest, re-planned
                done_batches = 0
                continue
            if not self.batches_done:  # on CUDA the packed layout compiles its attention kernel here
                self.first_batch_seconds = time.perf_counter() - started
                if self.settings.layout == "packed" and flex.compiles_on(self.device.type):
                    log.info("first batch, compiling the attention kernel included: %.1f s", self.first_batch_seconds)
            done_batches += 1
            self.batches_done += 1
            if not self._checked_weights and not np.isfinite(values).all():
                self._checked_weights = True  # NaN weights are named; other non-finite pairs go on, to be flagged
                name_non_finite_weights(self.model)
                log.warning("%s: some log-probs are NaN or inf", model_name(self.model))
            np.add.at(totals, slots, values)
            batch_pairs = np.array([rows[k].pair for b in bins for k in b])
            np.subtract.at(rows_left, batch_pairs, 1)
            done = np.unique(batch_pairs[rows_left[batch_pairs] == 0])
            tied = done[same[done]]
            totals[2 * tied + 1] = totals[2 * tied]  # before anything is saved: a cached tie stays a tie
            if sums is not None:
                sums.add(*hidden_sums)
                self.extras["ches"][done], self.extras["ches_norm"][done] = sums.finish(done, same[done])
            if on_pairs_done is not None and len(done):
                done_extras = {name: values[done] for name, values in self.extras.items()}
                on_pairs_done(done, totals[2 * done], totals[2 * done + 1], done_extras)
            if progress is not None:
                progress(len(done))
        chosen, rejected = totals[0::2].copy(), totals[1::2].copy()
        unscored = tokenized.dropped.copy()
        if pairs is not None:
            selected = np.zeros(len(tokenized), dtype=bool)
            selected[np.asarray(pairs, dtype=np.int64)] = True
            unscored |= ~selected
        chosen[unscored] = np.nan
        rejected[unscored] = np.nan
        return chosen, rejected

    # -- internals ----------------------------------------------------------------------------------------------

    def _plan(self, rows: list[_Row], order: list[int]) -> list[list[list[int]]]:
        """Batches of bins of row indices: a bin is one model row (one pair, or several when packed)."""
        if not order:
            return []
        if self.settings.layout != "packed":
            batches, start = [], 0
            while start < len(order):
                batch = next_batch(rows, order, start, self.settings.batch_tokens)
                batches.append([[k] for k in batch])
                start += len(batch)
            return batches
        lengths = [len(row.input_ids) for row in rows]
        block = flex.BLOCK_SIZE
        longest = -(-max(lengths[k] for k in order) // block) * block
        compiled = flex.compiles_on(self.device.type)
        self.pack_length = longest  # unfused attention costs the square of the row length: short rows
        if compiled:
            self.pack_length = max(longest, min(self.settings.pack_tokens, self.settings.batch_tokens) // block * block)
        per_batch = max(1, self.settings.batch_tokens // self.pack_length)
        bins = pack_rows(lengths, order, self.pack_length)
        batches = [bins[k : k + per_batch] for k in range(0, len(bins), per_batch)]
        if compiled:  # one batch shape for the whole run: the compiled kernel is reused
            batches[-1] = batches[-1] + [[] for _ in range(per_batch - len(batches[-1]))]
        return batches

    def _recover(self, exc: Exception, batch_rows: int, row_length: int) -> None:
        """Change the settings so that the failed batch can be retried, or re-raise: an out-of-memory halves the
        budget; a packed layout that fails on its first batch gives way to the prefix layout."""
        if isinstance(exc, torch.OutOfMemoryError):
            self._shrink_after_oom(batch_rows, row_length)
        elif self.settings.layout == "packed" and not self.batches_done:
            reason = first_line(exc, with_type=True)
            log.warning("the packed layout cannot run here (%s); using the prefix layout", reason)
            self.settings = dataclasses.replace(self.settings, layout="prefix")
        else:
            raise exc

    def _shrink_after_oom(self, batch_rows: int, row_length: int) -> None:
        """Halve the token budget after an out-of-memory batch of ``batch_rows`` pair rows (the batch is retried, no
        pair is lost)."""
        if batch_rows == 1:
            raise RunError(
                f"out of memory scoring a single sequence of {row_length} tokens",
                hint="use --max-length, a smaller --dtype, or a device with more memory",
            )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        budget = max(1, min(self.settings.batch_tokens, batch_rows * row_length) // 2)
        self.settings = dataclasses.replace(self.settings, batch_tokens=budget)
        log.warning("out of memory on a batch of %d rows; batch budget now %d tokens", batch_rows, budget)

    def _forward(self, bins: list[list[_Row]]) -> tuple[np.ndarray, np.ndarray, tuple | None]:
        """One padded forward pass over model rows, each holding the rows of one bin back to back; returns
        per-token log-probs (fp32 -> float64), their output slots, and with ``ches`` (slots, the float64 sums [k, D]
        of the hidden states that predict each slot's tokens, their token counts), else None."""
        packed = self.settings.layout == "packed"
        batch = len(bins)
        if packed:
            length = self.pack_length
        else:
            length = max(sum(len(r.input_ids) for r in b) for b in bins)
            if self.device.type == "cuda":
                length = -(-length // 8) * 8  # aligned rows: tensor-core friendly, and the masked SDPA kernel wants it
        ids = np.zeros((batch, length), dtype=np.int64)
        pos = np.zeros((batch, length), dtype=np.int64)
        seg = np.full((batch, length), _PAD, dtype=np.int64)
        docs = np.full((batch, length), -1, dtype=np.int64)
        flat_predict, targets, slots = [], [], []
        left = self.settings.padding_side == "left" and self.windows is not None and not packed
        for b, rows in enumerate(bins):
            offset = length - sum(len(r.input_ids) for r in rows) if left else 0
            for row in rows:
                at = slice(offset, offset + len(row.input_ids))
                ids[b, at], pos[b, at], seg[b, at] = row.input_ids, row.position_ids, row.segments
                docs[b, at] = row.pair
                flat_predict.append(row.predict_at + b * length + offset)
                targets.append(row.targets)
                slots.append(row.slots)
                offset = at.stop
        device = self.device
        input_ids = torch.from_numpy(ids).to(device)
        self.tokens["real"] += int((seg != _PAD).sum())
        self.tokens["computed"] += batch * length
        attention = contextlib.nullcontext
        position_ids = None
        if self.windows is None:  # the model masks itself, as in TRL: right padding and a 2D padding mask
            mask = torch.from_numpy(seg != _PAD).to(device=device, dtype=torch.long)
        else:
            position_ids = torch.from_numpy(pos).to(device)
            segments, docs_t = torch.from_numpy(seg).to(device), torch.from_numpy(docs).to(device)
            if packed:
                mask = flex.block_masks(docs_t, segments, position_ids, self.windows, _CHOSEN, _REJECTED)
                attention = lambda: flex.attention_switched_on(self.model)  # noqa: E731
            else:
                dtype = next(self.model.parameters()).dtype
                mask = dense_masks(docs_t, segments, position_ids, self.windows, self.attn_implementation, dtype)
        positions = {} if position_ids is None else {"position_ids": position_ids}
        flat_predict_t = torch.from_numpy(np.concatenate(flat_predict)).to(device)
        targets_t = torch.from_numpy(np.concatenate(targets)).to(device)
        slots_np = np.concatenate(slots)
        hidden_sums = None
        if self.settings.ches:  # each slot's local index in this batch: the rows of its sum
            ches_slots, local, counts = np.unique(slots_np, return_inverse=True, return_counts=True)
            hidden_sums = (ches_slots, torch.from_numpy(local.astype(np.int64)), counts)

        hidden = None
        if not self.use_full_forward and not self._checked_head:  # the first batch checks the head path
            with attention():
                hidden = self._checked_hidden(input_ids, mask, positions)
        if self.use_full_forward:
            with attention(), self._head_inputs_captured(hidden_sums is not None) as captured:
                out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, **positions,
                                 **({"output_hidden_states": True} if captured.get("fallback") else {}))
            logits = out.logits
            selected = logits.reshape(batch * length, -1)[flat_predict_t.to(logits.device)]
            token_logps = logps_from_logits(selected, targets_t.to(logits.device))
            if hidden_sums is not None:
                hidden = captured["input"] if "input" in captured else out.hidden_states[-1]
                selected = hidden.reshape(batch * length, -1)[flat_predict_t.to(hidden.device)]
                hidden_sums = self._summed(selected, *hidden_sums)
        else:
            if hidden is None:
                with attention():
                    hidden = self.body(
                        input_ids=input_ids, attention_mask=mask, use_cache=False, **positions
                    ).last_hidden_state
            head_device = self.head.weight.device
            selected = hidden.reshape(batch * length, -1)[flat_predict_t.to(hidden.device)].to(head_device)
            token_logps = self.lm_head.logps(selected, targets_t.to(head_device))
            if hidden_sums is not None:
                hidden_sums = self._summed(selected, *hidden_sums)
        return token_logps.double().cpu().numpy(), slots_np, hidden_sums

    @contextlib.contextmanager
    def _head_inputs_captured(self, wanted: bool):
        """Within the block, ``captured["input"]`` is the tensor the LM head was called on (the last hidden states
        after the final norm); ``captured["fallback"]`` is True where no head module can be hooked, so that the
        caller asks the model for its hidden states instead."""
        captured: dict = {}
        if not wanted:
            yield captured
            return
        if self.head is None:
            captured["fallback"] = True
            yield captured
            return

        def keep(module, args, kwargs):
            captured.setdefault("input", args[0] if args else next(iter(kwargs.values())))

        handle = self.head.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield captured
        finally:
            handle.remove()

    def _summed(self, selected: torch.Tensor, slots: np.ndarray, local: torch.Tensor, counts: np.ndarray) -> tuple:
        """(slots, float64 sums [k, D], counts) of the selected hidden states [N, D] by local slot index, added in
        chunks with index_add (fp64, fp32 on devices without it): no copy of the whole selection."""
        dtype = torch.float32 if selected.device.type == "mps" else torch.float64
        sums = torch.zeros(len(slots), selected.shape[1], dtype=dtype, device=selected.device)
        local = local.to(selected.device)
        chunk = max(1, self.settings.head_chunk_bytes // (8 * selected.shape[1]))
        for start in range(0, selected.shape[0], chunk):
            sums.index_add_(0, local[start : start + chunk], selected[start : start + chunk].to(dtype))
        return slots, sums.double().cpu().numpy(), counts

    def _check_head_path(self, row: _Row) -> None:
        """Check once that body + head reproduces the model's own logits; if not, fall back to full forwards.
        Non-finite logits name the model: as a ModelError when its weights hold NaN/inf, else a warning (the run
        goes on and the affected pairs come out non-finite)."""
        self._checked_head = True
        if self.use_full_forward:
            return
        n = min(len(row.input_ids), 16)
        ids = torch.from_numpy(row.input_ids[:n][None]).to(self.device)
        full = self.model(input_ids=ids, use_cache=False).logits[0].float()
        if not bool(torch.isfinite(full).all()):
            name_non_finite_weights(self.model)
            log.warning("%s gives NaN/inf logits on the first pair; such pairs come out non-finite",
                        model_name(self.model))
            return
        hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state[0]
        ours = self.lm_head.logits(hidden.to(self.head.weight.device)).to(full.device)
        if not logits_close(full, ours, self.head.weight.dtype):
            self._head_path_differs()

    def _checks_on_first_batch(self) -> bool:
        """True when the head path can be checked within the first batch's own forward pass (the model takes
        ``logits_to_keep``, so that its logits cost one position per row): no extra forward pass."""
        return not self.use_full_forward and takes_logits_to_keep(self.model)

    def _checked_hidden(self, input_ids: torch.Tensor, mask, positions: dict) -> torch.Tensor | None:
        """The body's last hidden states for a batch, from one forward pass of the whole model that also checks,
        on each row's last position, that body + head reproduces the model's own logits. None, and full forward
        passes from now on, where it does not (or where the body's output cannot be seen)."""
        self._checked_head = True
        hidden, full = last_hidden_and_logits(self.model, self.body, input_ids, mask, positions)
        if hidden is None:
            return self._head_path_differs()
        if not bool(torch.isfinite(full).all()):
            name_non_finite_weights(self.model)
            log.warning("%s gives NaN/inf logits on the first batch; such pairs come out non-finite",
                        model_name(self.model))
            return hidden
        ours = self.lm_head.logits(hidden[:, -1].to(self.head.weight.device)).to(full.device)
        return hidden if logits_close(full, ours, self.head.weight.dtype) else self._head_path_differs()

    def _head_path_differs(self) -> None:
        log.warning(
            "%s: hidden-state + LM-head path does not reproduce the model's logits; using full forward passes",
            type(self.model).__name__,
        )
        self.use_full_forward = True
