"""The dashboard in a real headless Chromium against a real `fapool serve`.

Needs Debian's `chromium` (apt-get install -y --no-install-recommends chromium) and the
`playwright` Python package; never `playwright install`, the browser comes from apt.

The screenshot goes to pytest's tmp dir, so a run leaves the checkout clean; with
`FAPOOL_UPDATE_SCREENSHOT=1` it replaces the tracked `docs/dashboard.png` instead.
"""

import os
import threading
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("FAPOOL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
POLL_MS = 250  # well under the 2 s cooldown, so the page sees the pool before it shrinks
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y --no-install-recommends chromium, "
                    "or set FAPOOL_CHROMIUM to its path")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, fapool_server):
    """A 1280x900 page that records console errors, page errors and every request URL."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.console_errors = []
    page.request_urls = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(f"uncaught: {e}"))
    page.on("request", lambda r: page.request_urls.append(r.url))
    yield page
    context.close()


def chart_attr(page, name):
    return page.get_attribute('[data-testid="pool-chart"]', name)


def screenshot_path(tmp_path: Path) -> Path:
    return DOCS_SCREENSHOT if os.environ.get("FAPOOL_UPDATE_SCREENSHOT") == "1" else tmp_path / "dashboard.png"


def test_dashboard_follows_the_pool_growing(page, fapool_server, tmp_path):
    base = fapool_server
    page.goto(f"{base}/dashboard?interval_ms={POLL_MS}")
    page.wait_for_function("window.__fapool && window.__fapool.samples.length >= 1", timeout=WAIT_MS)
    # Idle pool: zero attention actors once earlier requests' cooldown has passed.
    page.wait_for_function(
        "document.querySelector('[data-testid=pool-chart]').dataset.lastSize === '0'", timeout=WAIT_MS)
    assert page.text_content('[data-testid="pool-size"]') == "0"
    assert page.get_attribute('[data-testid="status"]', "data-state") == "ok"

    # A 70-token prompt passes the curve's 64-token threshold: the pool wants 3 actors.
    result = {}

    def generate():
        body = {"prompt_token_ids": [5] * 70, "max_tokens": 8, "temperature": 0}
        result["response"] = httpx.post(f"{base}/generate", json=body, timeout=WAIT_MS / 1000)

    sender = threading.Thread(target=generate)
    sender.start()
    page.wait_for_function(
        "Number(document.querySelector('[data-testid=pool-chart]').dataset.maxSize) >= 1", timeout=WAIT_MS)
    page.wait_for_selector('[data-testid="events-table"] tbody tr[data-direction="up"]', timeout=WAIT_MS)
    sender.join(timeout=WAIT_MS / 1000)
    response = result["response"]
    assert response.status_code == 200, response.text
    assert len(response.json()["token_ids"]) == 8

    # The finished request shows up in the latency window, and the chart has drawn it.
    page.wait_for_function(
        "(window.__fapool.lastStatus.latency || {}).count >= 1", timeout=WAIT_MS)
    state = page.evaluate("window.__fapool")
    assert len(state["samples"]) >= 2
    assert state["errors"] == 0
    assert max(s["size"] for s in state["samples"]) >= 1
    assert int(chart_attr(page, "data-max-size")) >= 1
    up_row = page.text_content('[data-testid="events-table"] tbody tr[data-direction="up"]')
    assert "→" in up_row and "up" in up_row
    assert page.get_attribute('[data-testid="status"]', "data-state") == "ok"

    shot = screenshot_path(tmp_path)
    shot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert page.console_errors == []
    foreign = [u for u in page.request_urls if not u.startswith(base + "/") and not u.startswith("data:")]
    assert foreign == [], f"the page reached outside the server: {foreign}"


# Every box whose text could be cut: tiles, labels, headings, legends, table cells. A cut is text
# wider than its box (scrollWidth > clientWidth) or an SVG label past its chart's edges.
CUT = """() => {
  const cut = [];
  for (const el of document.querySelectorAll('.tile .value, .tile .label, h1, h2, .legend span, td, th')) {
    if (el.scrollWidth > el.clientWidth + 1) cut.push(el.id || el.className || el.tagName);
  }
  for (const svg of document.querySelectorAll('svg.chart')) {
    const w = svg.getBoundingClientRect().width;
    for (const t of svg.querySelectorAll('text')) {
      const b = t.getBBox();
      if (b.x < -1 || b.x + b.width > w + 1) cut.push(svg.id + ': ' + t.textContent);
    }
  }
  return cut;
}"""


def test_a_new_tab_draws_the_servers_history_and_cuts_no_text(browser, fapool_server, tmp_path):
    """History lives in the ingress (`/pool/history`, the last hour): a tab opened now starts with
    the samples taken before it. At 1280 and 1920 px no tile, label or chart text is cut."""
    deadline = 60
    for _ in range(deadline):
        hist = httpx.get(f"{fapool_server}/pool/history", timeout=10).json()
        if len(hist["samples"]) >= 3:
            break
        threading.Event().wait(1)
    assert len(hist["samples"]) >= 3 and hist["window_s"] == 3600
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto(f"{fapool_server}/dashboard?interval_ms=60000")  # one live poll: the rest is history
        page.wait_for_function("window.__fapool && window.__fapool.lastStatus", timeout=WAIT_MS)
        state = page.evaluate("window.__fapool")
        assert state["historyLoaded"] >= 3 and len(state["samples"]) >= 3
        assert state["samples"][0]["t"] <= hist["samples"][0]["t"] + 1e-6
        for width in (1280, 1920):
            page.set_viewport_size({"width": width, "height": 900})
            page.evaluate("window.dispatchEvent(new Event('resize'))")
            assert page.evaluate(CUT) == [], f"text cut at {width} px"
            page.screenshot(path=str(tmp_path / f"dashboard-{width}.png"), full_page=True)
            assert (tmp_path / f"dashboard-{width}.png").stat().st_size > 10_000
            if os.environ.get("FAPOOL_SCREENSHOT_DIR"):  # to look at them
                Path(os.environ["FAPOOL_SCREENSHOT_DIR"], f"dashboard-{width}.png").write_bytes(
                    (tmp_path / f"dashboard-{width}.png").read_bytes())
    finally:
        context.close()
