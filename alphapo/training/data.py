"""Preference data: files in TRL's format, the built-in sorting task, tokenisation, batches.

A preference record is ``{"prompt": ..., "chosen": ..., "rejected": ...}``, either
*standard* (three strings) or *conversational* (three lists of ``{"role", "content"}``
messages, rendered with the tokenizer's chat template the way TRL renders them), read
from ``.jsonl``, ``.json`` (a list of records, or a dict of equal-length columns) or
``.parquet``. Bad records fail loudly, naming the file, the record and the field; a
record is named by its 1-based line in a ``.jsonl`` file (blank lines counted, as an
editor counts them) and by its 1-based number otherwise, in every message, tokenisation's
included. Messages have the roles ``system``, ``developer``, ``user``, ``assistant`` and
``tool``; a completion is the model's turn: it starts with ``assistant``, and holds no
``system``, ``developer`` or ``user`` message.

Tokenised, a pair becomes two sequences ``prompt + chosen`` and ``prompt + rejected``;
a batch of B pairs is one ``(2B, T)`` tensor, chosen rows first, padded on the right,
with ``labels = -100`` on the prompt and the padding, which is the layout
:class:`alphapo.AlphaPOLoss` takes after the one-token shift.

Truncation never empties a completion silently (the failure of TRL issue #6548, where a
prompt that fills ``max_length`` leaves a completion of zero tokens and a NaN loss):

* ``"truncate"``: keep the end of the prompt (at most ``max_prompt_length`` tokens, the
  BOS kept) and the start of each completion so that every sequence fits
  ``max_length``; a pair whose prompt leaves no room for a completion token is dropped,
  counted, and reported in one warning;
* ``"drop"``: drop every pair that does not fit whole, counted and warned;
* ``"error"``: raise on the first pair that does not fit.

The built-in task (:func:`builtin_task`) is digit sorting: the prompt lists digits, the
chosen answer sorts them, the rejected one is a near miss (two neighbours swapped, a digit
changed, dropped or doubled). It is generated deterministically from a seed, with a
held-out split of prompts never seen in training, and a tiny random-init model learns it
in a few hundred steps.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

FIELDS = ("prompt", "chosen", "rejected")
TRUNCATION_POLICIES = ("truncate", "drop", "error")
ROLES = ("system", "developer", "user", "assistant", "tool")  # what chat templates know
COMPLETION_ROLES = ("assistant", "tool")  # the model's turn, and the results of its tool calls


class DataError(ValueError):
    """A preference file or record that cannot be trained on; the message says where and why."""


# ----------------------------------------------------------------------------------------
# Reading and checking records


def load_preference_file(path) -> list[dict]:
    """Read and check a TRL-format preference file (``.jsonl``, ``.json`` or ``.parquet``)."""
    return read_preference_file(path)[0]


def read_preference_file(path) -> tuple[list[dict], list[str]]:
    """``(records, where)``: a checked preference file, and where each record stands in it
    (``"line 7"`` in a ``.jsonl`` file, ``"record 7"`` otherwise; 1-based)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    where = None
    if suffix == ".jsonl":
        records, where = [], []
        # "utf-8-sig": a byte-order mark, which some editors write, is not part of the JSON.
        for line_no, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {line_no} is not UTF-8 text (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from None
            where.append(f"line {line_no}")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        records = _columns_to_records(data, path) if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of records or a dict of columns, got {type(data).__name__}")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...: name the file
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    else:
        raise DataError(f"{path}: unknown extension {suffix!r}; use .jsonl, .json or .parquet")
    where = where if where is not None else numbered(len(records))
    check_records(records, str(path), where)
    return records, where


def numbered(n: int) -> list[str]:
    """``["record 1", ..., "record n"]``: where the records of a list stand."""
    return [f"record {i}" for i in range(1, n + 1)]


def _columns_to_records(data: dict, path) -> list[dict]:
    if not all(isinstance(v, list) for v in data.values()):
        raise DataError(f"{path}: a JSON object must map column names to lists of equal length")
    lengths = {len(v) for v in data.values()}
    if len(lengths) > 1:
        raise DataError(f"{path}: columns have different lengths {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    return [{k: v[i] for k, v in data.items()} for i in range(n)]


def _kind(value) -> str | None:
    """``"standard"`` for a string, ``"conversational"`` for a list of messages, else None."""
    if isinstance(value, str):
        return "standard"
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    ):
        return "conversational"
    return None


def _is_empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def check_records(records, source: str = "data", where: list[str] | None = None) -> None:
    """Raise :class:`DataError` on the first record that is not a usable preference pair.

    ``where``: each record's place in ``source`` (default: ``record 1``, ``record 2``, ...).
    """
    if not isinstance(records, list) or not records:
        raise DataError(f"{source}: holds no records")
    where = where or numbered(len(records))
    for rec, at in zip(records, where):
        check_record(rec, f"{source}: {at}")


def check_record(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with fields {FIELDS}, got {type(rec).__name__}")
    missing = [k for k in FIELDS if k not in rec]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} (found {sorted(rec)}); a preference record needs "
                        f"{FIELDS} (TRL's explicit-prompt format)")
    for k in FIELDS:
        if rec[k] is None:
            raise DataError(f"{where}: field {k!r} is null; it must be a string or a list of messages")
    kinds = {}
    for k in FIELDS:
        kinds[k] = _kind(rec[k])
        if kinds[k] is None:
            raise DataError(
                f"{where}: field {k!r} must be a string or a non-empty list of "
                f"{{'role': str, 'content': str}} messages, got {_describe(rec[k])}"
            )
    if len(set(kinds.values())) > 1:
        raise DataError(f"{where}: mixes standard (string) and conversational (message list) fields: {kinds}")
    if kinds["prompt"] == "conversational":
        _check_roles(rec, where)
    for k in ("chosen", "rejected"):
        if _is_empty(rec[k]):
            raise DataError(f"{where}: {k!r} is empty: a preference pair needs two non-empty completions")


def _check_roles(rec: dict, where: str) -> None:
    for k in FIELDS:
        for i, message in enumerate(rec[k], 1):
            role = message["role"]
            if role not in ROLES:
                raise DataError(f"{where}: message {i} of {k!r} has unknown role {role!r}; roles are "
                                f"{', '.join(ROLES)}")
            if k != "prompt" and (role not in COMPLETION_ROLES or (i == 1 and role != "assistant")):
                raise DataError(f"{where}: message {i} of {k!r} has role {role!r}: a completion is the model's "
                                "turn, 'assistant' first ('tool' results may follow an assistant message)")


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


# ----------------------------------------------------------------------------------------
# The built-in task


def _near_miss(answer: list[str], rng: random.Random) -> list[str]:
    """A wrong answer one edit away from ``answer``: swap, change, drop or double a digit."""
    while True:
        wrong = list(answer)
        kind = rng.randrange(4)
        i = rng.randrange(len(wrong))
        if kind == 0 and len(wrong) > 1:  # two neighbours out of order
            i = min(i, len(wrong) - 2)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        elif kind == 1:  # a digit changed
            wrong[i] = rng.choice("0123456789")
        elif kind == 2 and len(wrong) > 1:  # a digit dropped
            del wrong[i]
        else:  # a digit doubled
            wrong.insert(i, wrong[i])
        if wrong != answer:
            return wrong


def builtin_task(n_train: int = 20000, n_eval: int = 512, seed: int = 0, min_digits: int = 3, max_digits: int = 8):
    """The built-in preference task: sort the digits. Returns ``(train, eval)`` record lists.

    ``{"prompt": "sort 52819=", "chosen": "12589", "rejected": "12859"}``. Deterministic in
    ``seed``; no eval prompt appears in the train split.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict]] = [[], []]
    for n, split in ((n_eval, splits[1]), (n_train, splits[0])):
        while len(split) < n:
            digits = [rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits))]
            prompt = f"sort {''.join(digits)}="
            if prompt in seen:
                continue
            seen.add(prompt)
            answer = sorted(digits)
            split.append(
                {"prompt": prompt, "chosen": "".join(answer), "rejected": "".join(_near_miss(answer, rng))}
            )
    return splits[0], splits[1]


# ----------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class TokenizeStats:
    """What tokenisation did to the records; ``report()`` is the counted warning."""

    total: int = 0
    kept: int = 0
    dropped: int = 0  # pairs that could not keep a completion token (or did not fit, "drop")
    truncated_prompts: int = 0
    truncated_completions: int = 0
    identical: int = 0  # chosen == rejected after tokenisation: no preference signal
    dropped_at: list[str] = field(default_factory=list)  # where the dropped pairs stand ("line 7", ...)

    def report(self, source: str, max_length: int) -> str | None:
        parts = []
        if self.dropped:
            at = ", ".join(self.dropped_at[:5]) + (", ..." if self.dropped > 5 else "")
            parts.append(
                f"dropped {self.dropped} of {self.total} pairs that do not fit max_length={max_length} "
                f"with a non-empty completion ({at}); raise max_length or set max_prompt_length"
            )
        if self.truncated_prompts or self.truncated_completions:
            parts.append(
                f"truncated {self.truncated_prompts} prompts (kept their end) and "
                f"{self.truncated_completions} completions (kept their start)"
            )
        if self.identical:
            parts.append(f"{self.identical} pairs have identical chosen and rejected tokens (no signal)")
        return f"{source}: " + "; ".join(parts) if parts else None


def render(record: dict, tokenizer) -> tuple[str, str, str]:
    """``(prompt, chosen, rejected)`` as text; conversational records through the chat template.

    As TRL: the prompt gets the generation prompt, each completion is the text that
    ``prompt + completion`` adds to it (the common prefix guards templates that render the
    generation prompt differently from a finished turn).
    """
    if isinstance(record["prompt"], str):
        return record["prompt"], record["chosen"], record["rejected"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("conversational records need a tokenizer with a chat template; this one has none")
    template = tokenizer.apply_chat_template
    last_role = record["prompt"][-1]["role"]
    prompt = template(
        record["prompt"],
        tokenize=False,
        add_generation_prompt=last_role != "assistant",
        continue_final_message=last_role == "assistant",
    )
    full_chosen = template(record["prompt"] + record["chosen"], tokenize=False)
    full_rejected = template(record["prompt"] + record["rejected"], tokenize=False)
    n = 0
    for a, b, c in zip(prompt, full_chosen, full_rejected):
        if not a == b == c:
            break
        n += 1
    return prompt[:n], full_chosen[n:], full_rejected[n:]


def tokenize_pairs(
    records,
    tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "truncate",
    source: str = "data",
    where: list[str] | None = None,
):
    """Token ids of each pair: a list of ``(prompt_ids, chosen_ids, rejected_ids)`` and stats.

    The prompt starts with BOS when the tokenizer has one; each completion ends with EOS.
    Every kept sequence fits ``max_length`` and keeps at least one completion token, so
    each row of a batch has a valid target for the loss. ``where``: each record's place in
    ``source``, for the messages (default: ``record 1``, ``record 2``, ...).
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a prompt token and a completion token), got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 0:
        raise ValueError(f"max_prompt_length must be >= 0 (0 or None: no limit), got {max_prompt_length}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stats = TokenizeStats(total=len(records))
    pairs = []
    # One batched call per column: the fast tokenizer's Rust loop, not 3 Python calls a pair.
    texts = list(zip(*(render(rec, tokenizer) for rec in records)))
    ids = [tokenizer(list(column), add_special_tokens=False)["input_ids"] for column in texts]
    where = where or numbered(len(records))
    for at, p, c, r in zip(where, *ids):
        if bos is not None and (not p or p[0] != bos):
            p = [bos] + p
        if not p:
            raise DataError(f"{source}: {at}: the prompt is empty and the tokenizer has no BOS token to start it")
        if eos is not None:
            c = c if c and c[-1] == eos else c + [eos]
            r = r if r and r[-1] == eos else r + [eos]
        if not c or not r:
            raise DataError(f"{source}: {at}: a completion tokenises to no tokens")
        fits = len(p) + max(len(c), len(r)) <= max_length and len(p) <= (max_prompt_length or len(p))
        if not fits and truncation == "error":
            raise DataError(
                f"{source}: {at}: prompt ({len(p)} tokens) + longest completion ({max(len(c), len(r))}) "
                f"does not fit max_length={max_length}, max_prompt_length={max_prompt_length} (truncation='error')"
            )
        if not fits and truncation == "drop":
            stats.dropped += 1
            stats.dropped_at.append(at)
            continue
        if max_prompt_length and len(p) > max_prompt_length:
            # Keep the end of the prompt, nearest the completion, and the BOS in front of it.
            head = p[:1] if bos is not None else []
            p = head + p[len(p) - (max_prompt_length - len(head)) :]
            stats.truncated_prompts += 1
        room = max_length - len(p)
        if room < 1:  # the prompt alone fills max_length: the completion would be empty
            stats.dropped += 1
            stats.dropped_at.append(at)
            continue
        if len(c) > room or len(r) > room:
            stats.truncated_completions += (len(c) > room) + (len(r) > room)
            c, r = c[:room], r[:room]
        if c == r:
            stats.identical += 1
        pairs.append((p, c, r))
    stats.kept = len(pairs)
    message = stats.report(source, max_length)
    if message:
        warnings.warn(message, stacklevel=2)
    if not pairs:
        raise DataError(f"{source}: no pair survives tokenisation with max_length={max_length}")
    return pairs, stats


# ----------------------------------------------------------------------------------------
# Batches


def collate(pairs, pad_id: int, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """B pairs -> ``input_ids``, ``attention_mask``, ``labels`` of shape (2B, T), chosen rows first."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    T = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), ignore_index, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p) : n] = torch.tensor(c)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PairBatches:
    """Deterministic shuffled micro-batches: batch ``k`` is a pure function of (seed, k).

    The order of epoch ``e`` is ``randperm(n, seed + e)``; the last partial batch of an
    epoch is dropped so every micro-batch holds ``batch_size`` pairs (equal weights under
    gradient accumulation). A resumed run asks for batch ``k`` and gets what the
    uninterrupted run got: there is no loader state to save.
    """

    def __init__(self, pairs, batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True):
        if batch_size > len(pairs) and shuffle:
            raise DataError(f"batch_size ({batch_size} pairs) exceeds the {len(pairs)} training pairs: lower "
                            "--batch-size")
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.per_epoch = len(pairs) // batch_size if shuffle else -(-len(pairs) // batch_size)
        self._order = (None, None)

    def __len__(self) -> int:
        return self.per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        if self._order[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = (epoch, torch.randperm(len(self.pairs), generator=g))
            else:
                self._order = (epoch, torch.arange(len(self.pairs)))
        return self._order[1]

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(k, self.per_epoch)
        idx = self.order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return collate([self.pairs[j] for j in idx.tolist()], self.pad_id)

    def __iter__(self):
        """One pass (an epoch 0 in order when ``shuffle=False``: evaluation)."""
        return (self.batch(k) for k in range(self.per_epoch))
