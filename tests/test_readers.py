"""Files people bring: compressed, with a byte-order mark, column-oriented, messages made of content
parts, LLaMA-Factory's chosen_messages; bad rows grouped by reason, an unknown format named once."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
from pathlib import Path

import pytest

from conftest import ORCA, ROOT, ULTRA, write_jsonl
from lora_sdpo.data import DataError, load_pairs, normalise, read_file
from lora_sdpo.recipe import SourceConfig

EVAL = ROOT / "data" / "ultrafeedback" / "eval_clean.jsonl"


def pairs_of(path: Path) -> list[dict]:
    return load_pairs([SourceConfig(path=str(path))], None, max_bad_fraction=1.0).rows


def _strip_source(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "source"} for r in rows]


def test_shipped_formats_normalise_as_before():
    """The pairs of the shipped files are byte for byte what lora-sdpo made of them before the new
    readers: sha256 over (format, pair, problem) of every row, computed with the previous commit's
    lora_sdpo/data.py (5ea76c2) on the same files."""
    h = hashlib.sha256()
    for f in (ORCA, ULTRA, EVAL):
        for r in read_file(f):
            h.update(json.dumps(list(normalise(r)), sort_keys=True, ensure_ascii=False).encode())
    assert h.hexdigest() == "d4de5c69d4b8404d3365b0e92dbcf74328ce37596175e9b9e10514aabd8a5d30"


@pytest.mark.parametrize("opener,suffix", [(gzip.open, ".jsonl.gz"), (bz2.open, ".jsonl.bz2")])
def test_compressed_jsonl_gives_the_same_rows(tmp_path, opener, suffix):
    lines = ORCA.read_text().splitlines()[:40]
    plain = tmp_path / "d.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    packed = tmp_path / f"d{suffix}"
    with opener(packed, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert read_file(packed) == read_file(plain)
    assert _strip_source(pairs_of(packed)) == _strip_source(pairs_of(plain))


def test_compressed_json_and_csv(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no"} for i in range(3)]
    with gzip.open(tmp_path / "d.json.gz", "wt", encoding="utf-8") as f:
        json.dump(rows, f)
    with gzip.open(tmp_path / "d.csv.gz", "wt", encoding="utf-8", newline="") as f:
        f.write("prompt,chosen,rejected\n" + "".join(f"Q{i}?,yes,no\n" for i in range(3)))
    assert read_file(tmp_path / "d.json.gz") == rows == read_file(tmp_path / "d.csv.gz")


def test_bad_line_in_a_compressed_file_is_named(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl\.gz: line 2 is not valid JSON"):
        read_file(p)
    (tmp_path / "fake.jsonl.gz").write_text('{"prompt": "p"}\n')  # not gzip at all
    with pytest.raises(DataError, match=r"fake\.jsonl\.gz: cannot read"):
        read_file(tmp_path / "fake.jsonl.gz")


def test_byte_order_mark(tmp_path):
    row = {"prompt": "Q?", "chosen": "a", "rejected": "b"}
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(row) + "\n").encode() * 2)
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\nQ?,a,b\n")
    assert read_file(tmp_path / "d.jsonl") == [row, row]
    assert read_file(tmp_path / "d.csv") == [row]  # the first column is `prompt`, not "\ufeffprompt"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_with_a_byte_order_mark_are_read(tmp_path, encoding):
    text = "prompt,chosen,rejected\nCafé?,Oui,Non\n"
    bom = {"utf-16": b"", "utf-16-be": b"\xfe\xff", "utf-32": b""}[encoding]  # Python's utf-16/32 write their own mark
    (tmp_path / "d.csv").write_bytes(bom + text.encode(encoding))
    (tmp_path / "d.jsonl").write_bytes(bom + '{"prompt": "Café?", "chosen": "Oui", "rejected": "Non"}\n'.encode(encoding))
    row = {"prompt": "Café?", "chosen": "Oui", "rejected": "Non"}
    assert read_file(tmp_path / "d.csv") == [row]
    assert read_file(tmp_path / "d.jsonl") == [row]


def test_utf16_without_a_mark_and_latin1_are_named(tmp_path):
    (tmp_path / "d.csv").write_bytes("prompt,chosen,rejected\nQ?,a,b\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"looks like UTF-16 text without a byte-order mark \(every other byte is 0\); save it as UTF-8"):
        read_file(tmp_path / "d.csv")
    (tmp_path / "l.csv").write_bytes("prompt,chosen,rejected\nCafé?,a,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text \(it holds the byte 0xe9, which UTF-8 text cannot\)"):
        read_file(tmp_path / "l.csv")


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_a_ragged_row_is_a_named_bad_row_and_no_other_row_moves(tmp_path, suffix, sep):
    good = [(f"Question {i}?", f"Answer {i}.", f"Wrong {i}.") for i in range(6)]
    lines = ["prompt,chosen,rejected".replace(",", sep), *(sep.join(r) for r in good)]
    lines.insert(3, sep.join(("Q?", "first half", " second half", "real rejected")))  # an unquoted separator: 4 fields
    lines.insert(6, sep.join(("Q?", "only two")))
    lines.append(sep.join((*good[0][:2], "x", "")))  # an extra trailing field
    (tmp_path / f"d{suffix}").write_text("\n".join(lines) + "\n")
    ps = load_pairs([SourceConfig(path=str(tmp_path / f"d{suffix}"))], None, max_bad_fraction=1.0)
    assert [(r["row"], r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in ps.rows] == [
        (n, *g) for n, g in zip((1, 2, 4, 5, 7, 8), good)]
    what = "comma" if sep == "," else "tab"
    assert ps.reports[0].bad == [
        (3, f"line 4 has 4 fields for the header's 3 (an unquoted {what} in a field?); quote the fields that hold a {what}, or fix the line"),
        (6, f"line 7 has 2 fields for the header's 3 (a field missing?); quote the fields that hold a {what}, or fix the line"),
        (9, f"line 10 has 4 fields for the header's 3 (an unquoted {what} in a field?); quote the fields that hold a {what}, or fix the line"),
    ]
    assert "6 pairs used of 9 rows; 3 bad dropped" in ps.reports[0].summary()


def test_a_quoting_error_is_named_by_line(tmp_path):
    (tmp_path / "d.csv").write_text('prompt,chosen,rejected\nQ?,a,b\nQ?,"said "hi" there",b\n')
    with pytest.raises(DataError, match=r"d\.csv: line 3: quoting error"):
        read_file(tmp_path / "d.csv")
    (tmp_path / "u.csv").write_text('prompt,chosen,rejected\nQ?,a,b\nQ?,"never closed,b\nQ2?,c,d\n')
    with pytest.raises(DataError, match=r"u\.csv: line 3: quoting error \(unexpected end of data\)"):
        read_file(tmp_path / "u.csv")
    (tmp_path / "ok.csv").write_text('prompt,chosen,rejected\n"Q, with a comma?","say ""hi""",b\n')
    assert read_file(tmp_path / "ok.csv") == [{"prompt": "Q, with a comma?", "chosen": 'say "hi"', "rejected": "b"}]


def test_column_oriented_json_as_pandas_writes_it(tmp_path):
    import pandas as pd

    records = [json.loads(x) for x in ORCA.read_text().splitlines()[:6]]
    write_jsonl(tmp_path / "records.jsonl", records)
    df = pd.DataFrame(records)
    df.to_json(tmp_path / "columns.json")  # pandas' default: {"col": {"0": ..., "1": ...}}
    df.to_json(tmp_path / "split.json", orient="split")
    df.to_json(tmp_path / "index.json", orient="index")
    (tmp_path / "lists.json").write_text(json.dumps({k: [r[k] for r in records] for k in records[0]}))
    df.to_json(tmp_path / "lines.json", orient="records", lines=True)  # JSON lines named .json, as on the Hub
    expected = read_file(tmp_path / "records.jsonl")
    for name in ("columns", "split", "index", "lists", "lines"):
        assert read_file(tmp_path / f"{name}.json") == expected, name
    (tmp_path / "ragged.json").write_text(json.dumps({"chosen": ["a", "b"], "rejected": ["c"]}))
    with pytest.raises(DataError, match=r"different lengths \(chosen: 2, rejected: 1\)"):
        read_file(tmp_path / "ragged.json")


U, A4, A5 = ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "assistant", "content": "5"})
EXPECTED = {"prompt": [U], "chosen": [A4], "rejected": [A5]}


def parts(msg: dict, key: str = "text", split: bool = False) -> dict:
    text = msg["content"]
    chunks = [text[: len(text) // 2], text[len(text) // 2 :]] if split else [text]
    return {"role": msg["role"], "content": [{"type": "text", key: c} for c in chunks]}


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": [parts(U, split=True)], "chosen": [parts(A4)], "rejected": [parts(A5)]},  # transformers / OpenAI parts
        {"chosen": [parts(U), parts(A4)], "rejected": [parts(U), parts(A5)]},  # implicit prompt
        {"input": {"messages": [parts(U)]}, "preferred_output": [parts(A4)], "non_preferred_output": [parts(A5)]},
        # LLaMA-Factory: chosen_messages / rejected_messages, parts with "value", extra keys per message
        {"chosen_messages": [{**parts(U, "value"), "loss_weight": 0.0}, {**parts(A4, "value"), "loss_weight": 1.0}],
         "rejected_messages": [{**parts(U, "value"), "loss_weight": 0.0}, {**parts(A5, "value"), "loss_weight": 1.0}]},
        {"prompt_messages": [parts(U, "value")], "chosen_messages": [parts(A4, "value")], "rejected_messages": [parts(A5, "value")]},
    ],
    ids=["conversational", "implicit", "openai", "llamafactory", "llamafactory-prompt"],
)
def test_content_parts_give_the_string_pair(row):
    fmt, pair, problem = normalise(row)
    assert problem is None, problem
    assert pair == EXPECTED


def test_non_text_part_is_a_bad_row_naming_its_type():
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "What?"}]}
    _, pair, problem = normalise({"prompt": [image], "chosen": [A4], "rejected": [A5]})
    assert pair is None and problem == "prompt[0].content[0] is a part of type 'image_url'; only text parts can be trained on"


def test_bad_rows_grouped_by_reason(tmp_path):
    """Implicit-prompt prefix rows, five of them: one line with the count and the rows, not five sentences."""
    good = {"chosen": "Q: Hi\nA: Hello!", "rejected": "Q: Hi\nA: Go away."}
    prefix = {"chosen": "Q: Hi\nA: Hello", "rejected": "Q: Hi\nA: Hello there"}
    rows = [good] + [prefix] * 5 + [{"chosen": "Q: A\nA: same", "rejected": "Q: A\nA: same"}]
    rep = load_pairs([SourceConfig(path=str(write_jsonl(tmp_path / "hh.jsonl", rows)))], None, 1.0).reports[0]
    assert rep.summary() == (
        f"{tmp_path / 'hh.jsonl'}: 1 pairs used of 7 rows; 6 bad dropped (5 rows: one completion is a prefix of the "
        "other, so there is no point where the prompt ends (rows 2, 3, 4, 5, 6); row 7: chosen == rejected)"
    )


def test_unrecognised_format_named_once_per_source(tmp_path):
    rows = [{"text": f"t{i}", "label": 1} for i in range(50)]
    with pytest.raises(DataError) as e:
        load_pairs([SourceConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)))], None, 0.01)
    msg = str(e.value)
    assert msg.count("unrecognised format") == 1 and "row 1 has the keys text, label" in msg
    assert "chosen_messages, rejected_messages" in msg and "input, preferred_output" in msg
