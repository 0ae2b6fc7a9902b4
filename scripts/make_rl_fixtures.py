#!/usr/bin/env python3
"""Writes tests/fixtures/rl/advantages.safetensors: the advantage formulas of online RL as TRL computes
them, on fixed seeded float32 inputs (`in.*`), outputs in float64 computed from those inputs.

- GRPO (TRL 1.16 GRPOTrainer._generate_and_score_completions, inline there; the lines are copied below)
  with scale_rewards group / batch / none: `grpo.{scale}`; TRL's own `nanstd` is imported.
- RLOO (TRL 1.16 RLOOTrainer._generate_and_score_completions, copied): `rloo.norm{0,1}`, and the
  sequence-level KL penalty of the rewards: `rloo.kl_rewards` (beta 0.05, k1 summed over tokens).
- PPO (TRL 0.x PPOTrainer.train, removed from TRL 1.x, copied from trl 0.19 `ppo_trainer.py` and
  `masked_whiten`): GAE with (γ, λ) = (1, 0.95) and (0.9, 0.8) on full-length responses, returns,
  and the whitened advantages: `ppo.g{γ}.l{λ}.{adv,ret,white}`; the clipped policy and value losses
  per token: `ppo.pg_losses`, `ppo.vf_losses` (cliprange 0.2, cliprange_value 0.2).

Setup: python3 -m venv .venv-ref && .venv-ref/bin/pip install torch trl safetensors
Run:   .venv-ref/bin/python scripts/make_rl_fixtures.py      (from the repository root)
"""
import pathlib
import torch
from safetensors.torch import save_file
from trl.trainer.utils import nanstd

g = torch.Generator().manual_seed(17)
out = {}

# ---- GRPO: 5 prompts x 4 samples; the last group all equal (std 0).
k = 4
rewards32 = torch.randn(5 * k, generator=g).float()
rewards32[-k:] = 0.5
out["in.rewards"] = rewards32
rewards = rewards32.double()
for scale in ["group", "batch", "none"]:
    num_generations = k
    # trl/trainer/grpo_trainer.py (1.16), _generate_and_score_completions:
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale != "none":
        advantages = advantages / (std_rewards + 1e-4)
    out[f"grpo.{scale}"] = advantages

# ---- RLOO (trl/trainer/rloo_trainer.py, 1.16)
for norm in [False, True]:
    num_generations = k
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    baselines = baselines.view(-1)
    advantages = rewards - baselines
    if norm:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    out[f"rloo.norm{int(norm)}"] = torch.nan_to_num(advantages, nan=0.0)

# RLOO's KL-penalised rewards: 20 rows x 6 tokens, the last tokens of some rows masked.
T = 6
old32 = (-torch.rand(5 * k, T, generator=g) * 3).float()
ref32 = (-torch.rand(5 * k, T, generator=g) * 3).float()
lens = torch.randint(1, T + 1, (5 * k,), generator=g)
completion_mask = (torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)).double()
out["in.rloo.old"], out["in.rloo.ref"], out["in.rloo.lens"] = old32, ref32, lens.to(torch.int64)
beta = 0.05
per_token_kl = old32.double() - ref32.double()
kl = (per_token_kl * completion_mask).sum(-1)
out["rloo.kl_rewards"] = rewards - beta * kl

# ---- PPO (trl 0.19 trainer/ppo_trainer.py, train(); responses of full length: no padding)
def masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()

def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance

def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened

B, L = 3, 7
r32 = (torch.randn(B, L, generator=g) * 0.1).float()
v32 = torch.randn(B, L, generator=g).float()
out["in.ppo.rewards"], out["in.ppo.values"] = r32, v32
mask = torch.ones(B, L, dtype=torch.float64)
for gamma, lam in [(1.0, 0.95), (0.9, 0.8)]:
    rewards_, values = r32.double(), v32.double()
    lastgaelam = 0
    advantages_reversed = []
    gen_length = L
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards_[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    out[f"ppo.g{gamma}.l{lam}.adv"] = advantages
    out[f"ppo.g{gamma}.l{lam}.ret"] = returns
    out[f"ppo.g{gamma}.l{lam}.white"] = masked_whiten(advantages, mask)

# Clipped losses per token.
N = 40
new32 = (-torch.rand(N, generator=g) * 2).float()
oldlp32 = (new32 + torch.randn(N, generator=g) * 0.3).float()
adv32 = torch.randn(N, generator=g).float()
vpred32 = torch.randn(N, generator=g).float()
vold32 = (vpred32 + torch.randn(N, generator=g) * 0.4).float()
ret32 = torch.randn(N, generator=g).float()
for name, t in [("new", new32), ("old", oldlp32), ("adv", adv32), ("vpred", vpred32), ("vold", vold32), ("ret", ret32)]:
    out[f"in.ppo.{name}"] = t
new, oldlp, adv = new32.double(), oldlp32.double(), adv32.double()
logprobs_diff = new - oldlp
ratio = torch.exp(logprobs_diff)
pg_losses = -adv * ratio
pg_losses2 = -adv * torch.clamp(ratio, 1.0 - 0.2, 1.0 + 0.2)
out["ppo.pg_losses"] = torch.max(pg_losses, pg_losses2)
vpred, vold, ret = vpred32.double(), vold32.double(), ret32.double()
vpredclipped = torch.clamp(vpred, vold - 0.2, vold + 0.2)
vf_losses1 = torch.square(vpred - ret)
vf_losses2 = torch.square(vpredclipped - ret)
out["ppo.vf_losses"] = 0.5 * torch.max(vf_losses1, vf_losses2)

dest = pathlib.Path("tests/fixtures/rl")
dest.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in out.items()}, dest / "advantages.safetensors")
print(f"wrote {len(out)} tensors to {dest / 'advantages.safetensors'}")
