"""Data loading for the shipped lm_eval task YAMLs (the YAMLs name it as `custom_dataset: !function
utils.local_files`; lm_eval passes it the YAML's dataset_kwargs and the TaskManager's metadata).

A relative path in `data_files` is read from `data_dir` (the TaskManager's metadata: experiments.eval_tasks
--task_data_dir) when given, else from this directory, where the tiny offline tasks' jsonl lie."""

from __future__ import annotations

import os
import pathlib
import re

import datasets

HERE = pathlib.Path(__file__).parent


def local_files(data_files: dict[str, str], data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """The splits of `data_files` ({split: path}), jsonl or parquet, resolved against data_dir or here."""
    root = pathlib.Path(os.path.expanduser(data_dir)) if data_dir else HERE
    files = {split: str(root / path) for split, path in data_files.items()}
    missing = sorted(p for p in files.values() if not os.path.exists(p))
    if missing:
        raise FileNotFoundError(
            f"the task's data file(s) {missing} do not exist: download them there (llama_jax/inference/tasks/"
            "README.md says from where) or pass --task_data_dir=DIR holding them."
        )
    kind = "parquet" if next(iter(files.values())).endswith(".parquet") else "json"
    return datasets.load_dataset(kind, data_files=files)


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """HellaSwag's records as lm_eval's hellaswag task prepares them (lm_eval/tasks/hellaswag/utils.py)."""

    def clean(text: str) -> str:
        text = text.strip().replace(" [title]", ". ")
        return re.sub("\\[.*?\\]", "", text).replace("  ", " ")

    def doc(d):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        return {"query": clean(d["activity_label"] + ": " + ctx), "choices": [clean(e) for e in d["endings"]],
                "gold": int(d["label"])}

    return dataset.map(doc)


def rolling_results(doc, results):
    """Word and byte perplexity and bits/byte of a loglikelihood_rolling task over `text` (as wikitext's)."""
    (loglikelihood,) = results
    words, nbytes = len(re.split(r"\s+", doc["text"])), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
