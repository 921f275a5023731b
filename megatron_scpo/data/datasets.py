"""Prompt datasets: JSONL/Parquet files or the synthetic task, behind one ``PromptRecord`` interface.

Bad files fail fast with the file and line (JSONL) or row (Parquet) named, before any training starts.
``PromptIterator`` is the trainer's data order: a per-epoch seeded shuffle whose position is part of
the checkpoint, so a resumed run sees exactly the prompts an uninterrupted run would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_scpo.data import synthetic, templates
from megatron_scpo.data.answers import ALT_SEP
from megatron_scpo.data.config import DataConfig, SyntheticConfig
from megatron_scpo.data.formats import FormatError, convert_row, iter_jsonl

PROBLEM_KEYS = ("problem", "question", "prompt", "query", "input")
ANSWER_KEYS = ("answer", "gold", "ground_truth", "label", "solution", "target")
ID_KEYS = ("id", "uid", "idx", "unique_id")


class DataError(ValueError):
    """A bad dataset file: the message names the file and the line/row."""


@dataclass
class PromptRecord:
    """One prompt: problem text, gold answer text, and free-form metadata (difficulty, traces, source)."""

    id: str
    problem: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def _pick_key(row: dict, explicit: str | None, candidates: Sequence[str], what: str, where: str) -> str:
    if explicit is not None:
        if explicit not in row:
            raise DataError(f"{where}: missing {what} field {explicit!r} (fields: {sorted(row)})")
        return explicit
    for k in candidates:
        if k in row:
            return k
    raise DataError(f"{where}: missing {what} field; expected one of {list(candidates)} (fields: {sorted(row)})")


def _record(row: Any, index: int, where: str, problem_key: str | None, answer_key: str | None,
            id_key: str | None, fmt: str = "jsonl") -> PromptRecord:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fmt != "jsonl":
        try:
            row = convert_row(row, fmt)
        except FormatError as e:
            raise DataError(f"{where}: {e} (data.format: {fmt})") from None
        problem_key, answer_key, id_key = "problem", "answer", ("id" if "id" in row else None)
    pk = _pick_key(row, problem_key, PROBLEM_KEYS, "problem", where)
    ak = _pick_key(row, answer_key, ANSWER_KEYS, "answer", where)
    problem, answer = row[pk], row[ak]
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: field {pk!r} must be a non-empty string, got {problem!r}")
    if isinstance(answer, list):  # alternative gold answers: any of them is correct (answers.ALT_SEP)
        if not answer or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) and str(a).strip()
                                 for a in answer):
            raise DataError(f"{where}: field {ak!r} must be a non-empty list of non-empty strings, got {answer!r}")
        answer = ALT_SEP.join(str(a).strip() for a in answer)
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise DataError(f"{where}: field {ak!r} must be a non-empty string or number, got {answer!r}")
    ik = id_key if id_key is not None else next((k for k in ID_KEYS if k in row), None)
    if id_key is not None and id_key not in row:
        raise DataError(f"{where}: missing id field {id_key!r}")
    rid = str(row[ik]) if ik is not None else str(index)
    meta = {k: v for k, v in row.items() if k not in (pk, ak, ik)}
    return PromptRecord(rid, problem, str(answer), meta)


def load_prompts(path: str | Path, problem_key: str | None = None, answer_key: str | None = None,
                 id_key: str | None = None, fmt: str = "jsonl") -> list[PromptRecord]:
    """Records of a ``.jsonl``/``.json`` (one object per line) or ``.parquet`` file.

    Field names are auto-detected (problem/question/prompt..., answer/solution/...) unless given.
    An answer may be a list of alternatives (joined with ``answers.ALT_SEP``; any one is correct).
    ``fmt`` other than ``jsonl`` reads each row as that public format (data/formats.py: gsm8k, math,
    aime, deepscaler). Blank lines are skipped; ids must be unique (default id: the record's index).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: dataset file not found")
    records: list[PromptRecord] = []
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{p}: cannot read parquet: {e}") from None
        for i, row in enumerate(rows):
            records.append(_record(row, i, f"{p}: row {i}", problem_key, answer_key, id_key, fmt))
    elif p.suffix in (".jsonl", ".json"):
        try:  # _record raises DataError only: a FormatError here is iter_jsonl's malformed line
            for lineno, row in iter_jsonl(p):
                records.append(_record(row, len(records), f"{p}:{lineno}", problem_key, answer_key, id_key, fmt))
        except FormatError as e:
            raise DataError(str(e)) from None
    else:
        raise DataError(f"{p}: unsupported dataset format {p.suffix!r}; use .jsonl or .parquet")
    if not records:
        raise DataError(f"{p}: no records")
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.id in seen:
            raise DataError(f"{p}: duplicate id {r.id!r} (records {seen[r.id]} and {i})")
        seen[r.id] = i
    return records


def synthetic_records(cfg: SyntheticConfig, split: str) -> list[PromptRecord]:
    """The synthetic task as PromptRecords; ``meta`` carries difficulty and the verbose/concise completions."""
    n = cfg.n_train if split == "train" else cfg.n_eval
    examples = synthetic.generate_examples(
        n, split, seed=cfg.seed, min_ops=cfg.min_ops, max_ops=cfg.max_ops, max_operand=cfg.max_operand,
        max_value=cfg.max_value, eval_percent=cfg.eval_percent,
    )
    return [
        PromptRecord(
            ex.id, ex.problem.expression, str(ex.problem.answer),
            {"task": "arith", "difficulty": ex.problem.difficulty, "verbose": ex.verbose.text,
             "concise": ex.concise.text},
        )
        for ex in examples
    ]


def load_split(cfg: DataConfig, split: str) -> list[PromptRecord]:
    """Train or eval records of the configured source (eval of a file source needs ``eval_path``)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    if cfg.source == "synthetic":
        return synthetic_records(cfg.synthetic, split)
    path = cfg.train_path if split == "train" else cfg.eval_path
    if not path:
        raise DataError(f"data.{split}_path is not set")
    return load_prompts(path, cfg.problem_field, cfg.answer_field, cfg.id_field, cfg.format)


def encode_prompts(records: Sequence[PromptRecord], tokenizer: Any, template: templates.TemplateName,
                   max_prompt_tokens: int) -> list[list[int]]:
    """Render and tokenize every prompt up front; a prompt over ``max_prompt_tokens`` is an error naming its id.

    Done once before training so an overlong prompt fails in seconds, not after hours of rollouts. The ids are
    ``templates.encode_prompt``'s (the one prompt encoding: special tokens included, as rollouts see them).
    """
    try:
        return [templates.encode_prompt(r.problem, template, tokenizer, max_tokens=max_prompt_tokens, name=r.id)
                for r in records]
    except templates.PromptTooLongError as e:
        raise DataError(str(e)) from None


class PromptIterator:
    """Endless, deterministic, resumable order over ``records``: epoch ``e`` is a shuffle seeded by (seed, e).

    ``state_dict()`` is three integers plus the dataset size (checked on load, so resuming with another
    dataset is an error rather than a silently different order).
    """

    def __init__(self, records: Sequence[PromptRecord], seed: int = 0, shuffle: bool = True) -> None:
        if not records:
            raise ValueError("PromptIterator needs at least one record")
        self.records = records
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._make_order(0)

    def _make_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[PromptRecord]:
        return self

    def __next__(self) -> PromptRecord:
        if self.index >= len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._make_order(self.epoch)
        rec = self.records[self._order[self.index]]
        self.index += 1
        return rec

    def next_batch(self, n: int) -> list[PromptRecord]:
        """The next ``n`` records (crossing epoch boundaries when needed)."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": len(self.records)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "index", "seed"} - set(state)
        if missing:
            raise ValueError(f"prompt iterator state lacks {sorted(missing)}")
        if "size" in state and state["size"] != len(self.records):
            raise ValueError(f"prompt iterator state is for {state['size']} records, dataset has {len(self.records)}")
        if not 0 <= state["index"] <= len(self.records) or state["epoch"] < 0:
            raise ValueError(f"prompt iterator state out of range: {state}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._order = self._make_order(self.epoch)
