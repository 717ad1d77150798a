"""The web feature browser in a real headless browser (Debian's chromium + chromedriver, no download) against the
real service on loopback: search, open a feature, inspect a text, run a steered generation; no console errors."""

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    # No skip: a missing browser fails here (.ci/run installs Debian's chromium and chromium-driver).
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), "install chromium and chromium-driver (apt-get)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server, tmp_path):
    browser.get(server.http_url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "dictionary").text)
    yield browser
    browser.save_screenshot(str(tmp_path / "page.png"))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors


def wait_for(driver, condition, timeout=30):
    return WebDriverWait(driver, timeout).until(condition)


def test_the_start_page_draws_the_dictionarys_density_histogram(page):
    assert page.find_elements(By.CSS_SELECTOR, "#density-histogram rect")
    assert "dead features" in page.find_element(By.ID, "density-note").text


def test_search_by_token_then_open_a_feature(page, tmp_path):
    page.find_element(By.ID, "search-q").send_keys("def")
    Select(page.find_element(By.ID, "search-by")).select_by_value("token")
    page.find_element(By.CSS_SELECTOR, "#search-form button").click()
    first = wait_for(page, ready.element_to_be_clickable((By.CSS_SELECTOR, "#search-results tbody tr")))
    feature = first.get_attribute("data-feature")
    first.click()
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "feature-title"), f"Feature #{feature}"))
    examples = page.find_elements(By.CSS_SELECTOR, "#top-examples .example")
    assert examples and "def" in examples[0].text
    assert page.find_elements(By.CSS_SELECTOR, "#feature-histogram rect")
    assert page.find_elements(By.CSS_SELECTOR, "#logit-up li") and page.find_elements(By.CSS_SELECTOR, "#neighbours li")
    page.save_screenshot(str(tmp_path / "feature.png"))


def test_inspect_a_text_and_highlight_a_feature_over_it(page, tmp_path):
    page.get(page.current_url.split("#")[0] + "#/inspect")
    wait_for(page, ready.visibility_of_element_located((By.ID, "inspect-form"))).find_element(By.TAG_NAME, "button").click()
    token = wait_for(page, ready.element_to_be_clickable((By.CSS_SELECTOR, "#inspect-tokens .tok")))
    token.click()
    wait_for(page, ready.element_to_be_clickable((By.CSS_SELECTOR, "#inspect-detail button.highlight"))).click()
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "inspect-detail"), "highlighting"))
    shaded = [t.value_of_css_property("background-color") for t in page.find_elements(By.CSS_SELECTOR, "#inspect-tokens .tok")]
    assert any(color not in ("rgba(0, 0, 0, 0)", "rgba(255, 120, 40, 0)") for color in shaded)
    page.save_screenshot(str(tmp_path / "inspect.png"))


def test_a_steered_generation_streams_beside_the_unsteered_one(page, tmp_path):
    page.get(page.current_url.split("#")[0] + "#/steer")
    feature = wait_for(page, ready.visibility_of_element_located((By.CSS_SELECTOR, "#steer-rows .steer-feature")))
    feature.send_keys("5")
    value = page.find_element(By.CSS_SELECTOR, "#steer-rows .steer-value")
    value.clear()
    value.send_keys("30")
    tokens = page.find_element(By.ID, "steer-tokens")
    tokens.clear()
    tokens.send_keys("12")
    page.find_element(By.CSS_SELECTOR, "#steer-form button[type=submit]").click()
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "steer-status"), "steered:"))
    steered, plain = page.find_element(By.ID, "steer-steered").text, page.find_element(By.ID, "steer-plain").text
    assert steered and plain and steered != plain
    page.save_screenshot(str(tmp_path / "steer.png"))


def test_an_unknown_feature_shows_the_services_message(page):
    page.get(page.current_url.split("#")[0] + "#/feature/999999")
    message = wait_for(page, ready.visibility_of_element_located((By.ID, "error")))
    assert "999999" in message.text and "4096" in message.text
    # the browser logs the 404 itself as a network error; that one is expected, nothing else may appear
    logged = page.get_log("browser")
    assert all(entry["source"] == "network" and "/v1/features/999999" in entry["message"] for entry in logged if entry["level"] == "SEVERE")


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, registry):
    import json

    from conftest import RunningServer

    path = tmp_path_factory.mktemp("browser-keys") / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "researcher", "key": "browser-key-0123456789", "scopes": ["read", "steer"]}]}))
    running = RunningServer(registry=registry, dictionary="reference:1", api_keys_file=path, max_new_tokens=64)
    yield running
    running.stop()


def test_the_browser_takes_a_key_when_the_server_has_keys(browser, keyed_server, tmp_path):
    browser.get(keyed_server.http_url + "/")
    message = wait_for(browser, ready.visibility_of_element_located((By.ID, "error")))
    assert "needs an API key" in message.text
    browser.find_element(By.ID, "api-key").send_keys("browser-key-0123456789")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "dictionary").text)
    assert "key set" in browser.find_element(By.ID, "key-state").text
    assert "browser-key" not in browser.current_url  # in the tab's session storage, never in a URL
    assert browser.execute_script("return sessionStorage.getItem('monosemantic-api-key')") == "browser-key-0123456789"
    assert browser.execute_script("return localStorage.length") == 0
    browser.get(keyed_server.http_url + "/#/steer")  # a steered stream, with the key, on the steer scope
    feature = wait_for(browser, ready.visibility_of_element_located((By.CSS_SELECTOR, "#steer-rows .steer-feature")))
    feature.send_keys("5")
    tokens = browser.find_element(By.ID, "steer-tokens")
    tokens.clear()
    tokens.send_keys("8")
    browser.find_element(By.CSS_SELECTOR, "#steer-form button[type=submit]").click()
    wait_for(browser, ready.text_to_be_present_in_element((By.ID, "steer-status"), "steered:"))
    assert browser.find_element(By.ID, "steer-steered").text
    browser.save_screenshot(str(tmp_path / "keyed.png"))
    browser.execute_script("sessionStorage.clear()")


@pytest.fixture(scope="module")
def evaluated_server(tmp_path_factory):
    """The shipped dictionary after a user evaluated it on their own text (a real evaluation, recorded by the trainer)."""
    import json

    from conftest import RunningServer
    from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path
    from trainer.pipeline import evaluate_dictionary
    from trainer.text import TextSpec

    root = tmp_path_factory.mktemp("evaluated")
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    notes = root / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": f"for i in range({n}):\n    print(i * {n})\n" * 5}) + "\n" for n in range(200)))
    evaluate_dictionary(root, "reference", tokens=2000, text=TextSpec(dataset=str(notes)), record=True)
    running = RunningServer(registry=root, dictionary="reference")
    yield running, notes
    running.stop()


def test_the_start_page_lists_the_evaluations_with_the_data_they_were_measured_on(browser, evaluated_server):
    running, notes = evaluated_server
    browser.get_log("browser")  # drop what earlier tests left in the log
    browser.get(running.http_url + "/")
    rows = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#evaluations tbody tr") or None)
    cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert [c[0] for c in cells][0] == "at publishing" and len(cells) == 2
    assert cells[1][1].startswith(str(notes)) and cells[1][2] != "–" and float(cells[1][3]) > 0
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_the_start_page_says_where_an_imported_dictionary_came_from(browser, tmp_path):
    from conftest import RunningServer
    from test_interop_cli import saelens_mlp_dictionary
    from trainer.interchange import import_dictionary

    saelens_mlp_dictionary(tmp_path / "saelens")
    import_dictionary("saelens", str(tmp_path / "saelens"), model=None, hook=None, registry=tmp_path / "r", name="jb")
    running = RunningServer(registry=tmp_path / "r", dictionary="jb")
    try:
        browser.get_log("browser")
        browser.get(running.http_url + "/")
        shown = wait_for(browser, lambda d: d.find_element(By.ID, "source").text or None)
        assert shown.startswith(f"Imported from saelens: {(tmp_path / 'saelens').resolve()}")
        assert "apply_b_dec_to_input: false" in shown
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        running.stop()
