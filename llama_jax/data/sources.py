"""Where text comes from: documents of a split (TFDS datasets, random access; files, read into memory for
small data), a source as shards (files, or ranges of a split's documents) for the token cache, and the
train/eval leak check."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator

import numpy as np

from llama_jax.data import files
from llama_jax.data.config import DataConfig, SourceConfig
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

    @classmethod
    def concat(cls, parts: list[Documents]) -> Documents:
        """The documents of `parts`, one after another."""
        ends = np.cumsum([len(p) for p in parts])

        def read(lo: int, hi: int) -> Iterator:
            for i, part in enumerate(parts):
                a = int(ends[i]) - len(part)
                if a < hi and lo < ends[i]:
                    yield from part.read(max(lo, a) - a, min(hi, int(ends[i])) - a)

        return cls(" + ".join(p.name for p in parts), "|".join(p.key for p in parts), int(ends[-1]), read)


def _tfds():
    """tensorflow_datasets, imported on first use: training from local files (data.train_files) needs no
    TFDS, and GPU images often ship without it (seen on a CUDA image with jax and flax but no TFDS)."""
    import tensorflow_datasets as tfds

    return tfds


def tfds_builder(name: str, data_dir: str, manual_dir: str):
    """The prepared array_record builder for `name`, building it first if needed (offline with manual_dir)."""
    tfds = _tfds()
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
    tfds = _tfds()
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

def file_documents(patterns: str, *, text_key: str = "text", what: str = "data files") -> Documents:
    """Documents of shard files (llama_jax/data/files.py formats), read into memory: for small data, tokenizer
    training and held-out files."""
    infos = files.expand_files(patterns, what)
    texts: list[str] = [t for info in infos for t in files.file_texts(info.path, text_key, what)]
    stats = [(info.path, info.size, info.version) for info in infos]
    return Documents(
        f"files {patterns!r}", f"files:{stats}:{text_key}", len(texts), lambda lo, hi: iter(texts[lo:hi])
    )


def record_documents(patterns: str, *, what: str = "data files") -> Documents:
    """SFT records of .jsonl files (read into memory): `read` yields ("path:line", object) pairs, which
    llama_jax.data.sft checks and formats (data.format="sft")."""
    infos = files.expand_files(patterns, what)
    records: list[tuple[str, dict]] = []
    for info in infos:
        if files.format_of(info.path)[0] != "jsonl":
            raise DataError(
                f"{info.path}: with data.format='sft', {what} must be .jsonl files of records (one JSON object "
                'a line: {"prompt": ..., "completion": ...} or {"messages": [...]}).'
            )
        records += files.json_records(info.path, what, '"messages", or "prompt" and "completion"')
    stats = [(info.path, info.size, info.version) for info in infos]
    return Documents(
        f"files {patterns!r}", f"sft-files:{stats}", len(records), lambda lo, hi: iter(records[lo:hi])
    )


# ---------------------------------------------------------------------- sources, in shards


@dataclasses.dataclass(frozen=True)
class Shard:
    """A unit of tokenization and caching: one file, or a range of a split's documents."""

    name: str  # the file's path or URL, or "DATASET[lo:hi]"
    version: str  # "size:mtime" of a file (a change after caching is refused); "" for a range of a split
    read: Callable[[], Iterator]  # its texts (SFT: ("path:line", record) pairs)


@dataclasses.dataclass(frozen=True)
class Source:
    """The training or held-out text of one named source, in shards."""

    name: str  # the data.sources name (or the one implicit source's)
    description: str  # for messages: "TFDS tiny_shakespeare/1.0.0 split 'train'", "files 'gs://b/*.parquet'"
    key: str  # what text this is (dataset or globs, split, text field): part of a cache's identity
    shards: tuple[Shard, ...]

    @classmethod
    def from_documents(cls, docs: Documents, name: str = "", shard_docs: int = 100_000) -> Source:
        """`docs` cut into shards of `shard_docs` documents (TFDS splits, in-memory texts)."""
        n = len(docs)
        shards = tuple(
            Shard(f"{docs.name}[{lo}:{min(lo + shard_docs, n)}]", "",
                  functools.partial(docs.read, lo, min(lo + shard_docs, n)))
            for lo in range(0, n, shard_docs)
        )
        return cls(name or docs.name, docs.name, docs.key, shards)


def _role_fields(cfg: SourceConfig, role: str) -> tuple[str, str]:
    """(files, TFDS split) of a source for `role`, with the error for missing held-out files."""
    if role not in ("train", "eval"):
        raise ValueError(role)
    if cfg.train_files and role == "eval" and not cfg.eval_files:
        raise DataError(
            "with --config.data.train_files, held-out data must be named too: set "
            f"--config.data.eval_files (files not among the training files; source {cfg.name!r})."
        )
    if role == "train":
        return cfg.train_files, cfg.train_split
    return cfg.eval_files, cfg.eval_split


def _what(cfg: SourceConfig, data_cfg: DataConfig, role: str) -> str:
    """The config field naming a source's (or held-out set's) files, for messages."""
    if cfg.name in data_cfg.eval_sets:
        return f"data.eval_sets.{cfg.name}.files"
    return f"data.sources.{cfg.name}.{role}_files" if data_cfg.sources else f"data.{role}_files"


def source_for_role(cfg: SourceConfig, data_cfg: DataConfig, role: str) -> Source:
    """The shards of one source's (or data.eval_sets entry's) training ("train") or held-out ("eval") text."""
    patterns, split = _role_fields(cfg, role)
    what = _what(cfg, data_cfg, role)
    if data_cfg.format == "sft":
        docs = record_documents(patterns, what=what)
        return Source(cfg.name, docs.name, docs.key, (Shard(patterns, "", functools.partial(docs.read, 0, len(docs))),))
    if patterns:
        read = functools.partial(files.file_texts, text_key=cfg.text_key, what=what)
        shards = tuple(Shard(i.path, f"{i.size}:{i.version}", functools.partial(read, i.path))
                       for i in files.expand_files(patterns, what))
        return Source(cfg.name, f"files {patterns!r}", f"files:{patterns}:{cfg.text_key}", shards)
    docs = tfds_documents(cfg.tfds_name, split, text_key=cfg.text_key, data_dir=cfg.data_dir,
                          manual_dir=cfg.manual_dir)
    return Source.from_documents(docs, cfg.name, data_cfg.shard_docs)


def source_documents(data_cfg: DataConfig, role: str) -> dict[str, Documents]:
    """Each source's training ("train") or held-out ("eval") documents, in memory (with data.format="sft",
    ("path:line", record) pairs; see record_documents). Held-out: a source of several without held-out
    files has none. held_out_documents adds the data.eval_sets entries."""
    cfgs = data_cfg.source_configs() if role == "train" else data_cfg.held_out_configs()
    return {cfg.name: _documents(cfg, data_cfg, role) for cfg in cfgs if cfg.name not in data_cfg.eval_sets}


def held_out_documents(data_cfg: DataConfig, names: list[str] | None = None) -> dict[str, Documents]:
    """Every held-out set by name: each source's (source_documents) then each data.eval_sets entry's; or
    only those `names` lists, in that order (one not among them is an error listing those there are)."""
    cfgs = {c.name: c for c in data_cfg.held_out_configs()}
    unknown = [n for n in names or [] if n not in cfgs]
    if unknown:
        raise DataError(f"no held-out set named {unknown}; this config has {list(cfgs)} (its sources' held-out "
                        "data and data.eval_sets).")
    return {n: _documents(cfgs[n], data_cfg, "eval") for n in (names or cfgs)}


def _documents(cfg: SourceConfig, data_cfg: DataConfig, role: str) -> Documents:
    patterns, split = _role_fields(cfg, role)
    what = _what(cfg, data_cfg, role)
    if data_cfg.format == "sft":
        return record_documents(patterns, what=what)
    if patterns:
        return file_documents(patterns, text_key=cfg.text_key, what=what)
    return tfds_documents(cfg.tfds_name, split, text_key=cfg.text_key, data_dir=cfg.data_dir,
                          manual_dir=cfg.manual_dir)


def documents_for_role(data_cfg: DataConfig, role: str) -> Documents:
    """All sources' training or held-out documents (source_documents), one after another in name order."""
    docs = list(source_documents(data_cfg, role).values())
    if not docs:
        raise DataError("no source names held-out data: set eval_files (or a TFDS eval_split) on a source.")
    return docs[0] if len(docs) == 1 else Documents.concat(docs)


def check_no_leak(data_cfg: DataConfig) -> None:
    """Raise if any held-out data (a source's, or a data.eval_sets entry's) overlaps training data: the same
    TFDS examples, or the same file (no held-out file may be any source's training file)."""
    sources = data_cfg.source_configs()
    train = {p for cfg in sources for p in _real_paths(cfg.train_files, "data.train_files")}
    for cfg in (*sources, *data_cfg.eval_set_configs()):
        named = f"data.eval_sets.{cfg.name}" if cfg.name in data_cfg.eval_sets else "eval files"
        both = sorted(train & set(_real_paths(cfg.eval_files, _what(cfg, data_cfg, "eval"))))
        if both:
            raise DataError(
                f"{named} are also training files: {both}; held-out data must not be trained on. Split the "
                "data into separate files."
            )
        if not cfg.eval_files and not cfg.train_files:  # held-out data from a TFDS split
            for trained in sources:
                _check_splits_disjoint(trained, cfg, named)


def _real_paths(patterns: str, what: str) -> list[str]:
    # Real paths: a symlink (or a second path) to a training file is that training file.
    return [info.path if files.is_remote(info.path) else os.path.realpath(info.path)
            for info in (files.expand_files(patterns, what) if patterns else [])]


def _check_splits_disjoint(trained: SourceConfig, held_out: SourceConfig, named: str) -> None:
    """Raise if `held_out`'s TFDS eval split shares examples with `trained`'s train split (same dataset)."""
    if trained.train_files or trained.tfds_name != held_out.tfds_name:
        return
    builder = tfds_builder(trained.tfds_name, trained.data_dir, trained.manual_dir)
    for s, a, b in _split_ranges(builder, trained.train_split):
        for t, c, d in _split_ranges(builder, held_out.eval_split):
            if s == t and max(a, c) < min(b, d):
                where = "eval split" if named == "eval files" else f"{named}.split"
                raise DataError(
                    f"{where} {held_out.eval_split!r} overlaps train split {trained.train_split!r} "
                    f"(examples {max(a, c)}..{min(b, d) - 1} of {s!r}); use disjoint slices, e.g. "
                    "train_split='train[:95%]', eval_split='train[95%:]'."
                )


def no_text(name: str) -> DataError:
    return DataError(f"{name} has no text (no documents, or only empty ones); choose another split.")
