"""The whole path in the real UI: `sam-backend up` (GrabCut engine), Debian's Chromium driven by Playwright.

Log in, open the demo task, Auto-Annotation on, smart keypoint on the orange disc → a brush
suggestion; Alt-click beside it → the backend receives a negative point; smart rectangle → a
suggestion; accept, submit, and the saved annotation holds the brush mask. Selectors follow
../shared/ls-protocol/UI.md (Label Studio 1.23.2). Screenshots land in test-artifacts/ on failure.
"""

from __future__ import annotations

import shutil
import signal
import time

import numpy as np
import pytest
from conftest import ROOT, require_or_skip
from label_studio_sdk.converter.brush import decode_rle
from stack import client_for, start_up

from sam_backend.commands.up import HERO
from sam_backend.labelstudio.client import free_port
from sam_backend.sidecar.store import Store

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
W, H = 800, 600


def hero_mask() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    cx, cy, r = HERO
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


class Stack(tuple):
    """(Label Studio client, credentials, state dir); its repr hides the credentials in failure reports."""

    def __new__(cls, *items):
        return super().__new__(cls, items)

    def __repr__(self) -> str:
        return f"Stack({self[0].url}, credentials hidden, {self[2]})"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not shutil.which("chromium") and not shutil.which("/usr/bin/chromium"):
        require_or_skip("Debian's chromium is not installed (make test installs it with apt as root)")
    state = tmp_path_factory.mktemp("up")
    ls_port, port = free_port(), free_port()
    proc, _ = start_up(state, ls_port, port)
    ls, creds = client_for(state, ls_port)
    yield Stack(ls, creds, state)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


@pytest.fixture()
def page(stack):
    from playwright.sync_api import sync_playwright

    ls, creds, _ = stack
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.add_init_script("window.localStorage.setItem('autoAnnotation', 'true');"
                                "window.localStorage.setItem('autoAcceptSuggestions', 'false');")
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(ls.url + "/user/login/")
        page.fill("input[name=email]", creds["email"])
        page.fill("input[name=password]", creds["password"])
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        yield page
        browser.close()


def pick_smart_tool(page, tool: str, label_hotkey: str) -> None:
    """Hover Auto-Detect, pick `tool` from its flyout, then the label (the order matters, see UI.md)."""
    page.hover("button.lsf-tool_smart:not([aria-label])")
    page.click(f'.lsf-tool__extra button[aria-label="{tool}"]')
    page.mouse.move(5, 5)
    page.keyboard.press(label_hotkey)


def ensure_label(page, index: int, hotkey: str) -> None:
    """The label is deselected after each new point: select it again only if needed (the hotkey toggles)."""
    selected = page.evaluate(f"document.querySelectorAll('.lsf-label')[{index}].className.includes('selected')")
    if not selected:
        page.keyboard.press(hotkey)


def wait_suggestion(page, response) -> dict:
    assert response.status == 200, response.text()
    body = response.json()
    assert "errors" not in body, body
    page.wait_for_function("!window.Htx.awaitingSuggestions")
    page.wait_for_selector('[data-testid="bottombar-accept-suggestions-button"]', state="visible")
    return body["data"]


def test_click_negative_click_rectangle_submit(stack, page):
    ls, _, state = stack
    project = next(p["id"] for p in ls.projects() if p["title"] == "sam-backend demo")
    task = next(t for t in ls.tasks(project) if t["data"]["image"].endswith("sample-1.png"))
    try:
        page.goto(f"{ls.url}/projects/{project}/data?task={task['id']}")
        page.wait_for_selector("canvas")
        page.wait_for_function("window.Htx?.annotationStore?.selected && window.ToolManager?.allInstances().length")
        assert page.locator('[data-testid="bottombar-auto-annotation-toggle"]').count() == 1
        box = page.locator("canvas").first.bounding_box()

        def screen(x: float, y: float) -> tuple[float, float]:
            return box["x"] + x / W * box["width"], box["y"] + y / H * box["height"]

        # 1. Smart keypoint on the disc. Labels: brush 1-2, keypoint 3-4, rectangle 5-6 (config order).
        pick_smart_tool(page, "key-point-tool", "3")
        assert page.evaluate("window.ToolManager.allInstances()[0].findSelectedTool().fullName") == \
            "KeyPointTool-dynamic"
        cx, cy, r = HERO
        with page.expect_response(lambda resp: "interactive-annotating" in resp.url) as info:
            page.mouse.click(*screen(cx, cy))
        first = wait_suggestion(page, info.value)
        [region] = first["result"]
        mask = decode_rle(region["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0
        truth = hero_mask()
        assert (mask & truth).sum() / (mask | truth).sum() >= 0.8

        # 2. Alt-click beside the disc: a negative point for the same object.
        ensure_label(page, 2, "3")
        with page.expect_response(lambda resp: "interactive-annotating" in resp.url) as info:
            page.keyboard.down("Alt")
            page.mouse.click(*screen(cx + r + 60, cy))
            page.keyboard.up("Alt")
        wait_suggestion(page, info.value)
        # The sidecar writes off the request path: wait (with a deadline) for the Alt-click's row.
        store, deadline = Store(state / "annotations.db"), time.monotonic() + 30
        while len(rows := store.history(task=task["id"])) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(rows) == 2 and [p[2] for p in rows[-1]["prompt"]["points"]] == [1, 0]
        page.click('[data-testid="bottombar-accept-suggestions-button"]')

        # 3. Smart rectangle around the disc.
        pick_smart_tool(page, "rectangle-tool", "5")
        with page.expect_response(lambda resp: "interactive-annotating" in resp.url) as info:
            page.mouse.move(*screen(cx - r - 15, cy - r - 15))
            page.mouse.down()
            for step in range(1, 6):
                page.mouse.move(*screen(cx - r - 15 + step * (2 * r + 30) / 5, cy - r - 15 + step * (2 * r + 30) / 5))
            page.mouse.up()
        rect = wait_suggestion(page, info.value)
        assert rect["result"] and rect["result"][0]["type"] == "brushlabels"
        page.click('[data-testid="bottombar-accept-suggestions-button"]')

        # 4. Submit; the saved annotation holds the brush masks.
        with page.expect_response(lambda resp: f"/api/tasks/{task['id']}/annotations" in resp.url
                                  and resp.request.method == "POST") as info:
            page.click('[data-testid="bottombar-submit-button"]')
        assert info.value.status == 201
        [annotation] = ls.task(task["id"])["annotations"]
        brushes = [r for r in annotation["result"] if r["type"] == "brushlabels"]
        assert brushes and all(r["value"]["brushlabels"] == ["Object"] for r in brushes)
        saved = decode_rle(brushes[0]["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0
        assert (saved & truth).sum() / (saved | truth).sum() >= 0.8
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-failure.png"))
        raise
