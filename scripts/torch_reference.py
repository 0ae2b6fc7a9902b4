#!/usr/bin/env python3
# The PyTorch reference that `lmforge bench` is compared against (scripts/bench_vs_torch.sh runs both).
"""Peer benchmark: one training step (forward + backward + AdamW) of a small decoder in PyTorch on CPU.

This is the number lmforge's own `bench` is compared against, on the same machine, in the same run.
Setup (once, ~3 GB download, in a git-ignored folder): python3 -m venv .venv-torchref && .venv-torchref/bin/pip install torch
Run:   .venv-torchref/bin/python torch_reference.py --arch gpt2 --layers 6 --heads 6 --dim 384 \
           --seq 256 --batch 8 --vocab 65 --steps 6 --threads 2
Prints one JSON line: tokens_per_s is batch*seq / median step time (first step excluded).
"""
import argparse, json, math, resource, time
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
p.add_argument("--layers", type=int, default=6); p.add_argument("--heads", type=int, default=6)
p.add_argument("--kv-heads", type=int, default=None); p.add_argument("--dim", type=int, default=384)
p.add_argument("--ffn", type=int, default=None, help="hidden size of the MLP (default 4*dim gpt2, 8/3*dim llama)")
p.add_argument("--seq", type=int, default=256); p.add_argument("--batch", type=int, default=8)
p.add_argument("--vocab", type=int, default=65); p.add_argument("--steps", type=int, default=6)
p.add_argument("--threads", type=int, default=2); p.add_argument("--no-sdpa", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
kvh = a.kv_heads or a.heads; hd = a.dim // a.heads
ffn = a.ffn or (4 * a.dim if a.arch == "gpt2" else int(8 * a.dim / 3 / 64 + 0.999) * 64)

def attend(q, k, v):
    if kvh != a.heads:
        k = k.repeat_interleave(a.heads // kvh, 1); v = v.repeat_interleave(a.heads // kvh, 1)
    if not a.no_sdpa:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[2]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return att.softmax(-1) @ v

def rope(x, cos, sin):  # x: (B, H, T, hd), rotate-half convention as in HF Llama
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat((-x2, x1), -1) * sin

class Block(nn.Module):
    def __init__(s):
        super().__init__()
        llama = a.arch == "llama"
        Norm = (lambda: nn.RMSNorm(a.dim, eps=1e-5)) if llama else (lambda: nn.LayerNorm(a.dim))
        s.n1, s.n2 = Norm(), Norm()
        s.qkv = nn.Linear(a.dim, (a.heads + 2 * kvh) * hd, bias=not llama)
        s.o = nn.Linear(a.dim, a.dim, bias=not llama)
        if llama:
            s.gate = nn.Linear(a.dim, ffn, bias=False); s.up = nn.Linear(a.dim, ffn, bias=False)
            s.down = nn.Linear(ffn, a.dim, bias=False)
        else:
            s.fc = nn.Linear(a.dim, ffn); s.proj = nn.Linear(ffn, a.dim)
    def forward(s, x, cos, sin):
        B, T, C = x.shape
        q, k, v = s.qkv(s.n1(x)).split([a.heads * hd, kvh * hd, kvh * hd], -1)
        q = q.view(B, T, a.heads, hd).transpose(1, 2); k = k.view(B, T, kvh, hd).transpose(1, 2)
        v = v.view(B, T, kvh, hd).transpose(1, 2)
        if a.arch == "llama":
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        x = x + s.o(attend(q, k, v).transpose(1, 2).reshape(B, T, C))
        h = s.n2(x)
        h = s.down(F.silu(s.gate(h)) * s.up(h)) if a.arch == "llama" else s.proj(F.gelu(s.fc(h), approximate="tanh"))
        return x + h

class Model(nn.Module):
    def __init__(s):
        super().__init__()
        s.wte = nn.Embedding(a.vocab, a.dim)
        s.wpe = nn.Embedding(a.seq, a.dim) if a.arch == "gpt2" else None
        s.blocks = nn.ModuleList(Block() for _ in range(a.layers))
        s.norm = nn.RMSNorm(a.dim, eps=1e-5) if a.arch == "llama" else nn.LayerNorm(a.dim)
        s.head = nn.Linear(a.dim, a.vocab, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        f = torch.outer(torch.arange(a.seq).float(), inv); f = torch.cat((f, f), -1)
        s.register_buffer("cos", f.cos(), persistent=False); s.register_buffer("sin", f.sin(), persistent=False)
    def forward(s, idx):
        h = s.wte(idx)
        if s.wpe is not None:
            h = h + s.wpe(torch.arange(idx.shape[1]))
        for b in s.blocks:
            h = b(h, s.cos, s.sin)
        return s.head(s.norm(h))

m = Model(); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
n = sum(p.numel() for p in m.parameters()); times = []
for i in range(a.steps):
    x = torch.randint(0, a.vocab, (a.batch, a.seq)); y = torch.randint(0, a.vocab, (a.batch, a.seq))
    t0 = time.perf_counter()
    loss = F.cross_entropy(m(x).view(-1, a.vocab), y.view(-1))
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if i > 0:
        times.append(time.perf_counter() - t0)
times.sort(); med = times[len(times) // 2]
print(json.dumps({"system": "pytorch-" + torch.__version__ + ("" if a.no_sdpa else "-sdpa"), "arch": a.arch,
                  "params": n, "batch": a.batch, "seq": a.seq, "step_ms_median": round(med * 1e3, 1),
                  "tokens_per_s": round(a.batch * a.seq / med, 1), "loss_last": round(loss.item(), 4),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
