"""Input pipeline: text documents -> token streams -> fixed-length rows -> batches that are a pure function
of the step.

Sources (section `config.data`, llama_jax/data/config.py)
  * TFDS: any dataset with a text feature (`tfds_name`, `text_key`, `data_dir` (may be gs://), `manual_dir`
    for offline builds). Splits use TFDS syntax, slicing included ("train[:95%]"); slices count *examples*,
    so tiny_shakespeare (one example per split) is used with its own train/validation/test splits. Datasets
    are built as array_record, read with `tfds.data_source` (random access).
  * Local files (`train_files` / `eval_files`, comma-separated globs; when `train_files` is set, TFDS is not
    used): `.jsonl` = one document per line (field `text_key`); any other file = one UTF-8 document per
    file; read into memory. Held-out data for local files is whatever `eval_files` names; the same file in
    both is an error.

Supervised fine-tuning (`format="sft"`, llama_jax/data/sft.py and chat.py)
  `train_files` / `eval_files` are .jsonl records: {"prompt", "completion"} (loss on the completion and EOS)
  or {"messages": [{"role", "content"}, ...]} rendered with the model's chat template as HF renders it (loss
  on each assistant turn's content and end-of-turn token); `loss_on="all"` trains every token (ablation),
  `chat_template` picks a template when the tokenizer has none. Assistant spans are located by rendering
  prefixes of the conversation, and a template that does not allow that is refused, never guessed. Packed
  only: each record is one segment; a record over seq_len + 1 tokens is truncated (counted, logged), one
  with no trained token left is dropped (counted). `TokenStream.trained` carries the mask into the batch's
  loss_mask (train) and the scored targets (eval). experiments/inspect_data.py prints rows token by token.

Token stream and windows
  Documents are tokenized into one array per *window*: `[BOS] ids [EOS]` per document (`add_bos` /
  `add_eos`), documents in split order. By default (`window_docs=0`) the whole split is one window,
  tokenized once up front and kept in memory (or, with `cache_dir`, a local dir, as .npy files,
  memory-mapped on later runs). For datasets too big for that (C4), `window_docs=N` cuts the split into
  windows of N consecutive documents, each tokenized only when training reaches it (the next one in a
  background thread; the last few are kept). Eval splits are always one window.

Rows (`packing`), L = seq_len, built per window
  * "concat": row r is stream[r*L : r*L + L + 1] (inputs = [:-1], targets = [1:]). Consecutive rows share one
    token, so every stream token except the window's very first (a BOS with add_bos) is a target exactly
    once; the last row is shorter and padded. Nothing else is dropped. Attention crosses documents
    (segment_ids all 1, positions 0..L-1).
  * "packed": each document is cut into pieces of at most L+1 tokens (again sharing one token, so every
    document token except its first is a target exactly once) and pieces are packed into rows of L positions
    next-fit, in split order (computed once per window, not per epoch). segment_ids number the pieces
    1, 2, ... within a row and positions restart at 0 for each, so attention stays inside a document;
    padding has segment_id 0 and loss_mask 0. Nothing is dropped.

Batches: dict of int32 [batch, seq_len] arrays `inputs`, `targets`, `segment_ids`, `positions` and float32
`loss_mask` (0 on padding). Eval batches add int32 `target_bytes` (see below).

Epochs and exact resume
  Epoch e visits the windows in the order of a permutation seeded by (seed, e), and each window's rows in
  the order of a permutation seeded by (seed, e, window). Global sample g = step * batch_size + i
  (i < batch_size) is the g-th row of that sequence. So each epoch reads every row exactly once, batches
  may straddle an epoch boundary (nothing is dropped at an epoch's end), and the batch of a step depends
  only on (seed, step, data config): with one window, row perm_e[g mod R] for R rows. The iterator state is
  the step, plus the row counts of the windows seen so far (so a resume need not re-tokenize the windows
  before it to find its place).

Multi-host: the global batch is split into process_count equal slices; process p reads only rows
  [p*b, (p+1)*b) of it (b = batch_size / process_count), or the `rows` slice it is given (the rows its
  devices own in the mesh). `llama_jax.sharding.shard_batch` assembles the jax.Arrays. With windows, every process
  tokenizes every window (they all need the row counts); it reads only its own rows.

Held-out eval (`EvalData.batches`, eval_data.py): the eval split's rows in order, once, no shuffling; the last batch
  is padded with empty rows (loss_mask 0). Scored targets are every target except BOS tokens (a BOS follows
  an EOS by construction, so it carries no information). Bytes for bits-per-byte: each document's UTF-8 byte
  count is put on its last token (its EOS with add_eos) and `target_bytes` is that weight at scored targets,
  so summing `target_bytes` over the split gives the exact number of bytes of text the scored tokens encode.
  One thing is not scored: a document's first content token when nothing precedes it (with add_bos=False:
  the first token of the split in concat mode, of every document in packed mode); its bytes are left out
  (len(decode([token]).encode()); exact for the byte tokenizer). So with add_bos=True and the byte
  tokenizer, eval bytes == the split's UTF-8 size exactly.

Modules, in pipeline order: config (DataConfig), sources (documents), tokenizer, tokens (token streams and
their cache), chat (chat templates, assistant spans), sft (records -> token stream with loss mask), packing
(rows, sliding eval windows, batch gathering, per-process rows), train_data, eval_data; display (rows as
text). Host-side numpy only: nothing here imports the model.
"""

from llama_jax.data.chat import (
    TEMPLATES,
    ChatTemplate,
    assistant_spans,
    end_of_turn,
    load_template,
    save_tokenizer,
)
from llama_jax.data.config import FORMATS, LOSS_ON, PACKING_MODES, DataConfig
from llama_jax.data.display import format_row, summary
from llama_jax.data.eval_data import EvalData, eval_windows, text_file_documents
from llama_jax.data.packing import Rows, build_rows, gather, local_rows, window_layout
from llama_jax.data.sft import Formatter, Stats, check_record, tokenize_records
from llama_jax.data.sources import (
    Documents,
    check_no_leak,
    documents_for_role,
    file_documents,
    record_documents,
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
from llama_jax.data.tokens import TokenStream, tokenize
from llama_jax.data.train_data import DataIterator, TrainData

__all__ = [
    "FORMATS",
    "LOSS_ON",
    "PACKING_MODES",
    "TEMPLATES",
    "ByteTokenizer",
    "ChatTemplate",
    "DataConfig",
    "DataIterator",
    "Documents",
    "EvalData",
    "Formatter",
    "HFTokenizer",
    "Rows",
    "SentencePieceTokenizer",
    "Stats",
    "TokenStream",
    "Tokenizer",
    "TrainData",
    "assistant_spans",
    "build_rows",
    "check_no_leak",
    "check_record",
    "check_vocab",
    "documents_for_role",
    "end_of_turn",
    "eval_windows",
    "file_documents",
    "format_row",
    "gather",
    "load_template",
    "load_tokenizer",
    "local_rows",
    "record_documents",
    "save_tokenizer",
    "summary",
    "text_file_documents",
    "tfds_builder",
    "tfds_documents",
    "tokenize",
    "tokenize_records",
    "train_sentencepiece",
    "training_tokenizer",
    "window_layout",
]
