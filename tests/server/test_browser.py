"""The web UI in a real browser: Debian's chromium driven by Playwright."""

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
def test_upload_prompt_segment_and_click_a_region(live_server, segmenter, scene, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(chromium).exists(), "install Debian's chromium (scripts/test.sh does, as root)"
    image_path = tmp_path / "scene.png"
    Image.fromarray(np.repeat(np.repeat(scene, 3, axis=0), 3, axis=1)).save(image_path)  # 390x270
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(live_server)
        page.wait_for_selector("#segment")
        page.set_input_files("#input-image input[type=file]", str(image_path))
        # The upload is asynchronous: "Segment" clicked before the preview shows can run on no image
        # (one CI run waited 120 s for masks that never came).
        page.wait_for_selector("#input-image img", timeout=60_000)
        page.fill("#prompts textarea", "red square, blue square")
        page.fill("#threshold input[type=number]", "0")
        page.press("#threshold input[type=number]", "Enter")
        page.click("#segment")
        page.wait_for_selector("#result img.mask", timeout=120_000)
        page.wait_for_function("document.querySelector('#clicked').innerText.includes('found')")
        assert "used **fp32**".replace("**", "") in page.inner_text("#status")

        # The pixel deepest inside the first instance the server found (the same model, run here
        # directly): a click a pixel off, from the page's scaling, still lands in it.
        first = segmenter.segment(str(image_path), "red square, blue square", threshold=0.0).instances[0].mask
        depth = cv2.distanceTransform(np.pad(first, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        base = page.locator("#result img.base-image").bounding_box()
        page.mouse.click(base["x"] + base["width"] * (x + 0.5) / first.shape[1], base["y"] + base["height"] * (y + 0.5) / first.shape[0])
        page.wait_for_function("/score \\d\\.\\d\\d/.test(document.querySelector('#clicked').innerText)", timeout=30_000)
        described = page.inner_text("#clicked")
        assert "square" in described and "score" in described
        shot = Path(os.environ.get("SAM3_SCREENSHOT_DIR", tmp_path)) / "ui-after-click.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        browser.close()
