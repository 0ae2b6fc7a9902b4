#!/usr/bin/env python3
"""`lmforge serve` through the official `openai` Python client and curl.

  python3 -m venv .venv-serve && .venv-serve/bin/pip install openai
  .venv-serve/bin/python scripts/check_openai.py --model MODEL_DIR_OR_GGUF [--lmforge target/release/lmforge]

Starts the server on a free loopback port with an API key and checks, with the client a user
would use: the model list; a chat completion, whole and streamed (the streamed deltas make the
whole answer at temperature 0); a text completion with a stop string; usage counts; the errors
the client raises for an unknown model, a prompt over the limit, a wrong key and a full queue;
and the same calls with curl. Prints one JSON line per check; exits non-zero on a failure.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import threading

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-lmforge-check"


def say(check, ok, **kw):
    print(json.dumps({"check": check, "ok": ok, **kw}, ensure_ascii=False), flush=True)
    if not ok:
        sys.exit(f"check failed: {check}")


def start(lm, args):
    p = subprocess.Popen([lm, "serve", "--port", "0", *args], stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True)
    for line in p.stderr:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, m.group(1)
    sys.exit("the server did not start")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--lmforge", default=os.path.join(ROOT, "target/release/lmforge"))
    a = ap.parse_args()
    srv, url = start(a.lmforge, ["--model", a.model, "--name", "m", "--api-key", KEY,
                                 "--max-tokens", "64", "--max-prompt-tokens", "256"])
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        say("openai package", True, version=openai.__version__)
        ids = [m.id for m in c.models.list()]
        say("models.list", ids == ["m"], ids=ids)
        msgs = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model="m", messages=msgs, max_tokens=24, temperature=0)
        whole = r.choices[0].message.content
        say("chat.completions", r.object == "chat.completion" and len(whole) > 0
            and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens,
            answer=whole, finish=r.choices[0].finish_reason, usage=r.usage.model_dump())
        parts, finish, usage = [], None, None
        for ch in c.chat.completions.create(model="m", messages=msgs, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}):
            if ch.usage:
                usage = ch.usage
            for choice in ch.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        say("chat.completions stream", "".join(parts) == whole and finish == r.choices[0].finish_reason
            and usage.completion_tokens == r.usage.completion_tokens, chunks=len(parts), finish=finish)
        t = c.completions.create(model="m", prompt="The three primary colors are", max_tokens=32,
                                 temperature=0)
        text = t.choices[0].text
        stop = text.strip().split()[1] if len(text.strip().split()) > 1 else None
        if stop:
            s = c.completions.create(model="m", prompt="The three primary colors are", max_tokens=32,
                                     temperature=0, stop=[stop])
            say("completions + stop", text.startswith(s.choices[0].text) and stop not in s.choices[0].text
                and s.choices[0].finish_reason == "stop", text=text, stop=stop, cut=s.choices[0].text)
        seeded = [c.chat.completions.create(model="m", messages=msgs, max_tokens=16, temperature=0.9,
                                            seed=42).choices[0].message.content for _ in range(2)]
        say("same seed, same sample", seeded[0] == seeded[1], sample=seeded[0])
        for name, call, exc in [
            ("unknown model", lambda: c.chat.completions.create(model="gpt-4o", messages=msgs),
             openai.NotFoundError),
            ("prompt over the limit", lambda: c.completions.create(model="m", prompt="word " * 400),
             openai.BadRequestError),
            ("wrong key", lambda: openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
             .models.list(), openai.AuthenticationError),
        ]:
            try:
                call()
                say(name, False, error="no error")
            except exc as e:
                say(name, True, status=e.status_code, message=e.body.get("message") if isinstance(e.body, dict) else str(e.body))
        r = c.completions.create(model="m", prompt="Count to a thousand: 1, 2,", max_tokens=4096, temperature=0)
        say("max_tokens over the limit is cut to it", r.usage.completion_tokens <= 64,
            completion_tokens=r.usage.completion_tokens, finish=r.choices[0].finish_reason)
        # curl, as serving.md shows it.
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8})
        out = subprocess.run(["curl", "-s", url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                              "-H", f"Authorization: Bearer {KEY}", "-d", body], capture_output=True, text=True)
        v = json.loads(out.stdout)
        say("curl chat", v["object"] == "chat.completion", answer=v["choices"][0]["message"]["content"])
        out = subprocess.run(["curl", "-sN", url + "/v1/completions", "-H", f"Authorization: Bearer {KEY}",
                              "-d", json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 8, "stream": True})],
                             capture_output=True, text=True)
        events = [l[6:] for l in out.stdout.splitlines() if l.startswith("data: ")]
        say("curl stream", events[-1] == "[DONE]" and len(events) >= 3, events=len(events))
        out = subprocess.run(["curl", "-s", "-w", "\\n%{http_code}", url + "/v1/chat/completions",
                              "-H", f"Authorization: Bearer {KEY}", "-d", "{not json"], capture_output=True, text=True)
        body, code = out.stdout.rsplit("\n", 1)
        say("curl malformed JSON", code == "400" and "not valid JSON" in json.loads(body)["error"]["message"],
            status=code, error=json.loads(body)["error"])
    finally:
        srv.kill()
        srv.wait()
    # A full queue: one place in the batch, one in the queue, three long requests at once.
    srv, url = start(a.lmforge, ["--model", a.model, "--name", "m", "--max-batch", "1", "--queue", "1"])
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        results = []

        def ask():
            try:
                c.completions.create(model="m", prompt="Count:", max_tokens=64, temperature=0)
                results.append("ok")
            except openai.RateLimitError as e:
                results.append(f"429: {e.body.get('message')}")

        ts = [threading.Thread(target=ask) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        say("full queue -> RateLimitError", results.count("ok") == 2
            and sum(r.startswith("429") for r in results) == 1, results=results)
    finally:
        srv.kill()
        srv.wait()


if __name__ == "__main__":
    main()
