"""One process of test_multiprocess.py: jax.distributed over N processes on 127.0.0.1 (CPU, gloo), the
TrainData of a mixture config with a token cache (every process builds its share of the shards and waits
for the others'), and this process's rows of steps [start, stop) saved to OUT/rows-<process>.npz.

    PYTHONPATH=. python tests/data/data_worker.py --port=P --num_processes=N --process_id=I \
        --corpus=DIR --cache=DIR --out=DIR --start=0 --stop=10 [--state=FILE.json]

--state resumes from a saved data state (JSON of DataIterator.state()); the state after the last step is
written to OUT/state-<process>.json.
"""

import argparse
import json
import os

import numpy as np


def config(corpus: str, cache: str):
    from llama_jax.data import DataConfig

    sources = {
        "big": {"train_files": f"{corpus}/big-*.jsonl.zst", "eval_files": f"{corpus}/big-eval.jsonl", "weight": 3},
        "small": {"train_files": f"{corpus}/small-*.jsonl.gz", "eval_files": f"{corpus}/small-eval.jsonl", "weight": 1},
    }
    return DataConfig(sources=sources, cache_dir=cache, packing="packed", shuffle_shards=2, mixture_block=16,
                      stages="6:big=1,small=1")


def main():
    parser = argparse.ArgumentParser()
    for name in ("port", "num_processes", "process_id", "start", "stop"):
        parser.add_argument(f"--{name}", type=int, required=True)
    for name in ("corpus", "cache", "out", "state"):
        parser.add_argument(f"--{name}", default="")
    args = parser.parse_args()
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.num_processes > 1:
        jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    from llama_jax.data import ByteTokenizer, TrainData

    td = TrainData.from_config(config(args.corpus, args.cache), ByteTokenizer(), seq_len=24, batch_size=8, seed=7)
    start = json.load(open(args.state)) if args.state else args.start
    rows = []
    with td.iterator(start, prefetch=2) as it:
        assert it.step == args.start
        for _ in range(args.start, args.stop):
            rows.append(next(it))
        state = it.state()
    p = jax.process_index()
    np.savez(os.path.join(args.out, f"rows-{p}.npz"), **{k: np.stack([r[k] for r in rows]) for k in rows[0]})
    with open(os.path.join(args.out, f"state-{p}.json"), "w") as f:
        json.dump(state, f)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
