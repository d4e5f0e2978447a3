"""/playground in a real browser: Debian's chromium + chromedriver (headless) driven by selenium against a
live `ovi-server serve --variant tiny` on loopback (real pipeline, random weights, CPU).

Text-to-video with progress, previews and a playable result; a server-side validation error beside its
field; image-to-video through the storage upload (file picker and drag and drop); cancel. Every page must
load nothing from another origin and log no console errors. The screenshot of the finished text-to-video
run is saved to a temporary directory (its path is printed; `pytest -s` shows it): the README's
docs/playground.png is that picture.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients.live import KEY, LiveServer, start_server, write_png

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("playground"), "--previews", "1")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--no-first-run", "--disable-domain-reliability",
        "--disable-client-side-phishing-detection", "--metrics-recording-only", "--mute-audio",
        "--window-size=1280,1400", "--autoplay-policy=no-user-gesture-required",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(what: Callable[[], Any], timeout: float = 60, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, message or "condition not met in time"
        time.sleep(0.05)


def console_errors(driver: Any, allowed: tuple[str, ...] = ()) -> list[str]:
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and not any(a in entry["message"] for a in allowed)
    ]


def foreign_resources(driver: Any, origin: str) -> list[str]:
    """Every URL the page loaded, or that an element loads from, not of this origin (blob:/data: are local).
    Plain links (<a href>) load nothing and may point anywhere (ReDoc credits Redocly)."""
    urls = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".concat([...document.querySelectorAll('[src], link[href]')].map(e => e.src || e.href))"
    )
    return [u for u in urls if u and not u.startswith((origin + "/", "blob:" + origin + "/", "data:"))]


def open_playground(driver: Any, server: LiveServer) -> None:
    driver.get(f"{server.base}/playground")
    wait_for(
        lambda: driver.execute_script("return document.body.dataset.ready === '1'"), 20, "page not ready"
    )


def field(driver: Any, name: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, f"f-{name}")


def set_field(driver: Any, name: str, value: str) -> None:
    element = field(driver, name)
    element.clear()
    element.send_keys(value)


def run_state(driver: Any) -> str | None:
    return driver.execute_script("return document.body.dataset.run || null")


def click(driver: Any, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, element_id).click()


def test_text_to_video_with_progress_previews_and_result(browser: Any, server: LiveServer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_playground(browser, server)
    key = browser.find_element(By.ID, "key")
    assert key.is_displayed()  # the server has keys: the page asks for one
    key.send_keys(KEY)
    # the form comes from /openapi.json, with fal's field names
    names = browser.execute_script("return [...document.querySelectorAll('#fields [name]')].map(e => e.name)")
    assert names == [
        "prompt",
        "negative_prompt",
        "audio_negative_prompt",
        "num_inference_steps",
        "seed",
        "resolution",
    ]
    resolution = Select(field(browser, "resolution"))
    assert resolution.first_selected_option.text == "992x512" and len(resolution.options) == 7
    prompt = field(browser, "prompt")
    prompt.send_keys("A cat on a sofa says ")
    click(browser, "insert-speech")
    prompt.send_keys("hello there")
    click(browser, "insert-audio")
    prompt.send_keys("purring")
    assert prompt.get_attribute("value") == "A cat on a sofa says <S>hello there<E> Audio: purring"
    set_field(browser, "num_inference_steps", "3")
    set_field(browser, "seed", "7")
    resolution.select_by_visible_text("720x720")
    assert browser.find_element(By.ID, "submit").get_attribute("type") == "submit"
    click(browser, "submit")

    wait_for(lambda: run_state(browser) == "ok", 90, "the request did not finish")
    assert browser.find_element(By.ID, "progress-text").text == "step 3/3"
    assert browser.execute_script("return document.getElementById('progress').value") == 3
    preview = browser.find_element(By.ID, "preview")
    assert preview.get_attribute("src").startswith("blob:")
    assert browser.execute_script("return arguments[0].naturalWidth", preview) == 256
    assert int(preview.get_attribute("data-step")) >= 1
    logs = browser.find_element(By.ID, "logs").text
    assert "denoise 3/3" in logs and "preview 1/3" in logs
    video = browser.find_element(By.ID, "video")
    metadata = wait_for(
        lambda: browser.execute_script(
            "const v = arguments[0]; return v.readyState >= 1 && [v.videoWidth, v.videoHeight, v.duration]",
            video,
        ),
        20,
        "the video did not load its metadata",
    )
    width, height, duration = metadata
    assert width == height > 0 and abs(duration - 9 / 24) < 0.05  # 720x720 on tiny: square, 9 frames
    assert browser.find_element(By.ID, "seed").text == "7"
    assert browser.find_element(By.ID, "elapsed").text.endswith(" s")
    assert browser.find_element(By.ID, "download").get_attribute("href") == video.get_attribute("src")
    request_id = browser.find_element(By.ID, "request-id").text
    curl = browser.find_element(By.ID, "snippet-curl").get_attribute("textContent")
    assert "ID=$(curl" in curl and '"num_inference_steps":3' in curl and '"seed":7' in curl
    js = browser.find_element(By.ID, "snippet-js").get_attribute("textContent")
    assert 'import { fal } from "@fal-ai/client";' in js and f"{server.base}/api/fal/proxy" in js
    python = browser.find_element(By.ID, "snippet-python").get_attribute("textContent")
    assert "fal_client.subscribe(" in python and '"seed": 7' in python and f":{server.tls_port}" in python
    assert browser.find_element(By.CSS_SELECTOR, f"#history li[data-id='{request_id}']")
    assert console_errors(browser) == []
    assert foreign_resources(browser, server.base) == []

    wait_for(
        lambda: browser.execute_script("return arguments[0].readyState >= 2", video), 20, "no first frame"
    )
    browser.execute_script("window.scrollTo(0, 0)")
    # let the media controls paint their loaded state (two animation frames) before the picture
    browser.execute_async_script(
        "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(done))"
    )
    shots = Path(tempfile.mkdtemp(prefix="ovi-playground-"))
    browser.save_screenshot(str(shots / "playground.png"))
    print(f"\nplayground screenshot: {shots / 'playground.png'}")

    # the key and the history survive a reload (localStorage)
    open_playground(browser, server)
    assert browser.find_element(By.ID, "key").get_attribute("value") == KEY
    assert browser.find_element(By.CSS_SELECTOR, f"#history li[data-id='{request_id}']")


def test_validation_error_is_shown_beside_its_field(browser: Any, server: LiveServer):
    from selenium.webdriver.common.by import By

    open_playground(browser, server)
    field(browser, "prompt").send_keys("A dog barks")
    set_field(browser, "num_inference_steps", "500")
    click(browser, "submit")
    wait_for(lambda: run_state(browser) == "invalid input", 30)
    error = browser.find_element(By.ID, "error-num_inference_steps")
    assert "50" in error.text and error.is_displayed()
    assert "invalid" in browser.find_element(By.ID, "field-num_inference_steps").get_attribute("class")
    # the one console line is the browser's note of the 422 result
    assert console_errors(browser, allowed=("status of 422",)) == []


def test_image_to_video_through_the_upload_and_drag_and_drop(
    browser: Any, server: LiveServer, tmp_path: Path
):
    from selenium.webdriver.common.by import By

    open_playground(browser, server)
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=i2v]").click()
    image_url = field(browser, "image_url")
    # drag and drop: a PNG dropped on the drop zone goes up through the storage API
    png = write_png(tmp_path / "dropped.png", 48, 64)
    browser.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
        "const data = new DataTransfer(); data.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
        "document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));",
        base64.b64encode(png.read_bytes()).decode(),
    )
    dropped = wait_for(lambda: image_url.get_attribute("value"), 20, "the dropped image was not uploaded")
    assert dropped.startswith(f"{server.base}/files/uploads/") and dropped.endswith("dropped.png")
    # the file picker: a landscape image, which the video then follows
    browser.find_element(By.ID, "image-file").send_keys(str(write_png(tmp_path / "frame.png", 96, 48)))
    uploaded = wait_for(
        lambda: image_url.get_attribute("value").endswith("frame.png") and image_url.get_attribute("value"),
        20,
    )
    assert uploaded.startswith(f"{server.base}/files/uploads/")
    field(browser, "prompt").send_keys("She waves")
    set_field(browser, "num_inference_steps", "2")
    click(browser, "submit")
    wait_for(lambda: run_state(browser) == "ok", 90, "the image-to-video request did not finish")
    width, height = wait_for(
        lambda: browser.execute_script(
            "const v = document.getElementById('video'); return v.readyState >= 1 && [v.videoWidth, v.videoHeight]"
        ),
        20,
    )
    assert width > height  # the video takes the image's aspect
    assert console_errors(browser) == []
    assert foreign_resources(browser, server.base) == []


def test_cancel_stops_a_running_request(browser: Any, server: LiveServer):
    from selenium.webdriver.common.by import By

    open_playground(browser, server)
    field(browser, "prompt").send_keys("A long one")
    set_field(browser, "num_inference_steps", "50")
    click(browser, "submit")
    wait_for(lambda: browser.find_element(By.ID, "progress-text").text.startswith("step "), 60, "no progress")
    click(browser, "cancel")
    wait_for(lambda: run_state(browser) == "cancelled", 60, "the request was not cancelled")
    assert browser.find_element(By.ID, "run-status").text == "Cancelled"
    assert "step 50/50" != browser.find_element(By.ID, "progress-text").text
    assert console_errors(browser) == []


@pytest.mark.parametrize(
    ("path", "rendered"), [("/docs", ".swagger-ui .opblock"), ("/redoc", ".redoc-wrap h1")]
)
def test_api_docs_render_offline_from_local_assets(
    browser: Any, server: LiveServer, path: str, rendered: str
):
    from selenium.webdriver.common.by import By

    browser.get(f"{server.base}{path}")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, rendered), 30, f"{path} did not render")
    assert "fal-ai/ovi" in browser.find_element(By.TAG_NAME, "body").text
    assert foreign_resources(browser, server.base) == []
    assert console_errors(browser) == []
