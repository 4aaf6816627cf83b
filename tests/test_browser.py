"""The web page in headless Chromium: token, upload a reference, Generate, progress, a result in the gallery."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
from helpers import reference_image

from ipadapter.jobs.engine import Engine
from ipadapter.server import ServerConfig, create_app
from ipadapter.server.app import serve_in_thread

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and DRIVER.is_file()) or shutil.which("chromium") is None,
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
)
TOKEN = "browser-token"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_generates_from_an_uploaded_reference(browser, models: dict, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    config = ServerConfig(base=str(models["sd15"]), adapters=[str(models["ckpt"]["sd15", "safetensors"])],
                          token=TOKEN)  # fmt: skip
    with serve_in_thread(create_app(config, Engine("cpu"))) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        token = wait.until(ec.visibility_of_element_located((By.ID, "token")))  # the server needs a token
        token.send_keys(TOKEN, Keys.TAB)  # kept in localStorage; the page then loads the served models
        wait.until(lambda d: Select(d.find_element(By.ID, "mode")).options)
        modes = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "mode")).options]
        assert modes == ["t2i", "img2img", "inpaint"]
        assert browser.execute_script("return localStorage.getItem('ipadapter-token')") == TOKEN

        browser.find_element(By.ID, "files").send_keys(str(ref))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#thumbs img"))
        browser.find_element(By.ID, "prompt").send_keys("a cat")
        for field, value in (("steps", "2"), ("seed", "7")):
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "generate").click()

        card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#gallery .card.result")))
        wait.until(ec.invisibility_of_element_located((By.ID, "progress")))  # progress finished and hidden
        assert browser.find_element(By.ID, "status").text.startswith("done")
        image = card.find_element(By.TAG_NAME, "img")
        assert image.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].naturalWidth", image) == 32
        png = base64.b64decode(image.get_attribute("src").split(",", 1)[1])
        assert b"parameters" in png  # the download carries its settings
        assert "seed" in card.text and "7" in card.text
        download = card.find_element(By.LINK_TEXT, "Download")
        assert download.get_attribute("download") == "ipadapter-7.png"

        browser.find_element(By.ID, "prompt").clear()
        browser.find_element(By.ID, "seed").clear()
        card.find_element(
            By.XPATH, ".//button[text()='Reuse settings']"
        ).click()  # settings back into the form
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a cat"
        assert browser.find_element(By.ID, "seed").get_attribute("value") == "7"
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs
