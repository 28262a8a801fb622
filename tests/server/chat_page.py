"""The chat page in a real headless browser (Debian's chromium through chromedriver and
selenium), run by tests/server.rs: two tabs each type a message and see a streamed reply appear
with its tokens per second.

Usage: chat_page.py BASE_URL SCREENSHOT_PATH
"""
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

base, screenshot = sys.argv[1], sys.argv[2]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,800"):
    options.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.set_page_load_timeout(60)
    tabs = []
    for i, message in enumerate(["Hello! What is your name?", "Tell me a fact about the sea."]):
        if i:
            driver.switch_to.new_window("tab")
        driver.get(base + "/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text not in ("", "…"))
        box = driver.find_element(By.ID, "input")
        box.send_keys(message)
        box.send_keys(Keys.ENTER)
        tabs.append((driver.current_window_handle, message))
    for handle, message in tabs:
        driver.switch_to.window(handle)
        # The user's bubble, then the assistant's reply streamed in, then the statistics line.
        WebDriverWait(driver, 300).until(lambda d: "tok/s" in d.find_element(By.CLASS_NAME, "stats").text)
        user = driver.find_element(By.CSS_SELECTOR, ".msg.user").text
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant").text
        stats = driver.find_element(By.CLASS_NAME, "stats").text
        assert user == message, (user, message)
        assert reply.strip() and "[error" not in reply, reply
        assert "tokens" in stats and "tok/s" in stats, stats
        print(f"tab: {message!r} -> {reply[:60]!r} ({stats})")
    driver.save_screenshot(screenshot)
finally:
    driver.quit()
print("chat page: all checks passed")
