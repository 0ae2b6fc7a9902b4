#!/usr/bin/env python3
"""Writes the reference fixtures the Rust tests compare against (llm.c's test_gpt2 approach).

For each supported model type it builds a tiny random model with transformers, saves it as an
HF directory under tests/fixtures/<name>/, and saves reference.safetensors beside it:
  input_ids (B, T) int64, logits (B, T, V), loss (mean next-token CE), and
  grad.<param> for every parameter (one backward of that loss).
Also writes a small byte-level BPE tokenizer and the ids it gives for a mixed test text, and
GGUF fixtures (tests/fixtures/gguf/): the llama model as llama.cpp's converter would write it
(Q/K rows permuted, tokenizer in the metadata) in F32 and in Q8_0, with reference logits, and one
tensor of every supported quant type with the `gguf` package's dequantization of it.

Also LoRA adapters written by Python peft, with logits and LoRA-weight gradients (tests/fixtures/peft/).

Setup: python3 -m venv .venv-ref && .venv-ref/bin/pip install torch transformers safetensors gguf peft
Run:   .venv-ref/bin/python scripts/make_fixtures.py      (from the repository root; `... peft` for
       only the PEFT fixtures)
"""
import json, os, pathlib
import torch
from safetensors.torch import save_file, load_file
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
    legacy_tokenizer(d)
    half_fixtures(tok)
    gguf_fixtures()
    peft_fixtures()
    bert_fixture()

def half_fixtures(tok):
    """gpt2_tiny saved in float16 and llama_tiny in bfloat16; reference logits are computed in
    float32 from the rounded weights (what lmforge computes on CPU)."""
    for name, cls, dt in [("gpt2_tiny", GPT2LMHeadModel, torch.float16), ("llama_tiny", LlamaForCausalLM, torch.bfloat16)]:
        m = cls.from_pretrained(OUT / name, attn_implementation="eager").eval()
        d = OUT / f"{name}_{str(dt).split('.')[-1]}"
        d.mkdir(parents=True, exist_ok=True)
        m.to(dt).save_pretrained(d, safe_serialization=True)
        save_tok(tok, d)
        ids = load_file(str(OUT / name / "reference.safetensors"))["input_ids"]
        with torch.no_grad():
            logits = m.float()(input_ids=ids).logits.contiguous()
        save_file({"input_ids": ids, "logits": logits}, str(d / "reference.safetensors"))

def legacy_tokenizer(src):
    """GPT-2's older tokenizer files (vocab.json + merges.txt, no tokenizer.json) and what the
    slow GPT2Tokenizer gives for the mixed text."""
    from transformers import GPT2Tokenizer, GPT2TokenizerFast
    d = OUT / "tokenizer_legacy"
    d.mkdir(parents=True, exist_ok=True)
    fast = GPT2TokenizerFast(tokenizer_file=str(src / "tokenizer.json"), eos_token=EOT, bos_token=EOT, unk_token=EOT)
    vocab = fast.backend_tokenizer.model
    files = vocab.save(str(d))  # vocab.json, merges.txt
    json.dump({"tokenizer_class": "GPT2Tokenizer", "eos_token": EOT, "bos_token": EOT, "unk_token": EOT,
               "model_max_length": 64}, open(d / "tokenizer_config.json", "w"), indent=1)
    slow = GPT2Tokenizer.from_pretrained(str(d))
    ids = slow(MIXED)["input_ids"]
    json.dump({"text": MIXED, "ids": ids, "fast_ids": fast(MIXED)["input_ids"]},
              open(d / "reference.json", "w"), ensure_ascii=False, indent=1)

def permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF's half-split RoPE rows → interleaved.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}

def gguf_name(n):
    if n in GGUF_NAMES:
        return GGUF_NAMES[n]
    _, _, i, rest = n.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{GGUF_PARTS[part]}.{kind}"

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

def write_llama_gguf(path, model, tok_json, qtype):
    """Writes `model` (a LlamaForCausalLM) as llama.cpp would; returns the state dict it encodes."""
    import gguf, numpy as np
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings); w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers); w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps); w.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads); w.add_vocab_size(c.vocab_size)
    vocab = tok_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok_json["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("gpt-2"); w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens]); w.add_token_merges(merges)
    w.add_bos_token_id(vocab[EOT]); w.add_eos_token_id(vocab[EOT]); w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    encoded = {}
    for n, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if n.endswith("q_proj.weight"):
            a = permute(a, c.num_attention_heads)
        elif n.endswith("k_proj.weight"):
            a = permute(a, c.num_key_value_heads)
        q = qtype if a.ndim == 2 else gguf.GGMLQuantizationType.F32
        raw = gguf.quants.quantize(a, q)
        w.add_tensor(gguf_name(n), raw, raw_dtype=q)
        back = gguf.quants.dequantize(raw, q).reshape(a.shape)
        if n.endswith("q_proj.weight"):  # un-permute for the HF-side reference model
            back = back.reshape(c.num_attention_heads, back.shape[0] // c.num_attention_heads // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
        elif n.endswith("k_proj.weight"):
            back = back.reshape(c.num_key_value_heads, back.shape[0] // c.num_key_value_heads // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
        encoded[n] = torch.from_numpy(np.ascontiguousarray(back))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return encoded

def gguf_fixtures():
    import gguf, numpy as np
    d = OUT / "gguf"
    d.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(OUT / "llama_tiny", attn_implementation="eager").eval()
    tok_json = json.load(open(OUT / "llama_tiny" / "tokenizer.json"))
    ids = load_file(str(OUT / "llama_tiny" / "reference.safetensors"))["input_ids"]
    ref = {"input_ids": ids}
    for name, q in [("f32", gguf.GGMLQuantizationType.F32), ("q8_0", gguf.GGMLQuantizationType.Q8_0)]:
        sd = write_llama_gguf(d / f"llama_{name}.gguf", model, tok_json, q)
        m = LlamaForCausalLM(model.config).eval()
        m.load_state_dict(sd)
        with torch.no_grad():
            ref[f"logits_{name}"] = m(input_ids=ids).logits.contiguous()
    save_file(ref, str(d / "llama_reference.safetensors"))
    # One (2, 256) tensor per quant type: real quantization where gguf-py has it, else random
    # blocks with finite f16 scales; the reference is gguf-py's dequantization.
    rng = np.random.default_rng(3)
    T = gguf.GGMLQuantizationType
    f16_at = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
    w = gguf.GGUFWriter(str(d / "quants.gguf"), "llama")
    deq = {}
    for q in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
        x = rng.standard_normal((2, 256)).astype(np.float32)
        if q in f16_at:
            bsize, tsize = gguf.GGML_QUANT_SIZES[q]
            raw = rng.integers(0, 256, (2, 256 // bsize, tsize), dtype=np.uint8)
            for off in f16_at[q]:
                raw[:, :, off:off + 2] = rng.uniform(-0.1, 0.1, (2, 256 // bsize)).astype(np.float16)[..., None].view(np.uint8)
            raw = raw.reshape(2, -1)
        else:
            raw = gguf.quants.quantize(x, q)
        w.add_tensor(q.name, raw, raw_dtype=q)
        deq[q.name] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, q).reshape(2, 256).astype(np.float32)))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    save_file(deq, str(d / "quants_reference.safetensors"))
    print("gguf fixtures:", sorted(p.name for p in d.iterdir()))

def save_peft_fixture(m, name, kind, first_label=True):
    """Saves a peft model's adapter as tests/fixtures/peft/<name>_<kind> (base path made
    relative) with reference.safetensors: the logits with the adapter on and off, the loss and
    the gradient of every adapter weight."""
    d = OUT / "peft" / f"{name}_{kind}"
    d.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(d)
    (d / "README.md").unlink(missing_ok=True)
    c = json.load(open(d / "adapter_config.json"))
    c["base_model_name_or_path"] = f"tests/fixtures/{name}"
    json.dump(c, open(d / "adapter_config.json", "w"), indent=2)
    ids = load_file(str(OUT / name / "reference.safetensors"))["input_ids"]
    labels = ids.clone()
    if not first_label:  # prompt tuning: no loss on predicting the first token from the virtual ones
        labels[:, 0] = -100
    out = m(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = {"input_ids": ids, "logits": out.logits.detach().contiguous(), "loss": out.loss.detach().reshape(1)}
    with m.disable_adapter(), torch.no_grad():
        ref["logits_base"] = m(input_ids=ids).logits.contiguous()
    for n, p in m.named_parameters():
        if p.requires_grad:
            key = n.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            ref["grad." + key] = p.grad.detach().contiguous()
    save_file(ref, str(d / "reference.safetensors"))
    print("peft", name, kind, "params", sum(p.numel() for p in m.parameters() if p.requires_grad))

def peft_fixtures():
    """LoRA adapters written by Python peft (random A and B, alpha != r) on llama_tiny and on
    gpt2_tiny (Conv1D layers: fan_in_fan_out), with logits with the adapter on and off, the loss,
    and the gradient of every LoRA weight (the base is frozen)."""
    from peft import LoraConfig, get_peft_model
    for name, cls, targets, fan in [("llama_tiny", LlamaForCausalLM, ["q_proj", "v_proj", "down_proj"], False),
                                    ("gpt2_tiny", GPT2LMHeadModel, ["c_attn", "c_fc"], True)]:
        torch.manual_seed(5)
        base = cls.from_pretrained(OUT / name, attn_implementation="eager").eval()
        cfg = LoraConfig(r=4, lora_alpha=6, target_modules=targets, lora_dropout=0.0, init_lora_weights=False,
                         fan_in_fan_out=fan, task_type="CAUSAL_LM")
        m = get_peft_model(base, cfg).eval()
        save_peft_fixture(m, name, "lora")

def ia3_fixtures():
    """IA³ adapters written by Python peft on llama_tiny (k_proj, v_proj, down_proj
    feed-forward) and gpt2_tiny (c_attn, mlp.c_proj feed-forward; Conv1D), their vectors moved
    off 1 so they change the model, with logits on and off, the loss and every vector's
    gradient."""
    from peft import IA3Config, get_peft_model
    for name, cls, targets, ff, fan in [
            ("llama_tiny", LlamaForCausalLM, ["k_proj", "v_proj", "down_proj"], ["down_proj"], False),
            ("gpt2_tiny", GPT2LMHeadModel, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"], True)]:
        torch.manual_seed(7)
        base = cls.from_pretrained(OUT / name, attn_implementation="eager").eval()
        cfg = IA3Config(target_modules=targets, feedforward_modules=ff, fan_in_fan_out=fan, task_type="CAUSAL_LM")
        m = get_peft_model(base, cfg).eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "ia3_l" in n:
                    p.uniform_(0.5, 1.5)
        save_peft_fixture(m, name, "ia3")

def dora_fixtures():
    """DoRA (LoRA with use_dora) adapters written by Python peft on llama_tiny and gpt2_tiny
    (Conv1D): random A and B, magnitudes moved off their initial norms."""
    from peft import LoraConfig, get_peft_model
    for name, cls, targets, fan in [("llama_tiny", LlamaForCausalLM, ["q_proj", "v_proj", "down_proj"], False),
                                    ("gpt2_tiny", GPT2LMHeadModel, ["c_attn", "c_fc"], True)]:
        torch.manual_seed(11)
        base = cls.from_pretrained(OUT / name, attn_implementation="eager").eval()
        cfg = LoraConfig(r=4, lora_alpha=6, target_modules=targets, lora_dropout=0.0, init_lora_weights=False,
                         fan_in_fan_out=fan, use_dora=True, task_type="CAUSAL_LM")
        m = get_peft_model(base, cfg).eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
        save_peft_fixture(m, name, "dora")

def prompt_fixtures():
    """Prompt-learning adapters written by Python peft on llama_tiny (grouped-query: the prefix
    has n_kv heads) and gpt2_tiny: prefix tuning (the prefix itself, and through the projection
    MLP), prompt tuning, P-tuning with the MLP and with the LSTM encoder — 3 virtual tokens,
    random weights. Besides save_peft_fixture's references: the logits of the real positions
    only (PEFT's include the virtual ones), the unfolded training weights (train.safetensors,
    PEFT's names without `default`) and the logits of PEFT reloading its own folded files."""
    from peft import (PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                      get_peft_model)
    P = 3
    kinds = {
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"),
        "prefix_proj": lambda: PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                                  encoder_hidden_size=16, task_type="CAUSAL_LM"),
        "prompt": lambda: PromptTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"),
        "ptuning_mlp": lambda: PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16,
                                                   task_type="CAUSAL_LM"),
        "ptuning_lstm": lambda: PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=8,
                                                    encoder_reparameterization_type="LSTM",
                                                    encoder_num_layers=2, task_type="CAUSAL_LM"),
    }
    for name, cls in [("llama_tiny", LlamaForCausalLM), ("gpt2_tiny", GPT2LMHeadModel)]:
        for kind, make in kinds.items():
            torch.manual_seed(13)
            base = cls.from_pretrained(OUT / name, attn_implementation="eager").eval()
            m = get_peft_model(base, make()).eval()
            with torch.no_grad():  # keep the random prefix keys moderate
                for n, p in m.named_parameters():
                    if p.requires_grad and kind.startswith("prefix") and "embedding" in n:
                        p.mul_(0.5)
            save_peft_fixture(m, name, kind, first_label=kind.startswith("prefix"))
            d = OUT / "peft" / f"{name}_{kind}"
            ref = load_file(str(d / "reference.safetensors"))
            if not kind.startswith("prefix"):
                for k in ["logits", "logits_base"]:
                    if ref[k].shape[1] > ref["input_ids"].shape[1]:
                        ref[k] = ref[k][:, P:].contiguous()
            train = {n.replace(".default", ""): p.detach().contiguous()
                     for n, p in m.named_parameters() if p.requires_grad}
            if kind in ("prefix", "prompt"):  # trained as is: lmforge's name is the saved one
                train["prompt_embeddings"] = train.pop("prompt_encoder.embedding.weight")
            save_file(train, str(d / "train.safetensors"))
            re = PeftModel.from_pretrained(cls.from_pretrained(OUT / name, attn_implementation="eager"), d).eval()
            with torch.no_grad():
                lg = re(input_ids=ref["input_ids"]).logits
            lg = lg[:, lg.shape[1] - ref["input_ids"].shape[1]:]
            print("  reload", kind, "max |dlogits|", (lg - ref["logits"]).abs().max().item())
            save_file(ref, str(d / "reference.safetensors"))

def prompt_cls_fixture():
    """Prompt tuning of a BERT classifier by Python peft (SEQ_CLS, modules_to_save classifier and
    pooler, 3 virtual tokens pooled first as transformers does): bert_tiny, random weights, a
    padded batch; logits, cross-entropy loss and the gradients of the prompt and the heads."""
    from transformers import BertForSequenceClassification
    from peft import PromptTuningConfig, get_peft_model
    torch.manual_seed(17)
    m = BertForSequenceClassification.from_pretrained(OUT / "bert_tiny", num_labels=3).eval()
    cfg = PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS", modules_to_save=["classifier", "pooler"])
    p = get_peft_model(m, cfg).eval()
    with torch.no_grad():
        for n, q in p.named_parameters():
            if q.requires_grad and "prompt" in n:
                q.mul_(0.3)
    ids = torch.randint(5, 300, (2, 7)); ids[:, 0] = 2
    mask = torch.ones(2, 7, dtype=torch.int64); mask[1, 5:] = 0; ids[1, 5:] = 0
    labels = torch.tensor([2, 0])
    out = p(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    d = OUT / "peft" / "bert_tiny_prompt_cls"
    d.mkdir(parents=True, exist_ok=True)
    p.save_pretrained(d)
    (d / "README.md").unlink(missing_ok=True)
    c = json.load(open(d / "adapter_config.json"))
    c["base_model_name_or_path"] = "tests/fixtures/bert_tiny"
    json.dump(c, open(d / "adapter_config.json", "w"), indent=2)
    ref = {"input_ids": ids, "attention_mask": mask, "labels": labels,
           "logits": out.logits.detach().contiguous(), "loss": out.loss.detach().reshape(1)}
    for n, q in p.named_parameters():
        if q.requires_grad:
            key = n.replace("base_model.", "").replace("modules_to_save.default.", "").replace(
                "prompt_encoder.default.embedding.weight", "prompt_embeddings")
            ref["grad." + key] = q.grad.detach().contiguous()
    save_file(ref, str(d / "reference.safetensors"))
    print("bert prompt cls", sorted(k for k in ref if k.startswith("grad.")))

def bert_fixture():
    """A tiny random BertForMaskedLM with a WordPiece tokenizer; reference: hidden states, MLM
    logits, the MLM loss over a few labelled positions (-100 elsewhere) with padding and token
    types, and every parameter's gradient."""
    from transformers import BertConfig, BertForMaskedLM
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    d = OUT / "bert_tiny"
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator((ROOT / "data" / "shakespeare" / "hamlet.txt").read_text()[:60000].split("\n\n"),
                            trainers.WordPieceTrainer(vocab_size=300, special_tokens=special, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    from tokenizers import decoders
    tok.decoder = decoders.WordPiece()
    tok.save(str(d / "tokenizer.json"))
    json.dump({"tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length": 32,
               "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
               "mask_token": "[MASK]"}, open(d / "tokenizer_config.json", "w"), indent=1)
    torch.manual_seed(0)
    m = BertForMaskedLM(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                                   hidden_dropout_prob=0, attention_probs_dropout_prob=0, pad_token_id=0,
                                   attn_implementation="eager")).eval()
    m.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, tok.get_vocab_size(), (2, 10), generator=g)
    ids[:, 0] = cls
    mask = torch.ones(2, 10, dtype=torch.int64); mask[1, 7:] = 0; ids[1, 7:] = 0
    types = torch.zeros(2, 10, dtype=torch.int64); types[0, 5:] = 1
    labels = torch.full((2, 10), -100); labels[0, 2] = ids[0, 2]; labels[0, 6] = 7; labels[1, 3] = ids[1, 3]
    out = m(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, output_hidden_states=True)
    out.loss.backward()
    ref = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
           "hidden": out.hidden_states[-1].detach().contiguous(), "logits": out.logits.detach().contiguous(),
           "loss": out.loss.detach().reshape(1)}
    for n, p in m.named_parameters():
        ref["grad." + n] = p.grad.detach().contiguous()
    save_file(ref, str(d / "reference.safetensors"))
    enc = tok.encode("To be, or not to be", "that is the question")
    json.dump({"ids": enc.ids, "type_ids": enc.type_ids}, open(d / "tokenizer_reference.json", "w"))
    print("bert_tiny", sum(p.numel() for p in m.parameters()), "params, loss", round(out.loss.item(), 4))

if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["bert"]:
        bert_fixture()
    elif sys.argv[1:] == ["peft"]:
        peft_fixtures()
    elif sys.argv[1:] == ["ia3"]:
        ia3_fixtures()
    elif sys.argv[1:] == ["dora"]:
        dora_fixtures()
    elif sys.argv[1:] == ["prompt"]:
        prompt_fixtures()
        prompt_cls_fixture()
    else:
        main()
