"""Drives pagedserve's built-in page (/ui) in a real headless Chromium through Selenium and
ChromeDriver (Debian's, installed by scripts/fetch-browser.sh), as a person would:

1. the page loads and polls the server, with no console error;
2. a chat message typed in the playground streams an answer, with its token counts and speed;
3. the dashboard's counters and block map move after a request;
4. with an admin token typed in, a scheduler uploaded from the plugins panel becomes the engine's
   policy, as the admin API reports; rolled back from the page, then activated again.

usage: ui_check.py URL ADMIN_URL TOKEN COMPONENT [SCREENSHOT_DIR]
Prints "ui ok" and exits 0 on success; any failure raises.
"""

import json
import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

url, admin_url, token, component = sys.argv[1:5]
component = os.path.realpath(component)  # ChromeDriver wants a canonical path
screenshots = sys.argv[5] if len(sys.argv) > 5 else None


def admin_plugins():
    request = urllib.request.Request(admin_url + "/admin/plugins", headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["plugins"]


def post(path, body):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
    options.add_argument(flag)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
wait = WebDriverWait(driver, 120, poll_frequency=0.2)
by_id = lambda element_id: driver.find_element(By.ID, element_id)  # noqa: E731


def text_of(selector):
    # Read and click in one script: the plugins table is rebuilt every second, so an element
    # found in one call may be gone by the next.
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent).join(' ')", selector)


def click(selector):
    assert driver.execute_script("const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e;", selector), selector


def console_errors():
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


try:
    # 1. The page loads and its first poll lands.
    driver.get(url + "/ui")
    wait.until(lambda d: by_id("model").text.strip() != "")
    assert by_id("health").text == "healthy", by_id("health").text

    # 2. A chat message streams an answer.
    for field, value in (("temperature", "0"), ("max-tokens", "24")):
        by_id(field).clear()
        by_id(field).send_keys(value)
    by_id("chat-input").send_keys("What is the capital of France?")
    by_id("send").click()
    wait.until(lambda d: "output tokens" in by_id("stats").text or "error" in by_id("stats").text)
    stats = by_id("stats").text
    assert "error" not in stats, stats
    answer = driver.find_elements(By.CSS_SELECTOR, ".turn.assistant .body")[-1].text
    assert answer.strip(), "the answer is empty"
    assert "TTFT" in stats and "tokens/s" in stats, stats
    if screenshots:
        driver.save_screenshot(screenshots + "/playground.png")

    # 3. The dashboard moves after a request.
    driver.find_element(By.CSS_SELECTOR, '.tab[data-tab="dashboard"]').click()
    wait.until(lambda d: by_id("gen-tokens").text.isdigit())
    before = int(by_id("gen-tokens").text)
    post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True, "temperature": 0})
    wait.until(lambda d: int(by_id("gen-tokens").text) >= before + 16)
    assert "blocks of" in by_id("block-counts").text, by_id("block-counts").text
    if screenshots:
        # Something to show: a few requests in flight while the screenshot is taken.
        import threading

        load = [threading.Thread(target=post, args=("/v1/completions", {"prompt": f"Story {i}:", "max_tokens": 96, "ignore_eos": True})) for i in range(8)]
        for thread in load:
            thread.start()
        wait.until(lambda d: int(by_id("running").text) > 0)
        time.sleep(2)
        driver.save_screenshot(screenshots + "/dashboard.png")
        for thread in load:
            thread.join()

    # 4. A scheduler swapped from the plugins panel.
    driver.find_element(By.CSS_SELECTOR, '.tab[data-tab="plugins"]').click()
    wait.until(lambda d: by_id("admin").is_displayed())
    by_id("admin-token").send_keys(token)
    Select(by_id("upload-kind")).select_by_visible_text("scheduler")
    by_id("upload-name").send_keys("priority")
    by_id("upload-file").send_keys(component)
    by_id("upload-button").click()
    wait.until(lambda d: by_id("admin-status").text and not by_id("admin-status").text.endswith("…"))
    assert ": 201 " in by_id("admin-status").text, (by_id("admin-status").text, driver.get_log("browser"))

    def scheduler(name):
        return next((p for p in admin_plugins() if p["kind"] == "scheduler" and p["name"] == name), None)

    wait.until(lambda d: (scheduler("priority") or {}).get("in_use"))
    # The table lists it; rolling back from the page leaves it inactive (native FCFS schedules),
    # and activating its version from the page makes it the policy again.
    wait.until(lambda d: "(in use)" in text_of('tr[data-name="priority"] td'))
    if screenshots:
        driver.save_screenshot(screenshots + "/plugins.png")
    click('tr[data-name="priority"] button.rollback')
    wait.until(lambda d: (scheduler("priority") or {}).get("active_version") is None)
    wait.until(lambda d: text_of('tr[data-name="priority"] button.activate'))
    click('tr[data-name="priority"] button.activate')
    wait.until(lambda d: (scheduler("priority") or {}).get("in_use"))

    errors = console_errors()
    assert not errors, f"console errors: {errors}"
    print("ui ok")
finally:
    driver.quit()
