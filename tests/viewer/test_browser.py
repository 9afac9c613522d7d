"""The web viewer in real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium) against the real server process: upload, predictions, the overlay's pixels, compare
mode, the opacity slider, a per-site view, hover and an error. Each state's screenshot is saved
under test-artifacts/viewer/ (not committed)."""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import EXAMPLES, ROOT, ZOO_MODELS, running_server
from PIL import Image

from service.overlay import lut

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "test-artifacts" / "viewer"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 60

if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "Chromium not found (need Debian's chromium and chromium-driver: "
        "apt-get install chromium chromium-driver; `make test` installs them when root)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium at a laptop's window size; the driver and browser are given by path,
    so selenium never looks for (or downloads) another."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT_S)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any, zoo_server: str) -> Any:
    """The viewer, freshly loaded, with its model list in."""
    browser.get(f"{zoo_server}/")
    WebDriverWait(browser, WAIT_S).until(lambda d: body(d).get_attribute("data-ready") == "true")
    return browser


def body(driver: Any) -> Any:
    return driver.find_element(By.TAG_NAME, "body")


def after_request(driver: Any, action: Callable[[], None]) -> None:
    """Do `action` and wait until the page has finished the request it starts."""
    before = int(body(driver).get_attribute("data-finished") or 0)
    action()
    WebDriverWait(driver, WAIT_S).until(
        lambda d: int(body(d).get_attribute("data-finished") or 0) > before
    )


def pick_example(driver: Any, name: str = "digit-7.png") -> None:
    button = driver.find_element(By.CSS_SELECTOR, f'.example[data-src$="{name}"]')
    after_request(driver, button.click)


def canvas_pixels(driver: Any, element_id: str = "overlay") -> np.ndarray:
    """The canvas's pixels (H, W, 3), read back through a PNG data URL."""
    url = driver.execute_script(f"return document.getElementById('{element_id}').toDataURL()")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def screenshot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_example_digit_gives_the_apis_top_label(page: Any, zoo_server: str) -> None:
    pick_example(page)
    labels = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#predictions .label")]
    model = Select(page.find_element(By.ID, "model")).first_selected_option.get_attribute("value")
    answer = httpx.post(
        f"{zoo_server}/v1/models/{model}/predict",
        files={"image": (EXAMPLES / "digit-7.png").read_bytes()},
        timeout=WAIT_S,
    ).json()
    assert labels[0] == answer["results"][0]["predictions"][0]["label"] == "7"
    assert len(labels) == 5
    sites = page.find_elements(By.CSS_SELECTOR, "#sites .site")
    assert len(sites) >= 2  # the summary and at least one block's own map
    gates = page.find_elements(By.CSS_SELECTOR, "#gates canvas")
    assert gates, "maps=all carries CBAM's channel gates"
    screenshot(page, "example-digit")


def test_overlay_is_hottest_inside_the_digits_box(
    page: Any, digit_box: tuple[int, int, int, int]
) -> None:
    pick_example(page)
    page.find_element(By.ID, "opacity").send_keys(Keys.END)  # opacity 100 %: the map alone
    pixels = canvas_pixels(page)[::4, ::4].astype(np.int32)  # every 4th pixel is plenty
    table = lut("viridis").astype(np.int32)
    distance = ((pixels[:, :, None, :] - table[None, None]) ** 2).sum(-1)
    index = distance.argmin(-1)  # each pixel's place on the colour scale
    rows, cols = np.nonzero(index >= index.max() - 2)
    scale = index.shape[1] / 64  # the example is 64x64
    x, y = cols.mean() / scale, rows.mean() / scale
    x0, y0, x1, y1 = digit_box
    assert distance.min(-1).max() < 300, "at opacity 1 every pixel is a colour of the scale"
    assert x0 <= x < x1 and y0 <= y < y1, (x, y, digit_box)
    screenshot(page, "overlay-opacity-100")


def test_opacity_slider_changes_the_canvas(page: Any) -> None:
    pick_example(page)
    slider = page.find_element(By.ID, "opacity")
    slider.send_keys(Keys.HOME)
    plain = canvas_pixels(page)
    assert page.find_element(By.ID, "opacity-value").text == "0 %"
    # Opacity 0 shows the grey digit canvas itself: every pixel grey.
    assert (plain.max(-1) == plain.min(-1)).all()
    slider.send_keys(Keys.END)
    coloured = canvas_pixels(page)
    assert (coloured.max(-1) != coloured.min(-1)).mean() > 0.9
    screenshot(page, "opacity-0-and-100")


def test_compare_shows_one_panel_per_hosted_model(page: Any) -> None:
    pick_example(page)
    model = Select(page.find_element(By.ID, "model"))
    after_request(page, lambda: model.select_by_value("__compare__"))
    panels = page.find_elements(By.CSS_SELECTOR, "#panels .panel")
    assert sorted(p.get_attribute("data-model") for p in panels) == sorted(ZOO_MODELS)
    assert all(p.find_element(By.CSS_SELECTOR, ".top").text.startswith("7:") for p in panels)
    assert not page.find_element(By.ID, "compare").get_attribute("hidden")
    assert page.find_element(By.ID, "single").get_attribute("hidden")
    screenshot(page, "compare")


def test_a_site_shows_large_and_hover_reads_its_value(page: Any) -> None:
    pick_example(page)
    summary = canvas_pixels(page)
    site = page.find_elements(By.CSS_SELECTOR, "#sites .site")[1]
    site.click()
    assert site.get_attribute("aria-pressed") == "true"
    title = page.find_element(By.ID, "map-title").text
    assert "cbam" in title and "spatial" in title
    assert not np.array_equal(canvas_pixels(page), summary)
    webdriver.ActionChains(page).move_to_element(page.find_element(By.ID, "overlay")).perform()
    assert page.find_element(By.ID, "hover").text.startswith("value ")
    screenshot(page, "site-large")


def test_a_text_file_shows_the_400_message(page: Any, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    after_request(page, lambda: page.find_element(By.ID, "file").send_keys(str(text)))
    error = page.find_element(By.ID, "error")
    assert error.is_displayed()
    assert "could not read this file as an image" in error.text
    assert "400 invalid_image" in error.text
    assert page.find_element(By.ID, "single").get_attribute("hidden")
    screenshot(page, "error-400")


@pytest.fixture(scope="module")
def keyed_server(
    zoo_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A server that needs an API key: (its URL, the key)."""
    key = "viewer-test-key-1234567890"
    folder = tmp_path_factory.mktemp("keyed")
    (folder / "keys").write_text(hashlib.sha256(key.encode()).hexdigest() + " infer\n")
    settings = zoo_env | {
        "ATTNSERVE_API_KEYS_FILE": str(folder / "keys"),
        "ATTNSERVE_MODELS": "digits-cbam",
        "ATTNSERVE_GRPC_PORT": "0",
    }
    with running_server(settings, folder) as url:
        yield url, key


def test_viewer_asks_for_the_key_when_the_server_needs_one(
    browser: Any, keyed_server: tuple[str, str]
) -> None:
    url, key = keyed_server
    browser.get(f"{url}/")
    WebDriverWait(browser, WAIT_S).until(lambda d: body(d).get_attribute("data-ready") == "true")
    form = browser.find_element(By.ID, "key-form")
    assert form.is_displayed()
    assert "API key" in browser.find_element(By.ID, "error").text
    field = browser.find_element(By.ID, "api-key")
    field.send_keys("wrong-key")
    field.send_keys(Keys.ENTER)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
    field = browser.find_element(By.ID, "api-key")
    field.send_keys(key)
    field.send_keys(Keys.ENTER)
    WebDriverWait(browser, WAIT_S).until(
        lambda d: "digits-cbam" in d.find_element(By.ID, "models").text
    )
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "key-accepted.png"))
