"""Reading labelled data: CoNLL token/tag files, CSV/TSV/JSONL text+label files, `datasets` hub names.

Readers return plain lists of records (dicts) that remember where they came from (``_where`` =
"file:line"), so every later problem (an unseen label, an empty text) can name the file and line.
Errors raise :class:`PeftlabError` with one line.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .errors import PeftlabError
from .recipe import DataConfig
from .util import read_utf8

EXTENSIONS = {
    ".conll": "conll",
    ".conllu": "conll",
    ".bio": "conll",
    ".iob": "conll",
    ".annotated": "conll",
    ".txt": "conll",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
}


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    test: Optional[list[dict]]
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """Every example of every split (train, validation, then test)."""
        return self.train + self.validation + (self.test or [])


def _read_text(path: Path, key: str) -> str:
    if not path.exists():
        raise PeftlabError(f"data.{key}: file not found: {path}")
    if not path.is_file():
        raise PeftlabError(f"data.{key}: not a file: {path}")
    return read_utf8(path, "data files must be UTF-8")


def read_conll(path: Path, key: str = "train", notes: Optional[list[str]] = None) -> list[dict]:
    """One ``TOKEN<TAB>TAG`` (or whitespace-separated, tag last) per line; any whitespace-only line
    ends a sentence; ``-DOCSTART-`` lines are skipped. A line whose token is empty (``<TAB>O``, as in
    some corpora in the wild) holds no word: it is skipped, and ``notes`` gets one line counting them."""
    text = _read_text(path, key)
    sentences: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    empty_tokens: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags, "_where": f"{path}:{start}"})
                tokens, tags = [], []
            continue
        if line.startswith("-DOCSTART-"):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) >= 2 and not parts[0].strip() and parts[-1].strip():
            empty_tokens.append(lineno)
            continue
        if len(parts) < 2 or not parts[-1].strip():
            raise PeftlabError(
                f"{path}:{lineno}: expected 'TOKEN<TAB>TAG', found no tag in {line.strip()[:40]!r}"
            )
        if not tokens:
            start = lineno
        tokens.append(parts[0])
        tags.append(parts[-1].strip())
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags, "_where": f"{path}:{start}"})
    if empty_tokens and notes is not None:
        notes.append(f"{path}:{empty_tokens[0]}: skipped {len(empty_tokens)} line(s) whose token is empty "
                     "(a tag with no word)")
    return sentences


def read_table(path: Path, delimiter: str, columns: list[str], key: str, may_be_empty: tuple = (),
               named_by: Optional[Mapping[str, str]] = None) -> list[dict]:
    text = _read_text(path, key)
    csv.field_size_limit(2**31 - 1)  # a long text cell is data, not an error (the default is 128 KiB)
    # strict: a stray or unclosed quote is an error, not a field that silently swallows the lines after it
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        return _table_rows(reader, path, columns, may_be_empty, named_by)
    except csv.Error as exc:  # line_num counts the lines read before the bad one
        raise PeftlabError(f"{path}:{reader.line_num + 1}: not valid {'CSV' if delimiter == ',' else 'TSV'}: "
                           f"{exc}") from None


def _table_rows(reader: csv.DictReader, path: Path, columns: list[str], may_be_empty: tuple = (),
                named_by: Optional[Mapping[str, str]] = None) -> list[dict]:
    header = reader.fieldnames or []
    for col in columns:
        if col not in header:
            raise PeftlabError(
                f"{path}:1: no column '{col}' in the header (columns: {', '.join(header) or 'none'}); "
                f"{column_hint(col, named_by)}"
            )
    rows = []
    for row in reader:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        for col in columns:
            if row.get(col) is None:
                raise PeftlabError(f"{path}:{reader.line_num}: row has no value for column '{col}'")
            if not row[col].strip() and col not in may_be_empty:
                raise PeftlabError(f"{path}:{reader.line_num}: column '{col}' is empty")
        rows.append({**{c: row[c] for c in columns}, "_where": f"{path}:{reader.line_num}"})
    return rows


def column_hint(col: str, named_by: Optional[Mapping[str, str]]) -> str:
    """Where the recipe names column ``col`` (the task's ``column_keys()``), for a missing-column error."""
    key = (named_by or {}).get(col)
    return f"the recipe names it in {key}" if key else "the recipe's column keys name the columns"


def read_jsonl(path: Path, columns: list[str], key: str, named_by: Optional[Mapping[str, str]] = None) -> list[dict]:
    text = _read_text(path, key)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PeftlabError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise PeftlabError(f"{path}:{lineno}: expected a JSON object per line")
        for col in columns:
            if col not in obj:
                raise PeftlabError(f"{path}:{lineno}: no key '{col}' (keys: {', '.join(obj)}); "
                                   f"{column_hint(col, named_by)}")
        rows.append({**{c: obj[c] for c in columns}, "_where": f"{path}:{lineno}"})
    return rows


def _format_of(cfg: DataConfig, path: Path) -> str:
    if cfg.format != "auto":
        return cfg.format
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise PeftlabError(
            f"data.format: cannot tell the format of {path.name} from its extension; "
            f"set data.format to one of conll, csv, tsv, jsonl"
        )
    return fmt


def read_split(cfg: DataConfig, key: str, columns: list[str], kind: str, notes: Optional[list[str]] = None,
               may_be_empty: tuple = (), named_by: Optional[Mapping[str, str]] = None) -> list[dict]:
    """Read one split (``key`` = train/validation/test). ``kind`` is 'tokens', 'text' or 'qa'; CSV/TSV
    cells of the ``may_be_empty`` columns may be empty (a multi-label row without labels);
    ``named_by`` maps a column to the recipe key that names it (for errors)."""
    source = getattr(cfg, key)
    if cfg.hub is not None or cfg.format == "hub":
        rows = read_hub_split(cfg, source, columns, key, named_by)
    else:
        path = Path(source).expanduser()
        fmt = _format_of(cfg, path)
        if kind == "qa" and cfg.format == "auto" and path.suffix.lower() == ".json":  # SQuAD's own layout
            rows = read_squad(path, key, columns)
        elif kind == "qa" and fmt != "jsonl":
            raise PeftlabError(f"data.{key}: question answering reads SQuAD JSON or JSONL, not {fmt}")
        elif fmt == "conll":
            if kind != "tokens":
                raise PeftlabError(f"data.{key}: CoNLL files hold token tags; this task needs text rows")
            rows = read_conll(path, key, notes)
            rows = [{columns[0]: r["tokens"], columns[1]: r["tags"], "_where": r["_where"]} for r in rows]
        elif fmt in ("csv", "tsv"):
            if kind == "tokens":
                raise PeftlabError(f"data.{key}: {fmt} rows hold texts; NER needs CoNLL or JSONL token lists")
            rows = read_table(path, "," if fmt == "csv" else "\t", columns, key, may_be_empty, named_by)
        else:
            rows = read_jsonl(path, columns, key, named_by)
    if not rows:
        raise PeftlabError(f"data.{key}: no examples in {source} (empty split)")
    return rows


def read_squad(path: Path, key: str, columns: list[str]) -> list[dict]:
    """SQuAD JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``): one row per
    question, with ``columns`` = the recipe's (question, context, answers) names, plus ``id`` and
    ``title``; ``answers`` is a list of ``{"text", "answer_start"}``."""
    try:
        doc = json.loads(_read_text(path, key))
    except json.JSONDecodeError as exc:
        raise PeftlabError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise PeftlabError(f"{path}: expected SQuAD JSON, an object whose 'data' is a list of articles")
    q_col, c_col, a_col = columns[:3]
    rows = []
    for a, article in enumerate(doc["data"]):
        title = article.get("title", f"article {a}") if isinstance(article, dict) else None
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise PeftlabError(f"{path}: data[{a}]: expected an article with a list of 'paragraphs'")
        for p, para in enumerate(paragraphs):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) or not isinstance(
                    para.get("qas"), list):
                raise PeftlabError(f"{where}: expected an object with a string 'context' and a list 'qas'")
            for q, qa in enumerate(para["qas"]):
                if not isinstance(qa, dict) or "question" not in qa:
                    raise PeftlabError(f"{where}.qas[{q}]: expected an object with a 'question' (and 'answers')")
                rows.append({"id": str(qa.get("id", f"{a}-{p}-{q}")), "title": title, c_col: para["context"],
                             q_col: qa.get("question"), a_col: qa.get("answers", []),
                             "_where": f"{where}.qas[{q}] (id {qa.get('id', '?')})"})
    return rows


def read_hub_split(cfg: DataConfig, split: str, columns: list[str], key: str,
                   named_by: Optional[Mapping[str, str]] = None) -> list[dict]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise PeftlabError("data.hub: the `datasets` package is not installed") from None
    try:
        ds = datasets.load_dataset(cfg.hub, cfg.hub_config, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub/network error becomes one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftlabError(f"data.{key}: cannot load '{cfg.hub}' split '{split}': {first}") from None
    for col in columns:
        if col not in ds.column_names:
            raise PeftlabError(
                f"data.{key}: hub dataset '{cfg.hub}' has no column '{col}' "
                f"(columns: {', '.join(ds.column_names)}); {column_hint(col, named_by)}"
            )
    names: dict[str, Any] = {}
    for col in columns:
        feat = ds.features[col]
        inner = getattr(feat, "feature", None)
        if hasattr(feat, "names"):
            names[col] = ("scalar", feat.names)
        elif inner is not None and hasattr(inner, "names"):
            names[col] = ("list", inner.names)
    rows = []
    for i, ex in enumerate(ds):
        row = {c: ex[c] for c in columns}
        for col, (shape, labels) in names.items():
            row[col] = labels[row[col]] if shape == "scalar" else [labels[v] for v in row[col]]
        row["_where"] = f"{cfg.hub}[{split}]#{i}"
        rows.append(row)
    return rows


def _fixed_seed_subset(rows: list, n: int, seed: int) -> list:
    """``n`` rows drawn with a fixed seed, kept in file order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:n])]


def hold_out(train: list[dict], cfg: DataConfig, group: Optional[Callable[[dict], Any]] = None,
             unit: str = "examples") -> tuple[list[dict], list[dict], str]:
    """(train, validation, note): a fixed-seed fraction of train held out, whole groups at a time when
    ``group`` is given (every question of one article, so that no context is in both)."""
    key_of_row = [group(ex) for ex in train] if group else list(range(len(train)))
    keys = list(dict.fromkeys(key_of_row))
    order = list(range(len(keys)))
    random.Random(cfg.split_seed).shuffle(order)
    n_val = max(1, round(len(keys) * cfg.validation_split))
    if n_val >= len(keys):
        raise PeftlabError(f"data.validation_split: holding out {n_val} of {len(keys)} training {unit} leaves "
                           f"none to train on")
    held = {keys[i] for i in order[:n_val]}
    validation = [ex for ex, key in zip(train, key_of_row) if key in held]
    rest = [ex for ex, key in zip(train, key_of_row) if key not in held]
    whole = f" ({n_val} whole {unit})" if group else ""
    note = (f"validation: {len(validation)} examples{whole} held out of train "
            f"(fraction {cfg.validation_split}, seed {cfg.split_seed})")
    return rest, validation, note


def load_splits(cfg: DataConfig, columns: list[str], kind: str, may_be_empty: tuple = (),
                group: Optional[Callable[[dict], Any]] = None, unit: str = "examples",
                named_by: Optional[Mapping[str, str]] = None) -> Splits:
    """Read train/validation/test; carve a fixed-seed validation split when none is given (whole
    ``group``s of examples at a time when given; ``unit`` names them). ``named_by``: the task's
    ``column_keys()``, so that a missing column names the recipe key to change."""
    notes = []
    read = functools.partial(read_split, cfg, columns=columns, kind=kind, notes=notes, may_be_empty=may_be_empty,
                             named_by=named_by)
    train = read(key="train")
    if cfg.validation is not None:
        validation = read(key="validation")
    else:
        train, validation, note = hold_out(train, cfg, group, unit)
        notes.append(note)
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        train = _fixed_seed_subset(train, cfg.max_train_samples, cfg.split_seed + 1)
        notes.append(f"train: fixed-seed subset of {len(train)} examples (seed {cfg.split_seed + 1})")
    test = read(key="test") if cfg.test is not None else None
    if test is not None and cfg.max_test_samples is not None and cfg.max_test_samples < len(test):
        notes.append(f"test: fixed-seed subset of {cfg.max_test_samples} of {len(test)} examples (seed {cfg.split_seed + 2})")
        test = _fixed_seed_subset(test, cfg.max_test_samples, cfg.split_seed + 2)
    return Splits(train=train, validation=validation, test=test, notes=notes)


def _kind_of(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def check_text_rows(rows: list[dict], text_columns: list[str]) -> None:
    """Every text column holds a non-empty string (JSONL can hold null, numbers, lists)."""
    for row in rows:
        for col in text_columns:
            value = row[col]
            if not isinstance(value, str):
                raise PeftlabError(f"{row['_where']}: '{col}' is {_kind_of(value)}; expected a string")
            if not value.strip():
                raise PeftlabError(f"{row['_where']}: '{col}' is empty")


def check_labels(rows: list[dict], col: str) -> None:
    """One label per row, all strings or all integers: 1 and "1" must not silently become one label."""
    first: Optional[tuple[str, str]] = None  # (kind, where) of the first label
    for row in rows:
        value, kind = row[col], _kind_of(row[col])
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise PeftlabError(f"{row['_where']}: label '{col}' is {kind}; expected a string or an integer")
        first = first or (kind, row["_where"])
        if kind != first[0]:
            raise PeftlabError(f"{row['_where']}: label {value!r} is {kind}, but the label at {first[1]} is "
                               f"{first[0]}; use one type for every label")


TAG_PREFIXES = ("B-", "I-", "E-", "S-")  # IOB2, and IOBES's end / single


def check_token_rows(rows: list[dict], tok_col: str, tag_col: str) -> None:
    """Tokens and tags are lists of strings of the same length; tags are IOB2/IOBES (``O``, ``B-PER``)."""
    for row in rows:
        where, tokens, tags = row["_where"], row[tok_col], row[tag_col]
        for col, value in ((tok_col, tokens), (tag_col, tags)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                got = _kind_of(value) if not isinstance(value, list) else "a list holding non-strings"
                raise PeftlabError(f"{where}: '{col}' is {got}; expected a list of strings")
        if len(tokens) != len(tags):
            raise PeftlabError(f"{where}: {len(tokens)} tokens but {len(tags)} tags; expected one tag per token")
        if any(not tok for tok in tokens):
            raise PeftlabError(f"{where}: token {tokens.index('') + 1} is empty; every token must be a word")
        for tag in tags:
            if tag != "O" and not (tag[:2] in TAG_PREFIXES and len(tag) > 2):
                hint = f" (e.g. B-{tag} / I-{tag})" if "-" not in tag else ""
                raise PeftlabError(f"{where}: tag '{tag}' is not IOB2: expected O, B-TYPE or I-TYPE{hint}")
