"""Documents of a split: TFDS datasets (random access) and local files; the train/eval leak check."""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator

import tensorflow_datasets as tfds

from llama_jax.data.config import DataConfig
from llama_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Documents:
    """The documents of one split: `read(lo, hi)` yields texts lo..hi-1 (SFT: ("path:line", record) pairs);
    a name for messages; a cache key."""

    name: str
    key: str
    num_docs: int
    read: Callable[[int, int], Iterator]

    def __len__(self) -> int:
        return self.num_docs

    def __iter__(self) -> Iterator[str]:
        return self.read(0, self.num_docs)

    @classmethod
    def from_texts(cls, texts: list[str], name: str = "texts") -> Documents:
        key = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
        return cls(name, f"texts:{key}", len(texts), lambda lo, hi: iter(texts[lo:hi]))


def tfds_builder(name: str, data_dir: str, manual_dir: str):
    """The prepared array_record builder for `name`, building it first if needed (offline with manual_dir)."""
    try:
        builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See tfds.list_builders() for names."
        raise DataError(f"unknown TFDS dataset {name!r} (--config.data.tfds_name).{hint}") from e
    except ValueError as e:
        if "File format is already set" in str(e):
            raise DataError(
                f"TFDS dataset {name!r} in data_dir {data_dir or '(default)'} was built as tfrecord, but the "
                "pipeline needs random access (array_record). Point --config.data.data_dir at another "
                "directory (it is rebuilt there), or delete the old build."
            ) from e
        raise
    if builder.is_prepared():
        return builder
    download_config = None
    if manual_dir:
        if not os.path.isdir(manual_dir):
            raise DataError(f"manual_dir {manual_dir} does not exist (--config.data.manual_dir).")
        if builder.name == "tiny_shakespeare" and not os.path.exists(os.path.join(manual_dir, "input.txt")):
            raise DataError(
                f"manual_dir {manual_dir} has no input.txt: copy karpathy's tiny-shakespeare input.txt "
                f"there to build tiny_shakespeare offline (from the repo root: `cp "
                f"../shared/data/tinyshakespeare.txt {manual_dir}/input.txt`)."
            )
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    # Building can take minutes (and, offline without manual_dir, TFDS retries downloads for minutes): say so.
    logging.getLogger(__name__).info(
        "building TFDS dataset %s into %s%s", builder.info.full_name, builder.data_dir,
        f" from {manual_dir}" if manual_dir else " (downloading; offline, pass --config.data.manual_dir)",
    )
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as e:  # TFDS raises many types; all get the fix named
        raise DataError(
            f"could not build TFDS dataset {name!r} into {builder.data_dir}: {type(e).__name__}: {e}\n"
            "If the machine is offline or the dataset needs manual files, put the downloaded files in a "
            "directory and pass it as --config.data.manual_dir (tiny_shakespeare: input.txt); or point "
            "--config.data.data_dir at a directory where the dataset is already built."
        ) from e
    return builder


def _split_ranges(builder, split: str) -> list[tuple[str, int, int]]:
    """(split name, from, to) example ranges a TFDS split string selects, validated."""
    try:
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
    except (ValueError, KeyError) as e:
        raise DataError(
            f"bad split {split!r} for TFDS dataset {builder.name}: {e}. Available splits: "
            f"{sorted(builder.info.splits)}; slices look like 'train[:95%]' or 'train[1000:]'."
        ) from e
    out = []
    for ins in instructions:
        n = builder.info.splits[ins.splitname].num_examples
        out.append((ins.splitname, ins.from_ or 0, n if ins.to is None else ins.to))
    return out


def tfds_documents(
    name: str, split: str, *, text_key: str = "text", data_dir: str = "", manual_dir: str = ""
) -> Documents:
    """The `text_key` texts of a TFDS split (built first if needed), read by random access."""
    builder = tfds_builder(name, data_dir, manual_dir)
    if sum(b - a for _, a, b in _split_ranges(builder, split)) <= 0:
        raise DataError(f"split {split!r} of TFDS dataset {builder.name} is empty; choose another split.")
    source = builder.as_data_source(split=split)
    keys = list(builder.info.features.keys())
    if text_key not in keys:
        raise DataError(
            f"TFDS dataset {builder.name} has no feature {text_key!r}; its features are {keys}. Set "
            "--config.data.text_key to the one holding the text."
        )

    def read(lo: int, hi: int) -> Iterator[str]:
        for a in range(lo, hi, 256):
            for record in source.__getitems__(list(range(a, min(a + 256, hi)))):
                text = record[text_key]
                yield text.decode("utf-8") if isinstance(text, bytes) else str(text)

    key = f"tfds:{builder.info.full_name}:{split}:{text_key}"
    return Documents(f"TFDS {builder.info.full_name} split {split!r}", key, len(source), read)


def _expand_files(patterns: str, what: str) -> list[str]:
    paths: list[str] = []
    for pattern in [p.strip() for p in patterns.split(",") if p.strip()]:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise DataError(f"{what}: no file matches {pattern!r}; check the path (relative to the cwd).")
        paths += [p for p in found if os.path.isfile(p)]
    if not paths:
        raise DataError(f"{what} names no files: give comma-separated files or globs.")
    return paths


# JSON's names for the Python types json.loads returns, for messages about a field of the wrong type.
JSON_TYPES = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    list: "an array",
    dict: "an object",
}


def _read_text(path: str, what: str) -> str:
    """The file's text as open(path, encoding="utf-8") reads it (universal newlines), but decoded from the
    bytes in one piece so a bad byte is reported at its offset in the file (a text-mode read reports it
    relative to an internal chunk)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} ({e.reason}). "
            f"Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove it from {what}."
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_objects(path: str, what: str, expect: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a line that is not a JSON object is a DataError at
    path:line (`expect` says what the object should hold)."""
    for lineno, line in enumerate(_read_text(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); each line of a .jsonl file "
                "must be one JSON object. Fix or delete that line."
            ) from e
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{lineno}: is {JSON_TYPES[type(record)]}, not a JSON object; each line of a .jsonl "
                f"file must be one object with {expect}."
            )
        yield lineno, record


def _jsonl_texts(path: str, text_key: str, what: str) -> Iterator[str]:
    """The `text_key` string of every non-blank line; any bad line is a DataError at path:line."""
    for lineno, record in _jsonl_objects(path, what, f"a {text_key!r} field"):
        if text_key not in record:
            raise DataError(
                f"{path}:{lineno} has no field {text_key!r}; its fields are "
                f"{sorted(record)}. Set --config.data.text_key."
            )
        text = record[text_key]
        if not isinstance(text, str):
            # A number or null would otherwise fail (or be silently str()-ed) deep in the tokenizer.
            raise DataError(
                f"{path}:{lineno}: field {text_key!r} is {JSON_TYPES[type(text)]}, not a string; "
                "fix that record, or set --config.data.text_key to the field holding the text."
            )
        yield text


def file_documents(patterns: str, *, text_key: str = "text", what: str = "data files") -> Documents:
    """Documents of local files (read into memory): `.jsonl` = one per line (field `text_key`), other files =
    one per file."""
    paths = _expand_files(patterns, what)
    texts: list[str] = []
    for path in paths:
        if path.endswith(".jsonl"):
            texts += _jsonl_texts(path, text_key, what)
        else:
            texts.append(_read_text(path, what))
    stats = [(os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
    return Documents(
        f"files {patterns!r}", f"files:{stats}:{text_key}", len(texts), lambda lo, hi: iter(texts[lo:hi])
    )


def record_documents(patterns: str, *, what: str = "data files") -> Documents:
    """SFT records of local .jsonl files (read into memory): `read` yields ("path:line", object) pairs, which
    llama_jax.data.sft checks and formats (data.format="sft")."""
    paths = _expand_files(patterns, what)
    records: list[tuple[str, dict]] = []
    for path in paths:
        if not path.endswith(".jsonl"):
            raise DataError(
                f"{path}: with data.format='sft', {what} must be .jsonl files of records (one JSON object "
                'a line: {"prompt": ..., "completion": ...} or {"messages": [...]}).'
            )
        expect = '"messages", or "prompt" and "completion"'
        records += [(f"{path}:{n}", r) for n, r in _jsonl_objects(path, what, expect)]
    stats = [(os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
    return Documents(
        f"files {patterns!r}", f"sft-files:{stats}", len(records), lambda lo, hi: iter(records[lo:hi])
    )


def documents_for_role(data_cfg: DataConfig, role: str) -> Documents:
    """The training ("train") or held-out ("eval") documents `config.data` names (with data.format="sft",
    ("path:line", record) pairs; see record_documents)."""
    if role not in ("train", "eval"):
        raise ValueError(role)
    if data_cfg.train_files:
        files = data_cfg.train_files if role == "train" else data_cfg.eval_files
        if not files:
            raise DataError(
                "with --config.data.train_files, held-out data must be named too: set "
                "--config.data.eval_files (files not among the training files)."
            )
        if data_cfg.format == "sft":
            return record_documents(files, what=f"data.{role}_files")
        return file_documents(files, text_key=data_cfg.text_key, what=f"data.{role}_files")
    return tfds_documents(
        data_cfg.tfds_name,
        data_cfg.train_split if role == "train" else data_cfg.eval_split,
        text_key=data_cfg.text_key,
        data_dir=data_cfg.data_dir,
        manual_dir=data_cfg.manual_dir,
    )


def check_no_leak(data_cfg: DataConfig) -> None:
    """Raise if the eval data overlaps the training data (same TFDS examples or the same local file)."""
    if data_cfg.train_files:
        if not data_cfg.eval_files:
            return
        # Real paths: a symlink (or a second path) to a training file is that training file.
        train = {os.path.realpath(p) for p in _expand_files(data_cfg.train_files, "data.train_files")}
        evals = {os.path.realpath(p) for p in _expand_files(data_cfg.eval_files, "data.eval_files")}
        if train & evals:
            raise DataError(
                f"eval files are also training files: {sorted(train & evals)}; held-out data must not be "
                "trained on. Split the data into separate files."
            )
        return
    builder = tfds_builder(data_cfg.tfds_name, data_cfg.data_dir, data_cfg.manual_dir)
    for s, a, b in _split_ranges(builder, data_cfg.train_split):
        for t, c, d in _split_ranges(builder, data_cfg.eval_split):
            if s == t and max(a, c) < min(b, d):
                raise DataError(
                    f"eval split {data_cfg.eval_split!r} overlaps train split {data_cfg.train_split!r} "
                    f"(examples {max(a, c)}..{min(b, d) - 1} of {s!r}); use disjoint slices, e.g. "
                    "train_split='train[:95%]', eval_split='train[95%:]'."
                )


def no_text(docs: Documents) -> DataError:
    return DataError(f"{docs.name} has no text (no documents, or only empty ones); choose another split.")
