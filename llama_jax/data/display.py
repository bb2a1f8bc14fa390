"""Batch rows as text for a person to check (experiments/inspect_data.py): every token, whether it is trained
on, and its segment.

    row 0: 2 segment(s), 61 of 64 positions, 14 trained
      seg 1 (16 tokens, 3 trained): <|im_start|>·user·\\n·Hi·<|im_end|>·\\n·<|im_start|>·assistant·\\n·⟦Hey·!·<|im_end|>⟧·\\n
      seg 2 ...
      pad: 3 positions

Tokens are separated by "·", newlines and tabs are shown escaped, and each run of trained tokens (targets
with loss_mask 1) is enclosed in ⟦ ⟧. A segment shows its inputs and then its last target, so every token
appears once; a segment's first token is never trained (nothing precedes it).
"""

from __future__ import annotations

import numpy as np

from llama_jax.data.packing import Rows
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.data.tokens import TokenStream

OPEN, CLOSE, SEP = "⟦", "⟧", "·"


def _show(piece: str) -> str:
    return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def format_tokens(tokenizer: Tokenizer, ids, trained) -> str:
    """Tokens joined by SEP, each run of trained ones enclosed in OPEN ... CLOSE."""
    out, inside = [], False
    for i, t in zip(ids, trained):
        text = _show(tokenizer.piece(int(i)))
        if t and not inside:
            text, inside = OPEN + text, True
        elif not t and inside:
            out[-1] += CLOSE
            inside = False
        out.append(text)
    if inside:
        out[-1] += CLOSE
    return SEP.join(out)


def format_row(batch: dict, r: int, tokenizer: Tokenizer) -> str:
    """Row r of a batch dict (inputs, targets, loss_mask, segment_ids) as a few lines, one per segment."""
    seg, mask = batch["segment_ids"][r], batch["loss_mask"][r] > 0
    used = int((seg != 0).sum())
    ids = [s for s in np.unique(seg).tolist() if s != 0]
    lines = [f"row {r}: {len(ids)} segment(s), {used} of {len(seg)} positions, {int(mask.sum())} trained"]
    for s in ids:
        cols = np.flatnonzero(seg == s)  # contiguous
        tokens = np.append(batch["inputs"][r, cols], batch["targets"][r, cols[-1]])
        trained = np.append(False, mask[cols])
        lines.append(
            f"  seg {s} ({len(tokens)} tokens, {int(trained.sum())} trained): "
            f"{format_tokens(tokenizer, tokens, trained)}"
        )
    if used < len(seg):
        lines.append(f"  pad: {len(seg) - used} positions")
    return "\n".join(lines)


def summary(stream: TokenStream, rows: Rows, num_records: int) -> dict:
    """Counts over a whole split: records read and kept, rows, target tokens and the trained fraction."""
    targets = int(rows.length.sum())
    trained = targets if stream.trained is None else int(stream.trained.sum())
    return {
        "records": num_records,
        "kept": stream.num_docs,
        "rows": rows.num_rows,
        "positions_used": round(float(rows.length.sum()) / max(rows.num_rows * rows.seq_len, 1), 4),
        "targets": targets,
        "trained": trained,
        "trained_fraction": round(trained / max(targets, 1), 4),
    }
