"""The web app in a real browser: Debian's Chromium driven through chromium-driver with
Selenium, as a person uses the page: upload an image, paint a stroke on the editor's
canvas, type a prompt, move the precision slider, Run, and read the result.

Chromium comes from `tests/setup_browser.sh` (run by `make test`); where it could not be
installed the test skips and says how. `SMARTBRUSH_APP_SCREENSHOT=docs/app.png` also saves
the screenshot the README shows."""

import io
import os
import shutil
import time
import urllib.request

import numpy as np
import pytest
from app_fixtures import serve
from PIL import Image

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium / chromedriver: run "
                                "`bash tests/setup_browser.sh` (or apt-get install chromium chromium-driver)")
webdriver = pytest.importorskip("selenium.webdriver")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _scene(path):
    from smartbrush_jax.data.synthetic import render_scene

    img = render_scene(np.random.default_rng(3), 128)[0][:96]  # 128 x 96, shapes on a background
    Image.fromarray(img).save(path)
    return img


def _fetch(url) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def test_paint_a_region_and_run_in_chromium(sd_folder, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    img = _scene(tmp_path / "scene.png")
    with serve(sd_folder[0], steps=4) as (url, spy):
        d = browser
        d.get(url)
        WebDriverWait(d, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#editor input[type=file]"))
        editor = d.find_element(By.ID, "editor")
        editor.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(tmp_path / "scene.png"))
        WebDriverWait(d, 30).until(lambda d: editor.find_elements(By.CSS_SELECTOR, "button[aria-label=Brush]"))
        time.sleep(1)  # the editor draws the upload on its canvas
        editor.find_element(By.CSS_SELECTOR, "button[aria-label=Brush]").click()
        canvas = editor.find_elements(By.CSS_SELECTOR, "canvas")[-1]
        stroke = ActionChains(d).move_to_element_with_offset(canvas, -60, -40).click_and_hold()
        for _ in range(12):  # a diagonal stroke through the middle of the image
            stroke.move_by_offset(10, 7)
        stroke.release().perform()
        d.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("a green circle")
        level = d.find_element(By.CSS_SELECTOR, "#precision input[type=number]")
        level.send_keys(Keys.CONTROL, "a")
        level.send_keys("3", Keys.TAB)
        d.find_element(By.ID, "run").click()
        WebDriverWait(d, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results img")
                                    and d.find_elements(By.CSS_SELECTOR, "#predicted img"))
        time.sleep(0.5)
        shot = tmp_path / "app.png"
        d.save_screenshot(str(shot))
        if os.environ.get("SMARTBRUSH_APP_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["SMARTBRUSH_APP_SCREENSHOT"])
        result = _fetch(d.find_element(By.CSS_SELECTOR, "#results img").get_attribute("src"))
        predicted = d.find_element(By.CSS_SELECTOR, "#predicted img")
        assert d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", predicted) == 128

    assert len(spy.calls) == 1
    sent, mask = spy.calls[0]
    np.testing.assert_array_equal(sent, img)  # the upload reached the model unchanged
    # the stroke (a thick diagonal band through the middle) is the region
    assert 0.1 < mask.mean() < 0.7 and mask[48, 64] and not mask[0, 0] and not mask[95, 127]
    assert result.shape == img.shape
    np.testing.assert_array_equal(result[~mask], img[~mask])  # every pixel outside the stroke is the input's
    assert (result[mask] != img[mask]).any(axis=-1).mean() > 0.5
    assert (Image.open(shot).size[0]) > 1000
