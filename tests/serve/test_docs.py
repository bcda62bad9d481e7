"""`/docs` (Swagger UI) and `/redoc` render in a real headless Chromium with the network off:
every request outside the server is refused, and the pages still list the routes.

Needs Debian's `chromium` and the `playwright` package, as tests/serve/test_dashboard.py."""
from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.serve.conftest import Server
from tests.serve.test_dashboard import CHROMIUM, CHROMIUM_ARGS

WAIT_MS = 60_000


@pytest.fixture(scope="module")
def url():
    s = Server("--max-pool", "0")
    yield s.url
    assert s.stop() == 0


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.mark.parametrize("path,ready", [
    ("/docs", "() => document.querySelectorAll('.swagger-ui .opblock').length >= 5"),
    ("/redoc", "() => document.body.innerText.includes('/v1/chat/completions')"),
])
def test_docs_render_offline(browser, url, path, ready):
    context = browser.new_context()
    page = context.new_page()
    foreign, errors = [], []
    # The network is off: anything not from the server is refused before it leaves the browser.
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url + "/")
                  else (foreign.append(route.request.url), route.abort()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + path)
    page.wait_for_function(ready, timeout=WAIT_MS)
    text = page.evaluate("() => document.body.innerText")
    assert "/v1/completions" in text and "/generate" in text
    assert foreign == [] and errors == []
    context.close()


def test_assets_are_served_from_the_package_and_nothing_else(url):
    r = httpx.get(url + "/docs/assets/swagger-ui-bundle.js", timeout=30)
    assert r.status_code == 200 and len(r.content) > 100_000
    html = httpx.get(url + "/docs", timeout=30).text
    assert "cdn" not in html.lower() and "/docs/assets/swagger-ui-bundle.js" in html
    assert "Content-Security-Policy" in httpx.get(url + "/redoc", timeout=30).headers
    missing = httpx.get(url + "/docs/assets/core.py", timeout=30)  # a file of the package, not an asset
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(url + "/docs/assets/..%2Fcore.py", timeout=30).status_code == 404


def test_generate_shows_its_two_shapes_with_one_example_each(browser, url):
    """`/generate` takes a text prompt or token ids: ReDoc names both shapes, and both pages offer
    one example of each (never a sample holding both fields)."""
    spec = httpx.get(url + "/openapi.json", timeout=30).json()
    media = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]
    examples = {e["summary"]: e["value"] for e in media["examples"].values()}
    assert set(examples) == {"Text prompt", "Token ids"}
    assert all(("prompt" in v) != ("prompt_token_ids" in v) for v in examples.values())
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(url + "/redoc")
        page.wait_for_function("() => document.body.innerText.includes('Text prompt')", timeout=WAIT_MS)
        text = page.evaluate("() => document.body.innerText")
        assert "Token ids" in text and "GenerateBody | GenerateBody" not in text
        page.goto(url + "/docs")
        page.click("#operations-default-generate_generate_post .opblock-summary", timeout=WAIT_MS)
        page.wait_for_selector("#operations-default-generate_generate_post select", timeout=WAIT_MS)
        options = page.evaluate("() => [...document.querySelectorAll("
                                "'#operations-default-generate_generate_post select option')].map(o => o.textContent)")
        assert "Text prompt" in options and "Token ids" in options
    finally:
        context.close()
