#!/usr/bin/env python3
"""The TRL side of `scripts/bench_grpo_vs_trl.sh`: GRPO steps with TRL 1.16's `GRPOTrainer` on CPU,
printing one JSON line (median step seconds, peak RSS). The lmforge side's setup: LoRA r=8 α=16 on
all linear layers, 8 prompts × 4 samples per step (one optimizer step per generation batch),
48 new tokens at temperature 1, β = 0, loss_type dapo, reward = the response's last number equals
"answer", 2 threads.

  .venv-ref/bin/python scripts/trl_grpo_bench.py --model HF_DIR --data train.jsonl --steps 3 [--fp32]

--fp32 turns off TRL's bf16 default (lmforge computes in f32); without it TRL runs as a user gets it.
"""
import argparse, json, re, resource, statistics, tempfile, time
import torch


def last_number(s):
    m = re.findall(r"-?\d[\d,]*(?:\.\d+)?", s)
    if not m:
        return None
    try:
        return float(m[-1].replace(",", ""))
    except ValueError:
        return None


def reward_number(completions, answer, **kw):
    out = []
    for c, a in zip(completions, answer):
        text = c[-1]["content"] if isinstance(c, list) else c
        x, y = last_number(text), last_number(str(a))
        out.append(1.0 if x is not None and y is not None and abs(x - y) < 1e-9 else 0.0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ds = load_dataset("json", data_files=a.data)["train"]
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    extra = {"bf16": False} if a.fp32 else {}
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32, gradient_accumulation_steps=1,
                     num_generations=4, max_completion_length=48, temperature=1.0, beta=0.0, loss_type="dapo",
                     max_steps=a.steps, learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, **extra)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft,
                          reward_funcs=[reward_number], callbacks=[Timer()])
    trainer.train()
    rest = times[1:] or times
    print(json.dumps({"tool": "trl", "fp32": a.fp32, "bf16": cfg.bf16, "steps": len(times), "step_s": times,
                      "step_s_median": statistics.median(rest), "wall_s": time.perf_counter() - t0,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
