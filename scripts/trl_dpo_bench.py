#!/usr/bin/env python3
"""The TRL side of `scripts/bench_dpo_vs_trl.sh`: DPO steps with TRL's `DPOTrainer` on CPU,
printing one JSON line (median step seconds, peak RSS). Same setup as the lmforge side: LoRA r=8
α=16 on all linear layers, sigmoid loss, β=0.1, batch 4 pairs, max_length 256, reference
log-probs precomputed (or not, --ref-live), 2 threads.

  .venv-ref/bin/python scripts/trl_dpo_bench.py --model HF_DIR --data pairs.jsonl --steps 6 [--fp32]

--fp32 turns off TRL 1.16's DPOConfig defaults bf16=True and gradient_checkpointing=True (the
arithmetic lmforge does); without it TRL runs as a user gets it.
"""
import argparse, json, os, resource, statistics, sys, tempfile, time
import torch

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--ref-live", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

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

    extra = {"bf16": False, "gradient_checkpointing": False} if a.fp32 else {}
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                    max_steps=a.steps, max_length=256, learning_rate=5e-5, lr_scheduler_type="linear", beta=0.1,
                    loss_type=["sigmoid"], precompute_ref_log_probs=not a.ref_live, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                    disable_tqdm=True, **extra)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=[Timer()])
    trainer.train()
    rest = times[1:] or times
    print(json.dumps({"tool": "trl", "fp32": a.fp32, "bf16": cfg.bf16, "gradient_checkpointing": cfg.gradient_checkpointing,
                      "steps": len(times), "step_s": times, "step_s_median": statistics.median(rest),
                      "wall_s": time.perf_counter() - t0,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))

if __name__ == "__main__":
    main()
