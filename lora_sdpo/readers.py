"""Reading a source into rows: local files (JSON lines, JSON, parquet, CSV/TSV, compressed), folders
written by `datasets`' save_to_disk, and Hub datasets. What the rows mean is lora_sdpo/formats.py's job.

A file whose content is not what its name says (gzip under `.jsonl`, a JSON array under `.jsonl`, a
dataset registry instead of data) is refused with what it is and what to do, not with the first
parse error it causes.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from .errors import DataError

COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
READABLE = (".jsonl, .json, .parquet, .csv or .tsv (the text ones also compressed as .gz, .bz2 or .xz), "
            "or a folder written by datasets' save_to_disk")
# what a file's first bytes say it is, whatever its name
MAGIC = [(b"\x1f\x8b", "gzip", ".gz"), (b"BZh", "bzip2", ".bz2"), (b"\xfd7zXZ\x00", "xz", ".xz"),
         (b"\x28\xb5\x2f\xfd", "zstd", ".zst"), (b"PK\x03\x04", "zip", ".zip"), (b"PAR1", "parquet", ".parquet")]


class CellError(str):
    """A CSV/TSV/parquet cell that starts like JSON structure but does not parse: the row is bad, with this reason."""


class BadRow(str):
    """A row of a flat file that cannot be read into its header's columns (more or fewer fields than the header):
    it stands in the row's place, so the row is reported as bad with this reason and no other row moves."""


def read_source(src, recipe=None) -> list[dict]:
    """All rows of a source (recipe.SourceConfig) as dicts, in file order."""
    if src.dataset is not None:
        return _read_hub(src)
    path = recipe.resolve(src.path) if recipe else Path(src.path)
    if path.is_dir():
        return read_saved(path, src.split)
    return read_file(path)


def _kind(path: Path) -> tuple[str, str | None]:
    """(file type, compression) from the name: data.jsonl.gz -> (".jsonl", "gzip")."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        return (suffixes[-2] if len(suffixes) > 1 else ""), COMPRESSION[suffixes[-1]]
    return (suffixes[-1] if suffixes else ""), None


# byte-order marks, longest first (UTF-32's little-endian mark begins with UTF-16's)
BOMS = [(b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")]


def _open_text(path: Path, compression: str | None, newline: str | None = None):
    """The file as text: UTF-8, or UTF-16/UTF-32 when it starts with their byte-order mark (Windows tools
    write UTF-16 with one); a UTF-8 byte-order mark is skipped, not read as part of row 1."""
    if compression is None:
        raw = path.open("rb")
    else:
        import importlib

        raw = importlib.import_module(compression).open(path, "rb")
    head = raw.peek(4096)[:4096]
    encoding = next((enc for bom, enc in BOMS if head.startswith(bom)), "utf-8-sig")
    if encoding == "utf-8-sig" and head.count(b"\x00") > len(head) // 4:
        # NUL bytes are valid UTF-8: without this, UTF-16 text would be read as keys full of NULs
        raw.close()
        raise DataError(f"{path}: looks like UTF-16 text without a byte-order mark (every other byte is 0); save it "
                        f"as UTF-8 (iconv -f UTF-16LE -t UTF-8 {path.name} > utf8-{path.name})")
    return io.TextIOWrapper(raw, encoding=encoding, newline=newline)


def _not_utf8(path: Path, e: UnicodeDecodeError) -> str:
    """Why a file is not text lora-sdpo reads, and how to convert it."""
    return (f"{path}: not UTF-8 text (it holds the byte 0x{e.object[e.start]:02x}, which UTF-8 text cannot); save it as UTF-8 "
            "(e.g. iconv -f latin1 -t UTF-8), or as UTF-16 with a byte-order mark")


def _sniff(path: Path, suffix: str, compression: str | None) -> None:
    """Refuse content that the name hides: compressed or parquet bytes under a plain text name."""
    if compression is not None or not path.is_file():
        return
    with path.open("rb") as f:
        head = f.read(8)
    for magic, what, ext in MAGIC:
        if head.startswith(magic) and not (what == "parquet" and suffix == ".parquet"):
            if what == "parquet":
                raise DataError(f"{path}: is a parquet file under a {suffix or 'plain'} name; rename it to {path.stem}.parquet")
            if what in ("zstd", "zip"):
                raise DataError(f"{path}: is {what}-compressed data under a plain name; decompress it "
                                f"({'zstd -d' if what == 'zstd' else 'unzip'}) and name the result for its content (.jsonl, .json, .csv)")
            raise DataError(f"{path}: is {what}-compressed data under a plain name; rename it to {path.name}{ext} "
                            "(lora-sdpo reads compressed files by their name)")


def read_file(path: Path) -> list[dict]:
    suffix, compression = _kind(path)
    try:
        _sniff(path, suffix, compression)
        if suffix == ".jsonl":
            with _open_text(path, compression) as f:
                return _json_lines(f, path)
        if suffix == ".json":
            with _open_text(path, compression) as f:
                text = f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg == "Extra data":  # JSON lines in a .json file, as many Hub datasets ship them
                    return _json_lines(io.StringIO(text), path)
                raise DataError(f"{path}: not valid JSON at line {e.lineno} ({e.msg})") from None
            return json_rows(data, path)
        if suffix == ".parquet" and compression is None:
            import pyarrow.parquet as pq

            return [_json_cells(r) for r in pq.read_table(path).to_pylist()]
        if suffix in (".csv", ".tsv"):
            with _open_text(path, compression, newline="") as f:
                return _flat_rows(f, path, "\t" if suffix == ".tsv" else ",")
    except OSError as e:  # also a damaged or mislabelled compressed file (gzip.BadGzipFile, lzma.LZMAError)
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except EOFError:
        raise DataError(f"{path}: the compressed file ends early (truncated download?); fetch it again") from None
    except UnicodeDecodeError as e:
        raise DataError(_not_utf8(path, e)) from None
    name = "".join(path.suffixes[-2:]) if compression else path.suffix
    raise DataError(f"{path}: unsupported file type {name!r}; use {READABLE}")


def _flat_rows(f, path: Path, delimiter: str) -> list:
    """The rows of a CSV or TSV file under its header. A row with more or fewer fields than the header is a
    BadRow naming its line and field count: never shifted into other columns, never cut to fit. A quoting error
    stops the read, naming the line (what follows an unclosed quote cannot be placed)."""
    reader = csv.reader(f, delimiter=delimiter, strict=True)
    what = "tab" if delimiter == "\t" else "comma"
    rows: list = []
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return []
        start = reader.line_num
        for fields in reader:
            line = start + 1
            start = reader.line_num
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                rows.append(BadRow(
                    f"line {line} has {len(fields)} fields for the header's {len(header)} "
                    f"({'an unquoted ' + what + ' in a field?' if len(fields) > len(header) else 'a field missing?'}); "
                    f"quote the fields that hold a {what}, or fix the line"))
                continue
            rows.append(_json_cells(dict(zip(header, fields))))
    except csv.Error as e:
        raise DataError(f"{path}: line {start + 1}: quoting error ({e}); a field that holds a quote must be quoted "
                        'whole, its quotes doubled ("say ""hi""")') from None
    return rows


def _json_lines(f, path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == 1 and line.lstrip().startswith("[") and _is_json_array(line + f.read()):
                raise DataError(f"{path}: is one JSON array, not JSON lines (one row per line); name it "
                                f"{path.name.replace('.jsonl', '.json')} to read it as a JSON list of rows") from None
            raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
    return rows


def _is_json_array(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return False


REGISTRY_KEYS = {"file_name", "hf_hub_url", "ms_hub_url", "script_url", "formatting", "om_hub_url"}


def json_rows(data: Any, path: Path) -> list:
    """The rows of a parsed JSON document, in every layout pandas' DataFrame.to_json writes.

    records: [{...}, ...]; columns (pandas' default): {"chosen": {"0": ..., "1": ...}, ...};
    column lists: {"chosen": [...], "rejected": [...]}; index: {"0": {...}, "1": {...}};
    split: {"columns": [...], "data": [[...], ...]}; table and {"data": [...]}: the rows under "data".
    """
    if isinstance(data, list):
        return data
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a JSON list of rows, an object of columns or JSON lines (in a .jsonl file)")
    if isinstance(data.get("columns"), list) and isinstance(data.get("data"), list) and all(isinstance(r, list) for r in data["data"]):
        return [dict(zip(data["columns"], r)) for r in data["data"]]
    if isinstance(data.get("data"), list):
        return data["data"]
    values = list(data.values())
    if all(isinstance(v, list) for v in values):
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{path}: its columns have different lengths ({', '.join(f'{k}: {n}' for k, n in lengths.items())}); "
                            "every column needs one value per row")
        return [dict(zip(data, r)) for r in zip(*values)]
    if all(isinstance(v, dict) for v in values):
        if all(str(k).isdigit() for k in data):  # index layout: row number -> row
            return [data[k] for k in sorted(data, key=int)]
        entries = [k for k, v in data.items() if REGISTRY_KEYS & set(v)]
        if entries and len(entries) >= len(data) / 2:
            files = [data[k].get("file_name") or data[k].get("hf_hub_url") for k in entries[:3]]
            raise DataError(
                f"{path}: is a dataset registry (as LLaMA-Factory's dataset_info.json: {len(entries)} entries, "
                f"{_names(entries)}), not preference data; point `path` at the data file an entry names "
                f"({', '.join(str(f) for f in files if f)}) and map its columns with `columns = {{...}}`"
            )
        index = list(dict.fromkeys(i for v in values for i in v))
        return [{col: data[col].get(i) for col in data} for i in index]
    raise DataError(f"{path}: expected a JSON list of rows, an object of columns ({{\"chosen\": [...], "
                    "\"rejected\": [...]}}) or JSON lines (in a .jsonl file)")


def _names(keys: list, n: int = 10) -> str:
    shown = ", ".join(map(str, keys[:n]))
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _json_cells(row: dict) -> dict:
    """Cells of a flat file that hold JSON structure (a list of turns or messages, a message) as that structure:
    never trained on as literal JSON text. A cell that starts like JSON structure but does not parse is a CellError."""
    out = {}
    for k, v in row.items():
        if isinstance(v, str):
            s = v.strip()
            meant = JSON_START.match(s) is not None  # `["`, `[{`, `{"`: structure, not prose
            if meant or (s[:1], s[-1:]) in (("[", "]"), ("{", "}")):
                try:
                    parsed = json.loads(s)
                except json.JSONDecodeError as e:
                    if meant:
                        v = CellError(f"`{k}` starts like JSON ({s[:2]}...) but is not valid JSON ({e.msg} at "
                                      f"character {e.pos}); fix the cell or write it as plain text")
                else:
                    if isinstance(parsed, dict) or (isinstance(parsed, list) and parsed
                                                    and all(isinstance(x, (str, dict)) for x in parsed)):
                        v = parsed
        out[k] = v
    return out


JSON_START = re.compile(r'\[\s*["{]|\{\s*"')


def read_saved(path: Path, split: str) -> list[dict]:
    """A folder written by datasets' Dataset.save_to_disk or DatasetDict.save_to_disk (`split` picks the split)."""
    if (path / "dataset_dict.json").is_file():
        kind = "dict"
    elif (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        kind = "dataset"
    else:
        raise DataError(f"{path}: is a folder, but not one written by datasets' save_to_disk (no dataset_dict.json or "
                        "state.json in it); point `path` at a data file in it")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise DataError(f"{path}: cannot load the saved dataset ({type(e).__name__}: {e})") from None
    if kind == "dict":
        if split not in ds:
            raise DataError(f"{path}: holds the splits {', '.join(ds)}, not {split!r}; set `split` to one of them")
        ds = ds[split]
    return ds.to_list()


def _read_hub(src) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(src.dataset, split=src.split, revision=src.revision)
    except Exception as e:  # the Hub client raises many types; all mean "not reachable here"
        raise DataError(
            f"dataset {src.dataset!r} (split {src.split!r}) is not reachable: {type(e).__name__}: {e}. "
            "Without network access (HF_HUB_OFFLINE=1), download it first or point `path` at a local file."
        ) from None
    return ds.to_list()
