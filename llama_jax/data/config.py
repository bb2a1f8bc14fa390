"""`config.data`: where the text comes from, how it is tokenized, packed and mixed (see
llama_jax/data/__init__)."""

from __future__ import annotations

import dataclasses
import re

from llama_jax.errors import ConfigError
from llama_jax.sections import Section

PACKING_MODES = ("concat", "packed")
FORMATS = ("text", "sft")
LOSS_ON = ("responses", "all")
# The fields a named source (data.sources.NAME) may set; those it does not set come from config.data.
SOURCE_FIELDS = ("tfds_name", "train_split", "eval_split", "text_key", "data_dir", "manual_dir", "train_files",
                 "eval_files", "weight")
# The fields a named held-out set (data.eval_sets.NAME) may set: `files`, or a TFDS `split` (of `tfds_name`);
# text_key, data_dir, manual_dir and tfds_name it does not set come from config.data.
EVAL_SET_FIELDS = ("files", "tfds_name", "split", "text_key", "data_dir", "manual_dir")
# Rows of eval_ppl's table and keys of eval/<name>/...: a set may not take these names.
RESERVED_SET_NAMES = ("mean", "total")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    SECTION = "data"

    tfds_name: str = "tiny_shakespeare"
    train_split: str = "train"  # TFDS split syntax, slices allowed: "train[:95%]"
    eval_split: str = "validation"  # held out; must not overlap train_split
    text_key: str = "text"  # TFDS feature / jsonl field holding the text
    data_dir: str = ""  # TFDS data dir ("" = TFDS default; gs:// works)
    manual_dir: str = ""  # offline builds: dir with the downloaded files (tiny_shakespeare: input.txt)
    # Comma-separated globs of shard files, local or on a bucket (gs://): .jsonl, .parquet, .array_record,
    # optionally .gz/.zst; any other file is one document (llama_jax/data/files.py). Overrides tfds_name.
    train_files: str = ""
    eval_files: str = ""  # held-out files; required with train_files
    # "byte", a tokenizer.model/tokenizer.json, a dir holding one, or "train:bpe:N" / "train:unigram:N"
    # (a SentencePiece model of N pieces trained on the training split, kept in WORKDIR/tokenizer).
    tokenizer: str = "byte"
    packing: str = "concat"  # "concat" (attend across docs) or "packed" (segment_ids per doc)
    add_bos: bool = True
    add_eos: bool = True
    eval_batch_size: int = 0  # 0 = the training batch_size
    # The tokenized cache (llama_jax/data/cache.py), local or gs://: each source's shards tokenized once, read
    # by range on every later run and host. "" = tokenize in memory at start (small data).
    cache_dir: str = ""
    shard_docs: int = 100_000  # TFDS splits are cut into cache shards of this many documents
    shuffle_shards: int = 16  # shards whose rows are shuffled together (a window); windows are shuffled too
    # Several sources, mixed by weight: {NAME: {field: value, ...}} with fields of SOURCE_FIELDS (weight, and
    # where the text comes from); unset fields come from this section. {} = one source, this section's.
    sources: dict = dataclasses.field(default_factory=dict)
    # Weights that change during training: "STEP:NAME=W,NAME=W;STEP:..." (each stage lists every source).
    stages: str = ""
    # Held-out sets scored at every evaluation besides the sources' own (never trained on): {NAME: {field:
    # value}} with fields of EVAL_SET_FIELDS, each `files` (globs, as eval_files) or a TFDS `split`; logged
    # as eval/NAME/{loss,perplexity,bits_per_byte}, with eval/mean/* (unweighted over sets) and the total.
    eval_sets: dict = dataclasses.field(default_factory=dict)
    mixture_block: int = 1024  # rows per mixture block: each source gives exactly round(weight*block) rows
    prefetch: int = 2  # batches computed ahead in a background thread
    # Supervised fine-tuning (llama_jax/data/sft.py): "sft" reads train_files / eval_files as .jsonl records,
    # {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}; "packed" only.
    format: str = "text"
    loss_on: str = "responses"  # sft: "responses" (completions, assistant turns) or "all" (every token)
    # sft chat records: "" = the tokenizer dir's template (chat_template.jinja / tokenizer_config.json), a
    # shipped name ("chatml", "llama3"; llama_jax/data/chat.py) or a .jinja file.
    chat_template: str = ""
    # sft: at each evaluation also generate (greedy) for the first N held-out records and log the fraction
    # whose completion (or last assistant turn) equals the record's after stripping whitespace as
    # eval/exact_match (llama_jax/inference/exact_match.py); 0 = off.
    exact_match_records: int = 0

    def __post_init__(self):
        self._check(self.packing in PACKING_MODES, f"data.packing={self.packing!r} is not one of {PACKING_MODES}.")
        for name in ("eval_batch_size", "prefetch", "exact_match_records"):
            v = getattr(self, name)
            self._check(v >= 0, f"data.{name}={v} must be >= 0.")
        for name in ("shard_docs", "shuffle_shards", "mixture_block"):
            v = getattr(self, name)
            self._check(v >= 1, f"data.{name}={v} must be >= 1.")
        self.source_configs()  # every source's fields are checked once, here
        self.eval_set_configs()
        self.stage_weights()
        self._check(bool(self.text_key), "data.text_key must name the feature or field holding the text.")
        self._check(bool(self.tokenizer), "data.tokenizer must be 'byte', a tokenizer file or dir, or train:bpe:N.")
        self._check(self.format in FORMATS, f"data.format={self.format!r} is not one of {FORMATS}.")
        self._check(self.loss_on in LOSS_ON, f"data.loss_on={self.loss_on!r} is not one of {LOSS_ON}.")
        self._check(self.format == "sft" or not self.exact_match_records, "data.exact_match_records needs "
                    "records with reference answers: data.format='sft' (prompt/completion or chat records).")
        if self.format == "sft":
            # A row must never let one conversation attend into the next, and each record is its own segment.
            self._check(self.packing == "packed", "data.format='sft' needs data.packing='packed' (one "
                        "segment per record, so conversations never attend into each other).")
            self._check(bool(self.train_files), "data.format='sft' reads local .jsonl files: set "
                        "data.train_files and data.eval_files.")
            self._check(not self.tokenizer.startswith("train:"), "data.format='sft' fine-tunes with an "
                        "existing tokenizer (the model's dir or file), not a newly trained one "
                        "(data.tokenizer='train:...').")
            self._check(not self.cache_dir, "data.cache_dir caches text token streams; SFT records are "
                        "tokenized each run (with their loss masks): set data.cache_dir=''.")

    def source_configs(self) -> tuple[SourceConfig, ...]:
        """The sources, in name order: data.sources' entries over this section's fields, or this section as
        one source (named after its TFDS dataset, or "files")."""
        base = {f: getattr(self, f) for f in SOURCE_FIELDS if f != "weight"}
        if not self.sources:
            name = "files" if self.train_files else self.tfds_name.split("/")[0].split(":")[0]
            return (SourceConfig(name=name, **base),)
        out = []
        for name, overrides in sorted(dict(self.sources).items()):
            overrides = dict(overrides or {})
            unknown = sorted(set(overrides) - set(SOURCE_FIELDS))
            if unknown:
                raise ConfigError(f"unknown field(s) {unknown} in data.sources.{name}; a source sets "
                                  f"{list(SOURCE_FIELDS)}.")
            if not _NAME.match(name):
                raise ConfigError(f"data.sources: source name {name!r} may hold only letters, digits, _ . -")
            out.append(SourceConfig.from_dict({"name": name, **base, **overrides}))
        if self.format == "sft" and len(out) > 1:
            raise ConfigError("data.format='sft' reads one set of record files: give data.train_files and "
                              "data.eval_files, not data.sources.")
        return tuple(out)

    def eval_set_configs(self) -> tuple[SourceConfig, ...]:
        """The extra held-out sets (data.eval_sets), in name order, each as a source with only held-out data
        (eval_files or eval_split) and weight 0: it never feeds training."""
        taken = {s.name for s in self.source_configs()}
        base = {"tfds_name": self.tfds_name, "text_key": self.text_key, "data_dir": self.data_dir,
                "manual_dir": self.manual_dir}
        return tuple(_eval_set_config(name, dict(fields or {}), base, taken)
                     for name, fields in sorted(dict(self.eval_sets).items()))

    def held_out_configs(self) -> tuple[SourceConfig, ...]:
        """Every held-out set: each source's (in a mixture, a files source without eval_files has none), then
        each of data.eval_sets."""
        own = [c for c in self.source_configs() if not (self.sources and c.train_files and not c.eval_files)]
        return (*own, *self.eval_set_configs())

    def stage_weights(self) -> tuple[tuple[int, dict[str, float]], ...]:
        """(first step, {source: weight}) per stage; stage 0 starts at step 0 with the sources' weights."""
        names = [s.name for s in self.source_configs()]
        stages = [(0, {s.name: s.weight for s in self.source_configs()})]
        for part in [p.strip() for p in self.stages.split(";") if p.strip()]:
            m = re.fullmatch(r"(\d+)\s*:(.*)", part)
            try:
                weights = {k.strip(): float(v) for k, v in (kv.split("=") for kv in m.group(2).split(","))}
            except (AttributeError, ValueError):
                raise ConfigError(f"data.stages: cannot read {part!r}; write STEP:NAME=W,NAME=W;STEP:...") from None
            if sorted(weights) != sorted(names):
                raise ConfigError(f"data.stages: stage {part!r} must give a weight to each source {names}.")
            step = int(m.group(1))
            if step <= stages[-1][0]:
                raise ConfigError(f"data.stages: stage steps must increase and start after 0 (got {step}).")
            stages.append((step, weights))
        return tuple(stages)


@dataclasses.dataclass(frozen=True)
class SourceConfig(Section):
    """One source of training text (and its held-out data), built by DataConfig.source_configs(); or a
    held-out set of data.eval_sets (only eval_files or eval_split, weight 0), by eval_set_configs()."""

    SECTION = "data.sources"

    name: str
    tfds_name: str
    train_split: str
    eval_split: str
    text_key: str
    data_dir: str
    manual_dir: str
    train_files: str
    eval_files: str
    weight: float = 1.0  # normalized over the sources (a log line says so when they do not sum to 1)

    def __post_init__(self):
        self._check(self.weight >= 0, f"{self.name}: weight={self.weight} must be >= 0.")
        self._check(bool(self.text_key), f"{self.name}: text_key must name the field holding the text.")


def _eval_set_config(name: str, fields: dict, base: dict, taken: set[str]) -> SourceConfig:
    """data.eval_sets.NAME, checked, as a held-out-only source (see DataConfig.eval_set_configs)."""
    where = f"data.eval_sets.{name}"
    unknown = sorted(set(fields) - set(EVAL_SET_FIELDS))
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in {where}; a held-out set sets {list(EVAL_SET_FIELDS)}.")
    if not _NAME.match(name) or name in RESERVED_SET_NAMES:
        raise ConfigError(f"data.eval_sets: set name {name!r} may hold only letters, digits, _ . - and may not be "
                          f"{' or '.join(RESERVED_SET_NAMES)}; rename it.")
    if name in taken:
        raise ConfigError(f"{where}: {name!r} is already a source's name (its held-out data is scored as "
                          f"eval/{name}/*); give the set another name.")
    files, split = fields.pop("files", ""), fields.pop("split", "")
    if bool(files) == bool(split or "tfds_name" in fields):
        raise ConfigError(f"{where} must give either files (globs of held-out files) or a TFDS split (and "
                          f"optionally tfds_name), not {'both' if files else 'neither'}.")
    if not files and not split:
        raise ConfigError(f"{where} names tfds_name={fields['tfds_name']!r}: give its split too (e.g. split='test').")
    return SourceConfig.from_dict({"name": name, **base, **fields, "train_split": "", "eval_split": split,
                                   "train_files": "", "eval_files": files, "weight": 0.0})
