"""Weighted mixtures, index-addressed: global sample g -> (source, that source's sample number).

Rule: samples are cut into blocks of `block` consecutive global samples (within a stage). In every block,
source i fills exactly n_i = round(w_i * block) positions (largest remainder, so the n_i sum to the block);
which positions is a permutation seeded by (seed, stage, block). The k-th position of source i in block b
gets source sample base_i + b * n_i + k, where base_i counts what earlier stages gave i. So:
  * the mapping is a pure function of (seed, g, weights, block): no iterator state, the same for any number
    of hosts, and a resume at any step replays exactly;
  * each source's samples are consumed in order 0, 1, 2, ... with no gap and no repeat (its own epochs and
    shuffling follow from that number, llama_jax/data/train_data.py);
  * proportions are exact per block, not only in expectation.
A positive weight that rounds to no position in a block is an error naming the smallest weight that works
(Levanter's mixture warns and drops such a source); a weight of exactly 0 turns a source off for a stage.

Why not grain: `MapDataset.mix` interleaves sources at fixed integer ratios but its length ends with the
shortest source, so a small source cannot repeat while a big one streams, and `IterDataset.mix` keeps iterator
state that grain's elastic iterator cannot re-shard; here each source has its own epochs and the state is
the step alone.
"""

from __future__ import annotations

import collections
import logging
import threading

import numpy as np

from llama_jax.errors import ConfigError

log = logging.getLogger(__name__)


def block_counts(weights: np.ndarray, block: int, names: list[str]) -> np.ndarray:
    """Rows per block for each source: largest-remainder rounding of weights * block, every positive weight
    getting at least one row or an error."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * block
    n = np.floor(exact).astype(np.int64)
    rest = block - int(n.sum())
    n[np.argsort(-(exact - n), kind="stable")[:rest]] += 1
    for i in np.flatnonzero((w > 0) & (n == 0)).tolist():
        raise ConfigError(
            f"source {names[i]!r} has weight {w[i] / w.sum():.3g} (normalized), which gives it no rows in a "
            f"mixture block of {block} rows: raise its weight to at least {1 / block:.3g} or raise "
            "data.mixture_block."
        )
    return n


class Mixture:
    """Maps global sample numbers to (source index, source sample number); see the module docstring.

    stages: ((first step, {name: weight}), ...) in DataConfig.stage_weights() form; batch_size turns a stage's
    first step into its first global sample.
    """

    def __init__(self, names: list[str], stages, *, batch_size: int, block: int, seed: int):
        self.names, self.block, self.seed = list(names), int(block), int(seed)
        self._lock = threading.Lock()
        self._blocks: collections.OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = (
            collections.OrderedDict()
        )
        self.starts = np.array([step * batch_size for step, _ in stages], np.int64)  # first sample per stage
        self.counts = []  # per stage: rows per block per source
        for step, weights in stages:
            w = np.array([weights[n] for n in self.names], np.float64)
            if not w.sum() > 0:
                raise ConfigError(f"the source weights at step {step} are all 0: give some source a weight.")
            if abs(w.sum() - 1) > 1e-6 and len(w) > 1:
                log.info("source weights at step %d sum to %g: normalized to %s", step, w.sum(),
                         ", ".join(f"{n}={x / w.sum():.4g}" for n, x in zip(self.names, w)))
            self.counts.append(block_counts(w, self.block, self.names))
        # Samples each source has had before each stage (exact, also for a stage's partial last block).
        self.bases = [np.zeros(len(self.names), np.int64)]
        for j in range(1, len(self.counts)):
            self.bases.append(self.bases[-1] + self._consumed_in_stage(j - 1, self.starts[j] - self.starts[j - 1]))

    def _block(self, stage: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank among that source's positions) of each position of block b of a stage."""
        key = (stage, b)
        with self._lock:
            if key in self._blocks:
                return self._blocks[key]
        counts = self.counts[stage]
        slots = np.repeat(np.arange(len(counts)), counts)
        rng = np.random.default_rng([self.seed, 0x6D1, stage, b])  # 0x6D1: not the row shuffles' seeds
        source = slots[rng.permutation(self.block)] if len(counts) > 1 else slots
        rank = np.empty(self.block, np.int64)
        for i in range(len(counts)):
            m = source == i
            rank[m] = np.arange(int(m.sum()))
        with self._lock:
            self._blocks[key] = (source, rank)
            while len(self._blocks) > 16:
                self._blocks.popitem(last=False)
        return source, rank

    def _consumed_in_stage(self, stage: int, t: int) -> np.ndarray:
        """Samples each source gets in the first t samples of a stage."""
        full, part = divmod(int(t), self.block)
        out = full * self.counts[stage]
        if part:
            source, _ = self._block(stage, full)
            out = out + np.bincount(source[:part], minlength=len(self.names))
        return out

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, source sample number) of global samples g."""
        g = np.asarray(g, np.int64)
        stage = np.searchsorted(self.starts, g, side="right") - 1
        source, k = np.empty_like(g), np.empty_like(g)
        t = g - self.starts[stage]
        b, p = np.divmod(t, self.block)
        for s, blk in sorted({(int(x), int(y)) for x, y in zip(stage, b)}):
            m = (stage == s) & (b == blk)
            src, rank = self._block(s, blk)
            source[m] = src[p[m]]
            k[m] = self.bases[s][source[m]] + blk * self.counts[s][source[m]] + rank[p[m]]
        return source, k

    def consumed(self, g: int) -> np.ndarray:
        """Samples each source has given in global samples 0..g-1 (for tokens and epochs seen)."""
        stage = int(np.searchsorted(self.starts, g, side="right") - 1)
        return self.bases[stage] + self._consumed_in_stage(stage, g - self.starts[stage])
