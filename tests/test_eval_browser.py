"""The evaluator's pages in a real browser: Debian's chromium driven by playwright, against a real proxy.

Playwright is pointed at the system chromium (/usr/bin/chromium, or ABPROXY_CHROMIUM) and never
downloads a browser. A missing chromium fails these tests, with the command that installs it.

ABPROXY_SCREENSHOTS=1 writes the comparison page's screenshots to docs/screenshots/ (the README
shows them); otherwise they go to the test's tmp dir, so a test run leaves the work tree clean.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.eval_site import PAIRS, Study, new_study, prepared_store, proxy_with_store, votes_of
from tests.harness import MockUpstream, ProxyServer, RedisServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path(os.environ.get("ABPROXY_CHROMIUM", "/usr/bin/chromium"))
# Headless in a container: no sandbox (root, no user namespaces), no GPU, and nothing that phones home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
TASK_URL = re.compile(r"/eval/s/[^/]+/t/t_[0-9a-f]+$")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"chromium is not installed at {CHROMIUM}: apt-get install -y chromium (scripts/test does it "
                    "as root), or point ABPROXY_CHROMIUM at a Chromium binary", pytrace=False)  # fmt: skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: .venv/bin/pip install -e '.[test]'", pytrace=False)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return prepared_store(tmp_path_factory.mktemp("browser-store"))


@pytest.fixture(scope="module")
def server(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, store: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyServer]:  # fmt: skip
    with proxy_with_store(upstreams, redis_server.url, tmp_path_factory.mktemp("browser-proxy"), store) as proxy:
        yield proxy


@pytest.fixture()
def study(store: str) -> Study:
    return new_study(store, f"browser-{uuid.uuid4().hex[:8]}", ("ann",), per_evaluator=5)


def open_link(browser: Browser, server: ProxyServer, study: Study, **context: object) -> Page:
    page = browser.new_context(**context).new_page()  # type: ignore[arg-type]
    page.goto(f"{server.url}/eval/s/{study.links['ann']}")
    assert TASK_URL.search(page.url), page.url
    return page


def next_page(page: Page, act: object) -> str:
    """Run `act` (a click or a key press) and return the URL of the page it leads to."""
    with page.expect_navigation():
        act()  # type: ignore[operator]
    return page.url


def test_vote_by_mouse_and_keys_reload_resume_undo(
    browser: Browser, server: ProxyServer, study: Study, store: str
) -> None:
    """Mouse and keyboard votes land in the store; a reload resumes; undo reopens the last task."""
    page = open_link(browser, server, study)
    first = page.url
    assert page.get_by_text("0 of 5 done").is_visible()

    # The mouse: the rubric, a reason, then the verdict button.
    page.get_by_role("group", name="Accuracy").get_by_label("B better").check()
    voice = page.get_by_role("group", name="Company voice")
    voice.get_by_role("group", name="Response A").get_by_label("4", exact=True).check()
    voice.get_by_role("group", name="Response B").get_by_label("2", exact=True).check()
    page.get_by_label("Why?").fill("B names a next step.")
    second = next_page(page, lambda: page.get_by_role("button", name="B is better").click())
    assert second != first and page.get_by_text("1 of 5 done").is_visible()

    # Keys typed into the reason are text, not shortcuts; Enter with nothing chosen asks for a choice.
    page.get_by_label("Why?").press_sequentially("13")
    assert page.locator("button.chosen").count() == 0
    page.get_by_label("Why?").fill("")
    page.locator("h1").click()
    page.keyboard.press("Enter")
    assert page.get_by_text("Choose first").is_visible() and page.url == second

    # The keyboard: 1 chooses A, Enter submits; then 2 (tie).
    page.keyboard.press("1")
    assert page.get_by_role("button", name="A is better").get_attribute("class") == "choice chosen"
    third = next_page(page, lambda: page.keyboard.press("Enter"))
    page.keyboard.press("2")
    fourth = next_page(page, lambda: page.keyboard.press("Enter"))
    assert len({first, second, third, fourth}) == 4

    # A reload, and the link opened afresh, both resume at the first task without a vote.
    page.reload()
    assert page.url == fourth and page.get_by_text("3 of 5 done").is_visible()
    again = open_link(browser, server, study)
    assert again.url == fourth
    again.context.close()

    # Undo reopens the third task (the tie); vote it again with 3 (B).
    assert next_page(page, lambda: page.get_by_role("button", name="Undo last vote").click()) == third
    assert page.get_by_text("2 of 5 done").is_visible()
    assert next_page(page, lambda: (page.keyboard.press("3"), page.keyboard.press("Enter"))) == fourth

    stored = votes_of(store, study.name)
    assert [v.choice for v in stored] == ["B", "A", "B"]
    assert dict(stored[0].rubric) == {"accuracy": "B", "company_voice.A": 4, "company_voice.B": 2}
    assert all(v.time_taken_ms is not None and v.time_taken_ms >= 0 for v in stored)
    page.goto(second)
    assert page.get_by_text("You voted A is better on this pair.").is_visible()
    page.context.close()


def test_works_without_javascript(browser: Browser, server: ProxyServer, study: Study, store: str) -> None:
    """With scripts off the buttons still vote, and Enter in a rubric radio asks for a choice, casting nothing."""
    page = open_link(browser, server, study, java_script_enabled=False)
    first = page.url
    accuracy = page.get_by_role("group", name="Accuracy")
    accuracy.get_by_label("Tie").check()
    next_page(page, lambda: page.keyboard.press("Enter"))  # submits by the form's first button: no choice
    assert page.get_by_role("alert").inner_text() == "Choose one: A is better, Tie, or B is better."
    assert accuracy.get_by_label("Tie").is_checked() and votes_of(store, study.name) == []
    next_page(page, lambda: page.get_by_role("button", name="Tie").click())
    assert page.url != first
    assert [(v.choice, dict(v.rubric)) for v in votes_of(store, study.name)] == [("tie", {"accuracy": "tie"})]
    page.context.close()


def test_layout_and_screenshots(browser: Browser, server: ProxyServer, store: str, tmp_path: Path) -> None:
    """Side by side on a desktop, stacked without sideways scrolling on a phone; screenshots of both."""
    out = SCREENSHOTS if os.environ.get("ABPROXY_SCREENSHOTS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    study = new_study(store, f"shots-{uuid.uuid4().hex[:8]}", ("ann",), per_evaluator=len(PAIRS))
    page = open_link(browser, server, study, viewport={"width": 1280, "height": 900})
    # The README shows the pricing conversation: skip to it (its place in ann's list is random).
    for _ in PAIRS:
        if page.get_by_text("20% too high").count():
            break
        next_page(page, lambda: page.get_by_role("button", name="Tie").click())
    task = page.url
    a, b = (page.locator(".answer").nth(i).bounding_box() for i in (0, 1))
    assert a and b and a["y"] == b["y"] and b["x"] > a["x"] + a["width"]
    page.screenshot(path=str(out / "eval-comparison.png"), full_page=True)
    page.context.close()

    phone = browser.new_context(viewport={"width": 375, "height": 812}, device_scale_factor=2, is_mobile=True,
                                has_touch=True).new_page()  # fmt: skip
    phone.goto(task)
    a, b = (phone.locator(".answer").nth(i).bounding_box() for i in (0, 1))
    assert a and b and b["y"] >= a["y"] + a["height"]
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    phone.screenshot(path=str(out / "eval-comparison-phone.png"), full_page=True)
    phone.context.close()
    assert (out / "eval-comparison.png").stat().st_size > 10_000
