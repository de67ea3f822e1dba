"""The web page end to end in headless Chromium (Debian's /usr/bin/chromium driven by Playwright), on the CPU
with a tiny model: tokenize the sample, bad form values, start training, watch the loss chart grow (with its
validation line), a second tab, Stop (= Ctrl+C: rwkv-interrupted.pth), merge and download, chat with base /
adapter / merged side by side.
A screenshot of each page goes to tests/screenshots/ (git-ignored).

Run only these:  python3 -m pytest -m browser      They skip, saying why, without gradio, playwright or
/usr/bin/chromium, unless RWKV_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "tests" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def _missing() -> str | None:
    for mod, how in (("gradio", 'pip install -e ".[webui]"'), ("playwright", "pip install playwright "
                     "(never `playwright install`: the tests use the system's chromium)")):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed ({how})"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found (apt-get install chromium)"
    return None


_why = _missing()
if _why:
    if os.environ.get("RWKV_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"RWKV_REQUIRE_BROWSER=1 but the browser tests cannot run: {_why}")
    pytest.skip(f"browser tests skipped: {_why}", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    (root / "data").mkdir()
    shutil.copy(ROOT / "data" / "sample.jsonl", root / "data" / "sample.jsonl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(root / "gradio-uploads")}
    subprocess.run([sys.executable, "-m", "tools.make_model", "--version", "7", "--layers", "2", "--width", "64",
                    "--out", str(root / "model" / "tiny.pth"), "--dtype", "fp32"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tools.webui", "--root", str(root), "--port", str(port),
                             "--max-upload-mb", "1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the web page did not start:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.3)
    yield url, root
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    text = (root / "server.log").read_text()
    assert "Traceback" not in text, text[-4000:]        # no bug of ours was hit on the way


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                   headless=True, viewport={"width": 1400, "height": 1000})
        ctx.set_default_timeout(30_000)
        yield ctx
        ctx.close()


@pytest.fixture(scope="module")
def page(browser, server):
    pg = browser.new_page()
    elsewhere = []          # the page must work offline: nothing but our server is ever asked for anything
    browser.on("request", lambda r: elsewhere.append(r.url) if not r.url.startswith((server[0], "data:", "blob:"))
               else None)
    pg.goto(server[0])
    pg.wait_for_selector("#tokenize")
    yield pg
    assert elsewhere == []


def test_other_hosts_are_refused(server):
    url, _ = server
    req = urllib.request.Request(url, headers={"Host": "attacker.example"})   # DNS rebinding
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 403


# ------------------------------------------------------------------------------------------ helpers
def text_of(page, sel: str) -> str:
    return page.locator(sel).inner_text()


def value_of(page, sel: str) -> str:
    return page.locator(sel).input_value()


def wait_text(page, sel: str, pattern: str, timeout: float = 60) -> str:
    """Wait until the element's text (or its textarea's value) matches the regex; return that text."""
    deadline = time.time() + timeout
    got = ""
    while time.time() < deadline:
        loc = page.locator(sel)
        if loc.count():
            inner = loc.first.locator("textarea")
            got = inner.first.input_value() if inner.count() else loc.first.inner_text()
            if re.search(pattern, got):
                return got
        time.sleep(0.25)
    raise AssertionError(f"{sel}: no {pattern!r} after {timeout} s; it shows: {got[-1500:]!r}")


def set_field(page, name: str, value: str) -> None:
    page.locator(f"#field-{name} textarea").fill(value)


def choose(page, elem_id: str, option: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    page.locator(f"#{box.get_attribute('aria-controls')}").get_by_role("option", name=option, exact=True).click()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def no_traceback(page) -> None:
    assert "Traceback" not in page.locator("body").inner_text()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


# ------------------------------------------------------------------------------------------ the pages
def test_data_page(page, server):
    _, root = server
    assert value_of(page, "#data-file input") == ""                    # no data chosen for the user
    # too large for --max-upload-mb 1: the page says so, and nothing is stored
    with page.expect_file_chooser() as chooser:
        page.click("#data-upload")
    chooser.value.set_files(files=[{"name": "big.jsonl", "mimeType": "application/octet-stream",
                                    "buffer": b'{"text": "x"}\n' * 80_000}])
    toast = page.locator(".toast-body").filter(has_text="maximum allowed size")
    toast.first.wait_for()
    assert re.search(r"exceed the maximum allowed size of 1\.0 MB: \"big\.jsonl\"", toast.first.inner_text(), re.I), \
        toast.first.inner_text()
    assert "up to 1 MB" in text_of(page, "#data-upload")
    assert "--max-upload-mb" in text_of(page, "#data-upload-note")
    assert not (root / "data" / "big.jsonl").exists() and value_of(page, "#data-file input") == ""
    # upload: the file lands in data/ under a plain name
    lines = (root / "data" / "sample.jsonl").read_text().splitlines()[:5]
    with page.expect_file_chooser() as chooser:
        page.click("#data-upload")
    chooser.value.set_files(files=[{"name": "my upload.jsonl", "mimeType": "application/octet-stream",
                                    "buffer": ("\n".join(lines) + "\n").encode()}])
    wait_text(page, "#data-message", r"uploaded into")
    assert (root / "data" / "my_upload.jsonl").read_text().splitlines() == lines
    assert value_of(page, "#data-file input") == "my_upload.jsonl"

    # a CSV whose text is in a column of another name: refused with the fields it has, then COLUMN names it
    with page.expect_file_chooser() as chooser:
        page.click("#data-upload")
    chooser.value.set_files(files=[{"name": "notes.csv", "mimeType": "text/csv",
                                    "buffer": "id,body\n1,héllo wörld 你好\n2,\"a, b\"\n".encode()}])
    wait_text(page, "#data-message", r"uploaded into data/notes\.csv")
    assert value_of(page, "#data-file input") == "notes.csv"
    page.click("#tokenize")
    wait_text(page, "#data-message", r'error: data/notes.csv, line 1: the header has "id", "body" but no "text"')
    page.locator("#data-column textarea").fill("body")
    page.click("#tokenize")
    wait_text(page, "#data-message", r"wrote data/notes.bin and data/notes.idx")
    wait_text(page, "#data-stats", r"items: 2")
    page.locator("#data-column textarea").fill("")                  # back to the shapes for the next file
    no_traceback(page)

    choose(page, "data-file", "sample.jsonl")
    page.locator("#data-repeat textarea").fill("two")               # a bad value: make_tokenize's own message
    page.click("#tokenize")
    wait_text(page, "#data-message", r"error: REPEAT must be a positive whole number, got 'two'")
    no_traceback(page)

    page.locator("#data-repeat textarea").fill("20")
    page.click("#tokenize")
    wait_text(page, "#data-message", r"wrote data/sample.bin and data/sample.idx")
    stats = wait_text(page, "#data-stats", r"items: 880")              # 44 items x REPEAT 20
    assert "suggested CTX_LEN" in stats
    assert (root / "data" / "sample.idx").is_file()
    assert "880" in text_of(page, "#batch-table") and "← your data" in text_of(page, "#batch-table")
    assert value_of(page, "#sample-0 textarea").startswith("User: ")
    assert value_of(page, "#sample-1 textarea").startswith("User: ")
    page.wait_for_function("document.querySelectorAll('#data-hist svg .mark-rect path').length >= 5")
    shot(page, "1-data")


def test_train_form_shows_config_errors_next_to_the_field(page, server):
    tab(page, "2 · Train")
    page.wait_for_selector("#field-LORA_R")
    set_field(page, "LORA_R", "abc")
    page.click("#check")
    wait_text(page, "#err-LORA_R", r"LORA_R='abc' is not a whole number\.")
    wait_text(page, "#train-message", r"^error: LORA_R='abc'")
    no_traceback(page)
    shot(page, "2-train-error")

    set_field(page, "LORA_R", "8")
    set_field(page, "LR_FINAL", "1")
    page.click("#check")
    wait_text(page, "#err-LR_FINAL", r"LR_FINAL=1\.0 is larger than LR_INIT=0\.0001")
    assert not page.locator("#err-LORA_R").is_visible()

    set_field(page, "LR_FINAL", "1e-4")
    set_field(page, "LR_INIT", "1e-3")
    page.locator("#field-MODEL input").fill("missing.pth")
    page.locator("#field-MODEL input").press("Enter")
    page.click("#check")
    wait_text(page, "#err-MODEL", r"MODEL: model/missing.pth not found\. Models in model/: tiny.pth")
    no_traceback(page)


def test_train_start_live_chart_reattach_stop(page, browser, server):
    url, root = server
    choose(page, "field-MODEL", "tiny.pth")
    for name, value in (("LORA_R", "8"), ("LORA_ALPHA", "16"), ("CTX_LEN", "128"), ("MICRO_BSZ", "1"),
                        ("EPOCH_STEPS", "20"), ("EPOCH_COUNT", "100"), ("WARMUP_STEPS", "0"), ("VALID_EVERY", "5")):
        set_field(page, name, value)
    choose(page, "field-VALID_DATA", "notes")           # the CSV tokenized on the Data page: a validation set
    page.get_by_text("hardware", exact=True).click()                  # a closed section: open it
    choose(page, "field-ACCELERATOR", "cpu")
    choose(page, "field-PRECISION", "fp32")
    choose(page, "field-GRAD_CP", "0")
    set_field(page, "OUTPUT", "runs/e2e")
    page.locator("#config-name textarea").fill("e2e")
    page.click("#check")
    wait_text(page, "#train-message", r"config is valid")
    assert value_of(page, "#field-DATA input") == "sample"             # set by the Data page's tokenize
    page.get_by_text("memory estimate", exact=True).click()
    memory = wait_text(page, "#memory", r"train peak\s+[\d.]+ GiB")
    assert "RWKV-7, 2 layers × 64 wide, vocabulary 65536; device cpu" in memory

    page.click("#start")
    wait_text(page, "#train-message", r"Started: \./training\.sh --config output/e2e\.env")
    env_text = (root / "output" / "e2e.env").read_text()
    assert "LORA_R='8'" in env_text and "EPOCH_STEPS='20'" in env_text and "ACCELERATOR='cpu'" in env_text

    # the loss chart grows while it trains
    first = int(re.search(r"loss chart: (\d+) points",
                          wait_text(page, "#train-progress", r"loss chart: ([1-9]\d) points", 120)).group(1))
    later = wait_text(page, "#train-progress", r"loss chart: (\d+) points", 5)
    deadline = time.time() + 60
    while int(re.search(r"loss chart: (\d+) points", later).group(1)) < first + 20 and time.time() < deadline:
        time.sleep(0.5)
        later = text_of(page, "#train-progress")
    n_later = int(re.search(r"loss chart: (\d+) points", later).group(1))
    assert n_later >= first + 20, later
    assert re.search(r"optimizer step \*?\*?\d+/2000", later) or "optimizer step" in later, later
    assert re.search(r"tokens/s · time left \d+:\d\d", later), later
    # the validation loss: a second line once there are two validations, and the status says the last and best
    wait_text(page, "#train-progress", r"validation loss [\d.]+ \(optimizer step \d+\) · best so far [\d.]+ "
              r"\(optimizer step \d+\) · ([2-9]|\d\d+) validations", 60)
    page.wait_for_function("document.querySelectorAll('#loss-plot svg .mark-line path').length >= 2")
    labels = page.evaluate("Array.from(document.querySelectorAll('#loss-plot svg text')).map(t => t.textContent)")
    assert "training" in labels and "validation" in labels, labels          # the legend names both lines
    wait_text(page, "#train-samples", r"=== epoch 0\n", 60)              # the sample written at the first save
    shot(page, "3-train-running")

    # a second tab sees the same job; Start is disabled there (one job at a time)
    other = browser.new_page()
    other.goto(url)
    tab(other, "2 · Train")
    wait_text(other, "#train-progress", r"Training")
    assert other.locator("#start").is_disabled()
    assert not other.locator("#stop").is_disabled()
    other.close()

    page.click("#stop")
    wait_text(page, "#train-message", r"Stopped \(exit code 130\); saved: .*rwkv-interrupted\.pth", 120)
    wait_text(page, "#train-progress", r"Stopped")
    assert (root / "runs" / "e2e" / "rwkv-interrupted.pth").is_file()
    assert (root / "runs" / "e2e" / "rwkv-0.pth").is_file() and (root / "runs" / "e2e" / "rwkv-best.pth").is_file()
    wait_text(page, "#train-progress", r"saved: .*runs/e2e/rwkv-best\.pth")
    wait_text(page, "#train-progress", r"\./training\.sh --config output/e2e\.env")
    no_traceback(page)
    shot(page, "3-train-stopped")


def test_merge_page(page, browser, server):
    url, root = server
    tab(page, "3 · Merge")
    assert value_of(page, "#merge-output textarea") == "runs/e2e"          # followed the Train form's OUTPUT
    other = browser.new_page()                     # a page opened later starts at the OUTPUT that was trained
    other.goto(url)
    tab(other, "3 · Merge")
    wait_text(other, "#merge-output", r"^runs/e2e$")
    other.locator("#merge-epoch input").click()
    options = other.locator(f"#{other.locator('#merge-epoch input').get_attribute('aria-controls')}")
    listed = [t.replace("✓", "").strip() for t in options.get_by_role("option").all_inner_texts()]
    epochs = sorted((p.stem[len("rwkv-"):] for p in (root / "runs" / "e2e").glob("rwkv-[0-9]*.pth")), key=int)
    assert listed[0] == "0" and listed == epochs + ["interrupted", "best"]
    other.close()
    page.click("#merge-refresh")
    choose(page, "merge-epoch", "0")
    choose(page, "merge-dtype", "fp32")
    page.click("#merge")
    result = wait_text(page, "#merge-result", r"wrote .*tiny-lora-0\.pth", 120)
    assert "merged runs/e2e/rwkv-0.pth (lora" in result and "RWKV-Runner" in result
    merged = root / "merge" / "tiny-lora-0.pth"
    assert merged.is_file()
    href = page.locator("#merge-download a").first.get_attribute("href")
    assert href == "/download/merge/tiny-lora-0.pth"
    got = page.request.get(url.rstrip("/") + href)
    assert got.status == 200 and got.body() == merged.read_bytes()
    assert page.request.get(url + "download/model/tiny.pth").status == 404      # only merge/ is served
    assert page.request.get(url + "download/merge/../model/tiny.pth").status == 404
    shot(page, "4-merge")


def test_chat_page(page, server):
    tab(page, "4 · Chat")
    page.click("#chat-refresh")
    choose(page, "chat-model-0", "model/tiny.pth")
    choose(page, "chat-addon-0", "(none)")
    choose(page, "chat-model-1", "model/tiny.pth")
    choose(page, "chat-addon-1", "runs/e2e/rwkv-0.pth")
    choose(page, "chat-model-2", "merge/tiny-lora-0.pth")
    choose(page, "chat-addon-2", "(none)")
    page.locator("#chat-temperature input[type=number]").fill("0")     # greedy: comparable answers
    page.locator("#chat-temperature input[type=number]").press("Enter")
    page.locator("#chat-tokens input[type=number]").fill("12")
    page.locator("#chat-tokens input[type=number]").press("Enter")
    page.locator("#chat-input textarea").fill("Hello, who are you?")
    page.click("#chat-send")
    wait_text(page, "#chat-status", r"model 3: [\d.]+ s", 120)
    answers = []
    for i in range(3):
        bubbles = page.locator(f"#chat-{i} .message")
        assert bubbles.count() >= 2, page.locator(f"#chat-{i}").inner_text()
        text = page.locator(f"#chat-{i}").inner_text()
        assert "Hello, who are you?" in text and "⚠" not in text, text
        answers.append(bubbles.last.inner_text().strip())
    # the adapter on top of the base and the merged model are the same model: the same greedy answer
    assert answers[1] == answers[2], answers
    no_traceback(page)
    shot(page, "5-chat")
