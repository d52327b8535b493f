"""The clinician page in headless Chromium (Debian's chromium + chromium-driver; nothing is downloaded).

Upload a lesion image, wait for the chain's answer, and check that the predicted diagnosis and
attributes, the similar lesions' thumbnails and the generated references are on the page.
"""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


@pytest.fixture
def browser(tmp_path):
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _loaded_images(driver, selector: str) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0).length", selector
    )


def test_upload_shows_attributes_similar_lesions_and_references(browser, served_app, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lesion = pq.read_table(served_app.root / "lesions", columns=["lesion_id", "image_bytes"]).slice(3, 1).to_pylist()[0]
    image = tmp_path / "lesion.jpg"
    image.write_bytes(lesion["image_bytes"])

    browser.get(served_app.url + "/")
    browser.find_element(By.ID, "api-key").send_keys(served_app.api_key)
    for field, value in (("k", "5"), ("count", "2")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "file").send_keys(str(image))
    browser.find_element(By.ID, "analyse").click()
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "4", "5")))
    status = browser.find_element(By.ID, "status")
    assert status.text.startswith("done"), status.text

    wait.until(
        lambda d: (
            _loaded_images(d, "#similar img.similar-thumb") == 5 and _loaded_images(d, "#generated img.generated-image") == 2
        )
    )
    attributes = {
        row.find_elements(By.TAG_NAME, "td")[0].text for row in browser.find_elements(By.CSS_SELECTOR, "#attributes tr.attribute")
    }
    assert attributes == {"area_mm2", "eccentricity", "color_std_mean"}
    assert "p = " in browser.find_element(By.ID, "diagnosis").text
    captions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#similar figure")]
    assert lesion["lesion_id"] in captions[0]  # the uploaded gallery image is its own nearest case
    # The references are drawn from the uploaded lesion by default (the page's "references from" choice).
    assert "adapter" in browser.find_element(By.ID, "reference-caption").text
    assert "drawn from this lesion" in browser.find_element(By.ID, "reference-caption").text
    assert "IP-Adapter scale 0.5" in browser.find_element(By.ID, "reference-caption").text  # serve_artifacts' setting
    shot = tmp_path / "clinician_page.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    # A file that is not an image: the page shows the service's 415 message, nothing breaks.
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(not_image))
    browser.find_element(By.ID, "analyse").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
    assert browser.find_element(By.ID, "status").text.startswith("415: the upload is not an image")
