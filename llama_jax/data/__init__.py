"""Input pipeline: text in sharded files or TFDS -> a token cache -> fixed-length rows -> a weighted mixture
of sources -> batches that are a pure function of the step.

Sources (section `config.data`, llama_jax/data/config.py)
  One source is the section's own fields; several are `data.sources = {NAME: {field: value}}` (fields
  tfds_name, train_split, eval_split, text_key, data_dir, manual_dir, train_files, eval_files, weight; the
  rest come from the section). Each source is either
  * TFDS: any dataset with a text feature (`tfds_name`, `text_key`, `data_dir` (may be gs://), `manual_dir`
    for offline builds). Splits use TFDS syntax, slicing included ("train[:95%]"); slices count *examples*.
    Built as array_record, read by random access, cut into shards of `shard_docs` documents.
  * Files (`train_files` / `eval_files`, comma-separated globs, local or gs://; files.py): .jsonl, .parquet
    (column `text_key`), .array_record, any of them .gz/.zst compressed, or any other file as one document.
    Each file is a shard, streamed. The same file as training and held-out data is an error.

Token cache (cache.py)
  With `cache_dir` (local or gs://), each source's shards are tokenized once into CACHE/NAME/{train,eval}/,
  `[BOS] ids [EOS]` per document, by the processes of the run (each builds its share, then waits for the
  rest) or beforehand by `experiments.build_cache` on any number of workers. A killed build rebuilds only
  unfinished shards. Training reads rows by byte range, so no process holds a corpus in memory. A cache
  built from other text or another tokenizer, or whose shard files changed since, is refused by name.
  Without `cache_dir`, sources are tokenized in memory at start (small data).

Supervised fine-tuning (`format="sft"`, llama_jax/data/sft.py and chat.py)
  `train_files` / `eval_files` are .jsonl records: {"prompt", "completion"} (loss on the completion and EOS)
  or {"messages": [{"role", "content"}, ...]} rendered with the model's chat template as HF renders it (loss
  on each assistant turn's content and end-of-turn token); `loss_on="all"` trains every token (ablation),
  `chat_template` picks a template when the tokenizer has none. Assistant spans are located by rendering
  prefixes of the conversation, and a template that does not allow that is refused, never guessed. Packed
  only, one source, in memory: each record is one segment; a record over seq_len + 1 tokens is truncated
  (counted, logged), one with no trained token left is dropped (counted). `TokenStream.trained` carries the
  mask into the batch's loss_mask (train) and the scored targets (eval). experiments/inspect_data.py prints
  rows token by token.

Rows (`packing`), L = seq_len, built per shard
  * "concat": row r is stream[r*L : r*L + L + 1] (inputs = [:-1], targets = [1:]). Consecutive rows share one
    token, so every stream token except the shard's very first (a BOS with add_bos) is a target exactly
    once; the last row is shorter and padded. Nothing else is dropped. Attention crosses documents
    (segment_ids all 1, positions 0..L-1).
  * "packed": each document is cut into pieces of at most L+1 tokens (again sharing one token, so every
    document token except its first is a target exactly once) and pieces are packed into rows of L positions
    next-fit, in shard order. segment_ids number the pieces 1, 2, ... within a row and positions restart at
    0 for each, so attention stays inside a document; padding has segment_id 0 and loss_mask 0. Nothing is
    dropped.

Batches: dict of int32 [batch, seq_len] arrays `inputs`, `targets`, `segment_ids`, `positions` and float32
`loss_mask` (0 on padding). Eval batches add int32 `target_bytes` (see below).

Epochs, mixtures and exact resume (train_data.py, mixture.py)
  Per source: shards are grouped into windows of `shuffle_shards`; epoch e visits the windows in a
  permutation seeded by (seed, source, e) and each window's rows in a permutation seeded by (seed, source,
  e, window), so each epoch reads every row of the source exactly once, and each source has its own epochs
  (a small one repeats while a big one streams). The mixture cuts global samples into blocks of
  `mixture_block` in which each source fills exactly round(weight * block) shuffled positions, optionally in
  `stages` whose weights change at given steps. Global sample g = step * batch_size + i is a pure function
  of (seed, g, data config): nothing depends on the number of processes or on iterator state, so a resume
  (on any host count) replays exactly. The saved data state is the step and a fingerprint of the config.

Multi-host: process p reads only rows [p*b, (p+1)*b) of the global batch (b = batch_size / process_count),
  or the `rows` slice it is given (the rows its devices own in the mesh). `llama_jax.sharding.shard_batch`
  assembles the jax.Arrays.

Held-out eval (eval_data.py): each source's held-out data (`eval_sets`, by source name; a files source in a
  mixture may have none), then each set `data.eval_sets` names (files or a TFDS split, never trained on:
  `check_no_leak` refuses one that shares a file or TFDS examples with the training data), each read as a
  source's held-out data is; its rows in order, once, no shuffling; the last batch is padded with empty rows
  (loss_mask 0). Scored targets are every target except BOS tokens (a BOS follows an EOS by construction,
  so it carries no information). Bytes for bits-per-byte: each document's UTF-8 byte count is put on its
  last token (its EOS with add_eos) and `target_bytes` is that weight at scored targets, so summing
  `target_bytes` over the split gives the exact number of bytes of text the scored tokens encode. One thing
  is not scored: a document's first content token when nothing precedes it (with add_bos=False: the first
  token of the split in concat mode, of every document in packed mode); its bytes are left out
  (len(decode([token]).encode()); exact for the byte tokenizer). So with add_bos=True and the byte
  tokenizer, eval bytes == the split's UTF-8 size exactly.

Modules, in pipeline order: config (DataConfig, SourceConfig), files (paths, formats), sources (documents,
shards), tokenizer, tokens (token streams), cache (the token cache), chat (chat templates, assistant spans),
sft (records -> token stream with loss mask), packing (rows, sliding eval windows, batch gathering,
per-process rows), mixture (weighted, index-addressed), train_data, eval_data; display (rows as text).
Host-side numpy only: nothing here imports the model.
"""

from llama_jax.data.cache import Cache, ShardTokens, TokenFile, open_source
from llama_jax.data.chat import (
    TEMPLATES,
    ChatTemplate,
    assistant_spans,
    end_of_turn,
    load_template,
    save_tokenizer,
)
from llama_jax.data.config import (
    EVAL_SET_FIELDS,
    FORMATS,
    LOSS_ON,
    PACKING_MODES,
    SOURCE_FIELDS,
    DataConfig,
    SourceConfig,
)
from llama_jax.data.display import format_row, summary
from llama_jax.data.eval_data import EvalData, concat_streams, eval_sets, eval_windows, text_file_documents
from llama_jax.data.files import FileInfo, expand_files
from llama_jax.data.mixture import Mixture
from llama_jax.data.packing import Rows, build_rows, gather, local_rows, row_count, window_layout
from llama_jax.data.sft import Formatter, Stats, check_record, tokenize_records
from llama_jax.data.sources import (
    Documents,
    Shard,
    Source,
    check_no_leak,
    documents_for_role,
    file_documents,
    held_out_documents,
    record_documents,
    source_documents,
    source_for_role,
    tfds_builder,
    tfds_documents,
)
from llama_jax.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    load_tokenizer,
    train_sentencepiece,
    training_tokenizer,
)
from llama_jax.data.tokens import TokenStream, tokenize, tokenize_texts
from llama_jax.data.train_data import DataIterator, SourceRows, TrainData

__all__ = [
    "EVAL_SET_FIELDS",
    "FORMATS",
    "LOSS_ON",
    "PACKING_MODES",
    "SOURCE_FIELDS",
    "TEMPLATES",
    "ByteTokenizer",
    "Cache",
    "ChatTemplate",
    "DataConfig",
    "DataIterator",
    "Documents",
    "EvalData",
    "FileInfo",
    "Formatter",
    "HFTokenizer",
    "Mixture",
    "Rows",
    "SentencePieceTokenizer",
    "Shard",
    "ShardTokens",
    "Source",
    "SourceConfig",
    "SourceRows",
    "Stats",
    "TokenFile",
    "TokenStream",
    "Tokenizer",
    "TrainData",
    "assistant_spans",
    "build_rows",
    "check_no_leak",
    "check_record",
    "check_vocab",
    "concat_streams",
    "documents_for_role",
    "end_of_turn",
    "eval_sets",
    "eval_windows",
    "expand_files",
    "file_documents",
    "format_row",
    "gather",
    "held_out_documents",
    "load_template",
    "load_tokenizer",
    "local_rows",
    "open_source",
    "record_documents",
    "row_count",
    "save_tokenizer",
    "source_documents",
    "source_for_role",
    "summary",
    "text_file_documents",
    "tfds_builder",
    "tfds_documents",
    "tokenize",
    "tokenize_records",
    "tokenize_texts",
    "train_sentencepiece",
    "training_tokenizer",
    "window_layout",
]
