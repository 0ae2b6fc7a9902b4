#!/usr/bin/env python3
"""Writes the reference fixtures the Rust tests compare against (llm.c's test_gpt2 approach).

For each supported model type it builds a tiny random model with transformers, saves it as an
HF directory under tests/fixtures/<name>/, and saves reference.safetensors beside it:
  input_ids (B, T) int64, logits (B, T, V), loss (mean next-token CE), and
  grad.<param> for every parameter (one backward of that loss).
Also writes a small byte-level BPE tokenizer and the ids it gives for a mixed test text.

Setup: python3 -m venv .venv-ref && .venv-ref/bin/pip install torch transformers safetensors
Run:   .venv-ref/bin/python scripts/make_fixtures.py      (from the repository root)
"""
import json, os, pathlib
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, PreTrainedTokenizerFast)

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
EOT = "<|endoftext|>"
MIXED = "Hello,  world!\n\n  Ünïcödé — ℕ∀ 🦀 tabs\there 12345 6.02e23 <|endoftext|>after\r\nend   "

def tokenizer():
    text = (ROOT / "data" / "shakespeare" / "hamlet.txt").read_text()[:60000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return tok

def save_tok(tok, d):
    tok.save(str(d / "tokenizer.json"))
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT,
               "unk_token": EOT, "model_max_length": 64}, open(d / "tokenizer_config.json", "w"), indent=1)

def build(name, model, tok, eot):
    torch.manual_seed(1)
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(d, safe_serialization=True)
    save_tok(tok, d)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    ids[0, 5] = eot
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    ref = {"input_ids": ids, "logits": out.logits.detach().contiguous(), "loss": out.loss.detach().reshape(1)}
    for n, p in model.named_parameters():
        ref["grad." + n] = p.grad.detach().contiguous()
    save_file(ref, str(d / "reference.safetensors"))
    print(name, sum(p.numel() for p in model.parameters()), "params, loss", round(out.loss.item(), 4))

def main():
    torch.manual_seed(0)
    tok = tokenizer()
    V = tok.get_vocab_size()
    eot = tok.token_to_id(EOT)
    common = dict(vocab_size=V, bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(0)
    build("gpt2_tiny", GPT2LMHeadModel(GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        attn_implementation="eager", **common)), tok, eot)
    torch.manual_seed(0)
    build("llama_tiny", LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500.0,
        attn_implementation="eager", **common)), tok, eot)
    torch.manual_seed(0)
    build("qwen2_tiny", Qwen2ForCausalLM(Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
        attn_implementation="eager", **common)), tok, eot)
    torch.manual_seed(0)
    build("mistral_tiny", MistralForCausalLM(MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=64, sliding_window=5, tie_word_embeddings=False,
        attn_implementation="eager", **common)), tok, eot)
    # Tokenizer parity: what transformers' tokenizer(text) gives.
    d = OUT / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    save_tok(tok, d)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    json.dump({"text": MIXED, "ids": hf(MIXED)["input_ids"], "decoded": hf.decode(hf(MIXED)["input_ids"])},
              open(d / "reference.json", "w"), ensure_ascii=False, indent=1)

if __name__ == "__main__":
    main()
