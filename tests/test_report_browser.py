"""The HTML report in a real browser: headless Chromium driven by selenium.

The page must load from file:// with no console error, and its interactive
parts must answer: picking a layer and head and hovering a token colours the
tokens by that head's attention, whose values must equal Hugging Face's
attention probabilities for the same weights (to the page's 1/255 steps).

Skips, saying why, where Chromium, chromedriver or selenium is missing
(Debian: apt-get install chromium chromium-driver; pip install selenium).

Run as a script to refresh the README's screenshot:
    python tests/test_report_browser.py docs/report.png
"""

from __future__ import annotations

import base64
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

TEXT = 'The cat sat on the mat. It was happy, so it purred: "</script> $5!"'
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium", "chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver", "chromedriver")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,900",
)


def _find(candidates: tuple[str, ...]) -> str | None:
    for c in candidates:
        found = shutil.which(c)
        if found:
            return found
    return None


def start_browser(profile: Path):
    """A headless Chromium under selenium, or None (with the reason) when one is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install selenium)"
    chromium, driver = _find(CHROMIUM), _find(CHROMEDRIVER)
    if chromium is None:
        return None, "no Chromium browser (apt-get install chromium)"
    if driver is None:
        return None, "no chromedriver (apt-get install chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    return browser, None


def console_errors(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    browser, reason = start_browser(tmp_path_factory.mktemp("chromium-profile"))
    if browser is None:
        pytest.skip(reason)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def page(hf_checkpoint, gpt2_vocab_dir, tmp_path_factory):
    """(path of the report, its token ids, HF attentions (L, nh, T, T)) for a tiny model."""
    from gpt2.inspect import write_report
    from gpt2.model import GPT2
    from gpt2.tokenizer import Tokenizer

    ckpt = hf_checkpoint(n_layer=2, n_embd=32, n_head=4, n_vocab=50257, n_ctx=48, seed=3, std=0.4)
    tok = Tokenizer.from_pretrained(gpt2_vocab_dir)
    out = tmp_path_factory.mktemp("report") / "report.html"
    data = write_report(GPT2.from_pretrained(ckpt.folder), tok, TEXT, out)
    ids = [t["id"] for t in data["tokens"]]
    with torch.no_grad():
        attentions = ckpt.model(torch.tensor([ids]), output_attentions=True).attentions
    return out, ids, torch.stack([a[0] for a in attentions])


def test_report_loads_without_console_errors(browser, page):
    path, ids, _ = page
    browser.get(path.as_uri())
    assert console_errors(browser) == []
    from selenium.webdriver.common.by import By

    assert len(browser.find_elements(By.CSS_SELECTOR, "#tokens .tok")) == len(ids)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#next tbody tr")) == 10
    assert len(browser.find_elements(By.CSS_SELECTOR, "#lens tr")) == 1 + 3  # header, embed, 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#ablation tr")) == 1 + 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#attn-heads canvas")) == 4
    # the </script> inside the text came through as text, not markup
    assert "</script>" in "".join(
        e.text for e in browser.find_elements(By.CSS_SELECTOR, "#attn-tokens .tok"))


def test_picking_a_head_and_hovering_a_token_shows_its_attention(browser, page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    path, ids, attentions = page
    browser.get(path.as_uri())
    chips = browser.find_elements(By.CSS_SELECTOR, "#attn-tokens .tok")
    T = len(ids)
    assert len(chips) == T

    def weights() -> torch.Tensor:
        return torch.tensor([float(c.get_attribute("data-weight")) for c in chips])

    def hover(q: int) -> None:
        ActionChains(browser).move_to_element(chips[q]).perform()

    seen = []
    for layer, head, q in [(1, 2, T - 1), (0, 3, T // 2), (1, 0, 5)]:
        Select(browser.find_element(By.ID, "layer")).select_by_value(str(layer))
        Select(browser.find_element(By.ID, "head")).select_by_value(str(head))
        hover(q)
        got = weights()
        expected = attentions[layer, head, q].clone()
        assert (got - expected).abs().max() <= 0.5 / 255 + 1e-4, (layer, head, q)
        assert "query" in chips[q].get_attribute("class").split()
        assert chips[0].value_of_css_property("background-color") not in ("", "rgba(0, 0, 0, 0)")
        assert f"Layer {layer}, head {head}" in browser.find_element(By.ID, "attn-readout").text
        seen.append(got)
    assert not torch.allclose(seen[0], seen[2]), "the controls changed nothing"

    # leaving the strip clears the highlight
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    assert weights().abs().max() == 0
    assert not [c for c in chips if "query" in c.get_attribute("class").split()]

    # clicking a small map picks its head
    browser.find_elements(By.CSS_SELECTOR, "#attn-heads figure")[3].click()
    assert Select(browser.find_element(By.ID, "head")).first_selected_option.text == "3"
    selected = browser.find_elements(By.CSS_SELECTOR, "#attn-heads figure.selected")
    assert [f.get_attribute("data-head") for f in selected] == ["3"]
    assert console_errors(browser) == []


def test_hovering_the_map_picks_the_row(browser, page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path, ids, attentions = page
    browser.get(path.as_uri())
    canvas = browser.find_element(By.ID, "attn-map")
    pixels = base64.b64decode(canvas.screenshot_as_base64)
    assert pixels[:8] == b"\x89PNG\r\n\x1a\n"
    # the map's geometry, as the page lays it out: margin 90 px, square cells
    T = len(ids)
    cell = max(2, min(24, 440 // T))
    size = canvas.size
    assert size["width"] == 90 + cell * T + 4
    # offsets count from the centre of the element's visible part: show all of it first
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", canvas)
    q = 3
    x = 90 + cell * 1 + cell // 2 - size["width"] // 2
    y = 90 + cell * q + cell // 2 - size["height"] // 2
    ActionChains(browser).move_to_element_with_offset(canvas, x, y).perform()
    chips = browser.find_elements(By.CSS_SELECTOR, "#attn-tokens .tok")
    assert "query" in chips[q].get_attribute("class").split()
    got = torch.tensor([float(c.get_attribute("data-weight")) for c in chips])
    assert (got - attentions[0, 0, q]).abs().max() <= 0.5 / 255 + 1e-4


# -- the README screenshot ---------------------------------------------------------------------


def screenshot(target: Path) -> None:
    """Render a report of a random 4-layer, 4-head model with GPT-2's vocabulary at 1280x900."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_hf_model
    from gpt2.config import GPT2Config
    from gpt2.inspect import write_report
    from gpt2.model import GPT2
    from gpt2.tokenizer import Tokenizer

    config = GPT2Config(n_vocab=50257, n_ctx=64, n_embd=64, n_head=4, n_layer=4)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        make_hf_model(config, seed=1, std=0.5).save_pretrained(folder)
        text = "The cat sat on the mat. It was warm, so the cat fell asleep."
        model = GPT2.from_pretrained(folder)
        model.source = SimpleNamespace(path="random weights (untrained), GPT-2's vocabulary")
        write_report(model, Tokenizer.from_pretrained(), text, Path(tmp) / "report.html")
        browser, reason = start_browser(Path(tmp) / "profile")
        if browser is None:
            raise SystemExit(reason)
        try:
            from selenium.webdriver.common.action_chains import ActionChains
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import Select

            browser.get((Path(tmp) / "report.html").as_uri())
            Select(browser.find_element(By.ID, "layer")).select_by_value("1")
            chips = browser.find_elements(By.CSS_SELECTOR, "#attn-tokens .tok")
            ActionChains(browser).move_to_element(chips[9]).perform()
            png = base64.b64decode(browser.get_screenshot_as_base64())
        finally:
            browser.quit()
    width, height = struct.unpack(">II", png[16:24])
    target.write_bytes(png)
    print(f"wrote {target} ({width}x{height})")


if __name__ == "__main__":
    screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/report.png"))
