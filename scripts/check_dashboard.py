#!/usr/bin/env python3
"""The dashboard in a real headless browser (Chromium from Debian, driven by Playwright).

  apt-get install chromium            # Debian's package
  python3 -m venv .venv-serve && .venv-serve/bin/pip install playwright openai
  .venv-serve/bin/python scripts/check_dashboard.py [--lmforge target/release/lmforge] [--shot docs/img/dashboard.png]

Makes a runs directory with a finished SFT run (a model to talk to) and a pre-training run that
keeps training while it watches, starts `lmforge dashboard` on a free loopback port, and checks:
the page loads; the live run's report shows its curves and they grow while it trains (the step
count of the loss curve embedded in the report rises); a screenshot; the playground streams a
reply from the SFT run's model. Prints one JSON line per check; exits non-zero on a failure.
Playwright's own browser download is not used: it drives /usr/bin/chromium.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "model.d_model=32", "--set", "model.n_layer=1", "--set", "model.n_head=2",
        "--set", "model.ctx=32", "--set", "data.seq_len=32", "--set", "tokenizer.vocab_size=300"]


def say(check, ok, **kw):
    print(json.dumps({"check": check, "ok": ok, **kw}), flush=True)
    if not ok:
        sys.exit(f"check failed: {check}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lmforge", default=os.path.join(ROOT, "target/release/lmforge"))
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--shot", default=os.path.join(ROOT, "docs/img/dashboard.png"))
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="lmforge-dashboard-")
    runs = os.path.join(work, "runs")
    os.makedirs(runs)
    lm = a.lmforge
    procs = []
    try:
        # A model to talk to: the tiny Llama fixture with a chat template, fine-tuned briefly.
        base = os.path.join(work, "tiny-chat")
        shutil.copytree(os.path.join(ROOT, "tests/fixtures/llama_tiny"), base)
        with open(os.path.join(base, "chat_template.jinja"), "w") as f:
            f.write("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
        data = os.path.join(work, "sft.jsonl")
        with open(data, "w") as f:
            for i in range(16):
                f.write(json.dumps({"prompt": f"Q{i}: who?", "completion": f" Hamlet {i}"}) + "\n")
        subprocess.run([lm, "sft", "--model", base, "--data", data, "--out", os.path.join(runs, "sft-tiny"),
                        "--quiet", "--set", "train.max_steps=20"], check=True)
        # A run that is still training while the page is watched.
        corpus = os.path.join(work, "corpus.txt")
        with open(os.path.join(ROOT, "data/shakespeare/hamlet.txt")) as f:
            text = f.read()
        with open(corpus, "w") as f:
            f.write(text[:40000])
        live = subprocess.Popen([lm, "pretrain", "--data", corpus, "--out", os.path.join(runs, "pretrain-live"),
                                 "--quiet", "--max-steps", "1000000", "--eval-every", "0"] + TINY,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(live)
        dash = subprocess.Popen([lm, "dashboard", "--runs", runs, "--port", "0"],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        procs.append(dash)
        url = None
        for line in dash.stderr:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/", line)
            if m:
                url = m.group(1) + "/"
                break
        say("dashboard started", url is not None, url=url)
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(runs, "pretrain-live", "metrics.jsonl")):
            if time.time() > deadline:
                say("live run started", False)
            time.sleep(0.2)
        time.sleep(2)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=a.chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("#runs input[type=checkbox]")
            names = page.eval_on_selector_all("#runs input[type=checkbox]", "els => els.map(e => e.value)")
            say("page lists the runs", sorted(names) == ["pretrain-live", "sft-tiny"], runs=names)
            # Show the live run only.
            for n in names:
                box = page.locator(f"#runs input[value='{n}']")
                if box.is_checked() != (n == "pretrain-live"):
                    box.click()

            def last_step():
                f = page.frame_locator("#report")
                try:
                    raw = f.locator("#lmforge-report").text_content(timeout=5000)
                except Exception:  # noqa: BLE001 (report not loaded yet)
                    return None
                d = json.loads(raw)
                if d["runs"][0]["name"] != "pretrain-live":
                    return None
                loss = next((pn for pn in d["panels"] if pn["metric"] == "loss"), None)
                pts = loss["series"][0]["points"] if loss else []
                return pts[-1][0] if pts else None

            first = None
            deadline = time.time() + 30
            while first is None and time.time() < deadline:
                first = last_step()
                time.sleep(0.5)
            svgs = page.frame_locator("#report").locator("svg").count()
            say("report shows the live run's curves", first is not None and svgs > 0, panels=svgs, last_step=first)
            later = first
            deadline = time.time() + 30
            while later == first and time.time() < deadline:
                time.sleep(1)
                later = last_step()
            say("curves update while the run trains", later is not None and later > first,
                step_before=first, step_after=later)
            os.makedirs(os.path.dirname(a.shot), exist_ok=True)
            page.screenshot(path=a.shot, full_page=False)
            say("screenshot", os.path.getsize(a.shot) > 10000, path=os.path.relpath(a.shot, ROOT))
            # The playground: the SFT run's model, streamed.
            page.select_option("#model", "sft-tiny/model")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.fill("#prompt", "Q3: who?")
            page.click("#send")
            page.wait_for_function("document.querySelector('#send').disabled === false && "
                                   "document.querySelectorAll('#log .msg').length >= 2", timeout=60000)
            reply = page.locator("#log .msg").nth(1)
            cls = reply.get_attribute("class")
            text = reply.text_content()
            say("playground replies", "assistant" in cls and len(text) > 0, reply=text,
                finish=reply.get_attribute("data-finish"))
            say("no script errors on the page", not errors, errors=errors)
            browser.close()
    finally:
        for pr in procs:
            pr.kill()
            pr.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
