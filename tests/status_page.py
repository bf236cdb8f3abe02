"""Drives the daemon's status page in headless Chromium through Selenium: waits for the
model's row and its per-layer picture, sends a chat message with greedy settings, waits
for the streamed answer to finish and prints what it saw as one JSON object.

Usage: status_page.py URL MODEL QUESTION MAX_TOKENS CHROMIUM CHROMEDRIVER
"""

import json
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

url, model, question, max_tokens, chromium, chromedriver = sys.argv[1:7]

options = webdriver.ChromeOptions()
options.binary_location = chromium
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
    options.add_argument(arg)
driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
try:
    driver.get(url)
    wait = WebDriverWait(driver, 120)
    row = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-model="{model}"]'))
    )
    cells = [td.get_attribute("textContent") for td in row.find_elements(By.TAG_NAME, "td")]
    bars = driver.find_elements(By.CSS_SELECTOR, f'.layers[data-model="{model}"] svg rect')
    wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'#chat-model option[value="{model}"]'))
    )
    Select(driver.find_element(By.ID, "chat-model")).select_by_value(model)
    for field, value in (("chat-temperature", "0"), ("chat-max-tokens", max_tokens)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "chat-input").send_keys(question)
    driver.find_element(By.ID, "chat-send").click()
    answer = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant.done"))
    )
    user = driver.find_element(By.CSS_SELECTOR, ".msg.user")
    print(
        json.dumps(
            {
                "title": driver.title,
                "row": cells,
                "layer_bars": len(bars),
                "user": user.get_attribute("textContent"),
                "answer": answer.get_attribute("textContent"),
                "answer_class": answer.get_attribute("class"),
                "rate": driver.find_element(By.ID, "rate").get_attribute("textContent"),
            }
        )
    )
finally:
    driver.quit()
