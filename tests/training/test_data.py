"""Preference data: file formats, clear errors on bad records, tokenisation and truncation, batches."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from alphapo.training import data as D
from alphapo.training.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


RECORDS = [
    {"prompt": "sort 312=", "chosen": "123", "rejected": "132"},
    {"prompt": "sort 90=", "chosen": "09", "rejected": "90"},
]
CHAT = [
    {
        "prompt": [{"role": "user", "content": "sort 312"}],
        "chosen": [{"role": "assistant", "content": "123"}],
        "rejected": [{"role": "assistant", "content": "132"}],
    }
]


# ---------------------------------------------------------------------------------------
# The built-in task


def test_builtin_task_is_deterministic_sorted_and_split():
    train, held = D.builtin_task(300, 50, seed=3)
    assert (train, held) == D.builtin_task(300, 50, seed=3)
    assert D.builtin_task(300, 50, seed=4)[0] != train
    assert len(train) == 300 and len(held) == 50
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}, "held-out prompts leak into train"
    for r in train + held:
        digits = r["prompt"].removeprefix("sort ").removesuffix("=")
        assert r["chosen"] == "".join(sorted(digits))
        assert r["rejected"] != r["chosen"] and r["rejected"].isdigit()
        # a near miss: one edit (swap, change, drop, double) away
        assert abs(len(r["rejected"]) - len(r["chosen"])) <= 1
    D.check_records(train + held)


# ---------------------------------------------------------------------------------------
# Files and their errors


def _write(tmp_path, name, records):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("name", ["a.jsonl", "a.json", "a.parquet"])
def test_files_round_trip(tmp_path, name):
    assert D.load_preference_file(_write(tmp_path, name, RECORDS)) == RECORDS


def test_conversational_parquet_and_json_columns(tmp_path):
    assert D.load_preference_file(_write(tmp_path, "c.parquet", CHAT)) == CHAT
    columns = {k: [r[k] for r in RECORDS] for k in D.FIELDS}
    path = tmp_path / "cols.json"
    path.write_text(json.dumps(columns))
    assert D.load_preference_file(path) == RECORDS


# Each bad record is the second line of its .jsonl file.
BAD = [
    pytest.param({"prompt": "p", "chosen": "a"}, r"line 2: missing field\(s\) \['rejected'\]", id="missing-field"),
    pytest.param({"prompt": "p", "chosen": "", "rejected": "b"}, r"line 2: 'chosen' is empty", id="empty-chosen"),
    pytest.param({"prompt": "p", "chosen": "a", "rejected": "  "}, r"line 2: 'rejected' is empty",
                 id="blank-rejected"),
    pytest.param({"prompt": "p", "chosen": 3, "rejected": "b"}, r"line 2: field 'chosen' must be a string .* got int 3",
                 id="int-completion"),
    pytest.param({"prompt": ["p"], "chosen": "a", "rejected": "b"}, r"line 2: field 'prompt' .* got list",
                 id="list-of-str"),
    pytest.param({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
                 r"line 2: mixes standard", id="mixed-kinds"),
    pytest.param({"prompt": None, "chosen": "a", "rejected": "b"}, r"line 2: field 'prompt' is null", id="null-field"),
    pytest.param(["p", "a", "b"], r"line 2: expected an object", id="not-an-object"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_records_name_row_and_field(tmp_path, bad, message):
    path = _write(tmp_path, "bad.jsonl", [RECORDS[0], bad])
    with pytest.raises(D.DataError, match=message) as info:
        D.load_preference_file(path)
    assert str(path) in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(D.DataError, match="no such file"):
        D.load_preference_file(tmp_path / "missing.jsonl")
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(D.DataError, match="line 2 is not valid JSON"):
        D.load_preference_file(path)
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(D.DataError, match="unknown extension"):
        D.load_preference_file(path)
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(D.DataError, match="holds no records"):
        D.load_preference_file(path)
    path = tmp_path / "ragged.json"
    path.write_text(json.dumps({"prompt": ["a", "b"], "chosen": ["c"], "rejected": ["d", "e"]}))
    with pytest.raises(D.DataError, match="different lengths"):
        D.load_preference_file(path)


# ---------------------------------------------------------------------------------------
# Tokenisation


def test_tokenize_masks_prompt_adds_bos_eos(tok):
    pairs, stats = D.tokenize_pairs(RECORDS, tok, max_length=32)
    assert stats.kept == 2 and stats.dropped == 0
    p, c, r = pairs[0]
    assert p[0] == tok.bos_token_id and tok.decode(p[1:]) == "sort 312="
    assert c[-1] == r[-1] == tok.eos_token_id
    assert tok.decode(c[:-1]) == "123" and tok.decode(r[:-1]) == "132"
    batch = D.collate(pairs, tok.pad_token_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (4, len(p) + len(c))
    # rows 0..B-1 chosen, B..2B-1 rejected; prompt and padding masked out of the labels
    assert labels[0].tolist() == [-100] * len(p) + c
    assert labels[2].tolist() == [-100] * len(p) + r
    p1, c1, _ = pairs[1]
    assert labels[1].tolist() == [-100] * len(p1) + c1 + [-100] * (ids.shape[1] - len(p1) - len(c1))
    assert (ids[1, len(p1) + len(c1):] == tok.pad_token_id).all()
    assert mask.sum(1).tolist() == [len(p) + len(c), len(p1) + len(c1), len(p) + len(r), len(p1) + len(pairs[1][2])]


def test_conversational_matches_trl_rendering(tok):
    """The chat-template split of prompt and completion is TRL's own."""
    prompt, chosen, rejected = D.render(CHAT[0], tok)
    assert prompt == "<|user|>sort 312\n<|assistant|>" and chosen == "123\n" and rejected == "132\n"
    trl_utils = pytest.importorskip("trl.data_utils")
    assert trl_utils.apply_chat_template(CHAT[0], tok) == {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_conversational_needs_a_template(tok):
    plain = build_char_tokenizer()
    plain.chat_template = None
    with pytest.raises(D.DataError, match="chat template"):
        D.tokenize_pairs(CHAT, plain, max_length=64)
    pairs, _ = D.tokenize_pairs(CHAT, tok, max_length=64)
    assert tok.decode(pairs[0][1]) == "123\n<eos>"


LONG = {"prompt": "x" * 20, "chosen": "abc", "rejected": "abcdef"}


def test_prompt_filling_max_length_is_dropped_never_emptied(tok):
    """TRL issue #6548: a prompt that fills max_length must not leave an empty completion."""
    records = [LONG, RECORDS[0]]
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 pairs .*\(record 1\)"):
        pairs, stats = D.tokenize_pairs(records, tok, max_length=21)  # BOS + 20 prompt tokens = 21
    assert stats.dropped == 1 and stats.kept == 1 and len(pairs) == 1
    with pytest.raises(D.DataError, match="no pair survives"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        D.tokenize_pairs([LONG], tok, max_length=21)


def test_truncate_keeps_prompt_end_and_completion_start(tok):
    with pytest.warns(UserWarning, match="truncated 1 prompts .* and 1 completions"):
        pairs, stats = D.tokenize_pairs([LONG], tok, max_length=12, max_prompt_length=8)
    p, c, r = pairs[0]
    assert p[0] == tok.bos_token_id and len(p) == 8 and tok.decode(p[1:]) == "x" * 7
    assert tok.decode(c) == "abc<eos>" and len(c) == 4  # fits whole
    assert tok.decode(r) == "abcd" and len(p) + len(r) == 12  # cut from the right
    assert stats.truncated_prompts == 1 and stats.truncated_completions == 1


def test_drop_and_error_policies(tok):
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        pairs, _ = D.tokenize_pairs([LONG, RECORDS[0]], tok, max_length=26, truncation="drop")
    assert len(pairs) == 1 and tok.decode(pairs[0][1]) == "123<eos>"
    with pytest.raises(D.DataError, match=r"record 2: prompt \(21 tokens\) \+ longest completion \(7\)"):
        D.tokenize_pairs([RECORDS[0], LONG], tok, max_length=26, truncation="error")
    with pytest.raises(ValueError, match="truncation must be one of"):
        D.tokenize_pairs(RECORDS, tok, max_length=26, truncation="cut")


def test_no_kept_pair_is_empty_or_too_long(tok):
    """Random lengths and limits: every kept sequence fits and scores >= 1 completion token."""
    rng = random.Random(0)
    for _ in range(40):
        records = [
            {"prompt": "p" * rng.randint(0, 30), "chosen": "c" * rng.randint(1, 30),
             "rejected": "r" * rng.randint(1, 30)}
            for _ in range(6)
        ]
        max_length = rng.randint(2, 40)
        max_prompt = rng.choice([None, rng.randint(1, 20)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                pairs, stats = D.tokenize_pairs(records, tok, max_length, max_prompt, "truncate")
            except D.DataError:
                continue
        assert stats.kept + stats.dropped == len(records)
        for p, c, r in pairs:
            assert len(c) >= 1 and len(r) >= 1
            assert len(p) + len(c) <= max_length and len(p) + len(r) <= max_length
            assert max_prompt is None or len(p) <= max_prompt
        labels = D.collate(pairs, tok.pad_token_id)["labels"]
        assert ((labels[:, 1:] != -100).sum(1) >= 1).all()


# ---------------------------------------------------------------------------------------
# Batches


def test_pair_batches_are_a_function_of_seed_and_index(tok):
    train, _ = D.builtin_task(50, 1, seed=0)
    pairs, _ = D.tokenize_pairs(train, tok, max_length=32)
    a = D.PairBatches(pairs, 8, tok.pad_token_id, seed=1)
    b = D.PairBatches(pairs, 8, tok.pad_token_id, seed=1)
    assert len(a) == 6  # 50 // 8: the partial batch is dropped
    for k in (7, 0, 13, 7):  # any order of access, across epochs
        assert all(torch.equal(a.batch(k)[n], b.batch(k)[n]) for n in ("input_ids", "labels"))
    epoch0 = torch.cat([a.batch(k)["input_ids"][:8, :12] for k in range(6)])
    assert len({tuple(row.tolist()) for row in epoch0}) == 48  # no pair twice within an epoch
    assert not torch.equal(a.batch(0)["input_ids"], a.batch(6)["input_ids"])  # epochs reshuffle
    in_order = D.PairBatches(pairs, 8, tok.pad_token_id, shuffle=False)
    assert len(in_order) == 7 and sum(x["input_ids"].shape[0] for x in in_order) == 100


# ---------------------------------------------------------------------------------------
# Where a bad record is: its 1-based line (.jsonl) or record number, everywhere


def test_records_are_numbered_by_their_line_blank_lines_included(tmp_path, tok):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(D.DataError, match=r"gaps.jsonl: line 3: missing field\(s\) \['rejected'\]"):
        D.load_preference_file(path)
    # Tokenisation reports the same numbers, through the held-out split's shuffle too.
    path.write_text("".join(json.dumps(r) + "\n" for r in [RECORDS[0]] * 4 + [LONG] + [RECORDS[1]] * 5))
    records, where = D.read_preference_file(path)
    assert where[4] == "line 5"
    with pytest.warns(UserWarning, match=r"dropped 1 of 10 pairs .*\(line 5\)"):
        D.tokenize_pairs(records[::-1], tok, max_length=21, source=str(path), where=where[::-1])
    with pytest.raises(D.DataError, match=r"line 5: prompt \(21 tokens\)"):
        D.tokenize_pairs(records, tok, max_length=21, truncation="error", source=str(path), where=where)
    path = _write(tmp_path, "list.json", [RECORDS[0], {"prompt": "p"}])
    with pytest.raises(D.DataError, match=r"list.json: record 2: missing"):
        D.load_preference_file(path)


def chat(prompt_roles=("user",), completion_roles=("assistant",)):
    return {"prompt": [{"role": r, "content": "sort 312"} for r in prompt_roles],
            "chosen": [{"role": r, "content": "123"} for r in completion_roles],
            "rejected": [{"role": r, "content": "132"} for r in completion_roles]}


@pytest.mark.parametrize("record, message", [
    pytest.param(chat(("wizard",)), "message 1 of 'prompt' has unknown role 'wizard'", id="unknown-role"),
    pytest.param(chat(completion_roles=("user",)), "message 1 of 'chosen' has role 'user'", id="user-completion"),
    pytest.param(chat(completion_roles=("assistant", "system")), "message 2 of 'chosen' has role 'system'",
                 id="system-in-completion"),
    pytest.param(chat(completion_roles=("tool",)), "message 1 of 'chosen' has role 'tool'", id="tool-first"),
])
def test_roles_are_checked(tmp_path, record, message):
    with pytest.raises(D.DataError, match=f"line 2: {message}"):
        D.load_preference_file(_write(tmp_path, "chat.jsonl", [CHAT[0], record]))


def test_known_roles_pass():
    D.check_records([chat(("system", "user", "assistant", "user")), chat(completion_roles=("assistant", "tool",
                                                                                         "assistant"))])


def test_unreadable_files_are_data_errors_naming_the_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(D.DataError, match=r"latin1.jsonl: line 1 is not UTF-8 text"):
        D.load_preference_file(path)
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"junk")
    with pytest.raises(D.DataError, match=r"junk.parquet: not a readable Parquet file"):
        D.load_preference_file(path)
    # A byte-order mark, as some editors write one, is not an error.
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS[0]).encode() + b"\n")
    assert D.load_preference_file(path) == RECORDS[:1]
