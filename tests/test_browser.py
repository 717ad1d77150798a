"""The web feature browser in a real headless browser (Debian's chromium + chromedriver, no download) against the
real service on loopback, serving two dictionaries: pick a dictionary, search, list and open features, inspect a
text with both dictionaries side by side, steer a feature from its page; no console errors."""

import copy
import shutil
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ready
from selenium.webdriver.support.ui import Select, WebDriverWait

from monosemantic.artifact import load_dictionary, publish
from monosemantic.feature_stats import SPECS
from monosemantic.shipped import REFERENCE_DICTIONARY, reference_registry_path

# headless chromium against a server serving two dictionaries
pytestmark = [pytest.mark.browser, pytest.mark.slow]

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


@pytest.fixture(scope="module")
def two_dictionaries(tmp_path_factory):
    """The shipped `reference` and `second`: the same dictionary with its features in reverse order (weights,
    statistics, labels and neighbours permuted together), so feature N of one is feature d_sae-1-N of the other:
    a real second dictionary whose pages and values differ from the first one's at every id."""
    root = tmp_path_factory.mktemp("two-dictionaries")
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    shipped = load_dictionary(root, REFERENCE_DICTIONARY, 1)
    m, d_sae = shipped.manifest, shipped.sae.cfg.d_sae
    sae = copy.deepcopy(shipped.sae)
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_enc.flip(1))
        sae.b_enc.copy_(sae.b_enc.flip(0))
        sae.W_dec.copy_(sae.W_dec.flip(0))
    features = {name: t.flip(0) if SPECS[name].shape[0] == "d_sae" else t for name, t in shipped.features.items()}
    features["neighbour_ids"] = (d_sae - 1) - features["neighbour_ids"]
    publish(root, "second", sae, model=m.model, hook=m.hook, features=features, labels=shipped.labels[::-1], extra={"metrics": m.metrics})
    from conftest import write_explanation_run

    write_explanation_run(root, REFERENCE_DICTIONARY, "first", {7: ("the word cat", 0.9), 9: ("cats in comments", None)})
    write_explanation_run(root, REFERENCE_DICTIONARY, "second", {7: ("dogs and cats", 0.6)})
    return root


@pytest.fixture(scope="module")
def browsed_server(two_dictionaries):
    """The server the page tests browse: `reference` (the default) and `second`."""
    from conftest import RunningServer

    running = RunningServer(registry=two_dictionaries, dictionaries=["reference:1", "second"], max_text_chars=2000, max_new_tokens=64)
    yield running
    running.stop()


@pytest.fixture
def page(browser, browsed_server, tmp_path):
    browser.get(browsed_server.http_url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "dictionary").text)
    yield browser
    browser.save_screenshot(str(tmp_path / "page.png"))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors


def wait_for(driver, condition, timeout=30):
    return WebDriverWait(driver, timeout).until(condition)


def open_view(driver, hash_route):
    """A route of the page, loaded afresh (as a shared link or a reload would open it)."""
    base = driver.current_url.split("#")[0]
    driver.get("about:blank")
    driver.get(base + hash_route)


def hash_params(driver):
    return {k: v[0] for k, v in parse_qs(urlsplit(driver.current_url).fragment.partition("?")[2]).items()}


def get_json(server, path, **params):
    response = httpx.get(server.http_url + path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


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
    wait_for(page, ready.visibility_of_element_located((By.ID, "inspect-form"))).find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    token = wait_for(page, ready.element_to_be_clickable((By.CSS_SELECTOR, "#inspect-tokens .tok")))
    token.click()
    wait_for(page, ready.element_to_be_clickable((By.CSS_SELECTOR, "#inspect-table tr.selected button.highlight"))).click()
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


def test_the_picker_lists_every_loaded_dictionary_with_the_default_selected(page, browsed_server):
    picker = Select(page.find_element(By.ID, "dictionary"))
    loaded = [d["name"] for d in get_json(browsed_server, "/v1/dictionaries")["dictionaries"]]
    assert [o.get_attribute("value") for o in picker.options] == loaded == ["reference", "second"]
    assert picker.first_selected_option.get_attribute("value") == "reference"
    assert hash_params(page)["dictionary"] == "reference"


def test_switching_the_dictionary_changes_what_a_feature_page_shows(page, browsed_server):
    open_view(page, "#/feature/5")
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "feature-summary"), "dictionary reference v1"))

    def title():  # textContent: labels hold spaces that .text would collapse
        return page.find_element(By.ID, "feature-title").get_attribute("textContent")

    before = title()
    Select(page.find_element(By.ID, "dictionary")).select_by_value("second")
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "feature-summary"), "dictionary second v1"))
    expected = get_json(browsed_server, "/v1/features/5", dictionary="second")
    assert title() == f"Feature #5 {expected['label']} (label from top tokens)" != before  # no explanation: the label, marked
    assert hash_params(page)["dictionary"] == "second" and page.current_url.split("?")[0].endswith("#/feature/5")
    shown = page.find_element(By.CSS_SELECTOR, "#top-examples .example .value").text
    assert float(shown) == pytest.approx(expected["top_examples"][0]["value"], abs=0.006)


def test_the_url_keeps_the_search_and_dictionary_and_reopening_it_restores_the_view(page):
    Select(page.find_element(By.ID, "dictionary")).select_by_value("second")
    wait_for(page, lambda d: hash_params(d).get("dictionary") == "second")
    page.find_element(By.ID, "search-q").send_keys("def")
    Select(page.find_element(By.ID, "search-by")).select_by_value("token")
    page.find_element(By.CSS_SELECTOR, "#search-form button").click()
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "search-status"), "features of second"))
    found = [row.get_attribute("data-feature") for row in page.find_elements(By.CSS_SELECTOR, "#search-results tbody tr")]
    assert found and hash_params(page) == {"dictionary": "second", "q": "def", "by": "token"}
    shared = page.current_url
    page.get("about:blank")
    page.get(shared)
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "search-status"), "features of second"))
    assert Select(page.find_element(By.ID, "dictionary")).first_selected_option.get_attribute("value") == "second"
    assert page.find_element(By.ID, "search-q").get_attribute("value") == "def"
    assert Select(page.find_element(By.ID, "search-by")).first_selected_option.get_attribute("value") == "token"
    assert [row.get_attribute("data-feature") for row in page.find_elements(By.CSS_SELECTOR, "#search-results tbody tr")] == found


def test_the_start_page_lists_the_features_by_density_densest_first(page, two_dictionaries):
    rows = wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#feature-list tbody tr") or None)
    densities = [float(row.get_attribute("data-density")) for row in rows]
    stored = load_dictionary(two_dictionaries, REFERENCE_DICTIONARY, 1).features["density"]
    assert len(rows) == 20 and densities == sorted(densities, reverse=True)
    assert int(rows[0].get_attribute("data-feature")) == int(stored.argmax())
    assert densities[0] == pytest.approx(float(stored.max()))


def test_the_feature_list_orders_by_label_and_pages_on(page, browsed_server):
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#feature-list tbody tr") or None)
    Select(page.find_element(By.ID, "list-order")).select_by_value("label")
    expected = get_json(browsed_server, "/v1/features", dictionary="reference", order="label", page=2)["results"]
    wait_for(page, lambda d: hash_params(d).get("order") == "label")
    page.find_element(By.XPATH, "//div[@id='list-pages']/button[contains(., 'next')]").click()
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "list-pages"), "page 2 of"))
    wait_for(page, lambda d: [int(r.get_attribute("data-feature")) for r in d.find_elements(By.CSS_SELECTOR, "#feature-list tbody tr")]
             == [f["feature"] for f in expected])


def test_the_random_feature_link_opens_a_live_features_page(page, browsed_server):
    Select(page.find_element(By.ID, "dictionary")).select_by_value("second")
    wait_for(page, lambda d: hash_params(d).get("dictionary") == "second")
    page.find_element(By.ID, "random-feature").click()
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "feature-summary"), "dictionary second v1"))
    feature = int(page.current_url.split("#/feature/")[1].split("?")[0])
    assert get_json(browsed_server, f"/v1/features/{feature}", dictionary="second")["density"] > 0
    assert page.find_element(By.ID, "feature-title").text.startswith(f"Feature #{feature}")


def test_inspect_with_two_dictionaries_shows_both_side_by_side_with_the_services_values(page, browsed_server, tmp_path):
    open_view(page, "#/inspect")
    boxes = wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#inspect-dictionaries input[type=checkbox]") or None)
    assert [b.get_attribute("value") for b in boxes] == ["reference", "second"] and boxes[0].is_selected()
    boxes[1].click()
    text = page.find_element(By.ID, "inspect-text").get_attribute("value")
    page.find_element(By.CSS_SELECTOR, "#inspect-form button[type=submit]").click()
    wait_for(page, ready.visibility_of_element_located((By.ID, "inspect-table")))
    heads = [th.text for th in page.find_elements(By.CSS_SELECTOR, "#inspect-table thead th")]
    assert heads == ["token", "reference v1", "second v1"]
    answer = httpx.post(browsed_server.http_url + "/v1/activations", json={"text": text, "top_k": 5, "dictionaries": ["reference", "second"]}).json()
    rows = page.find_elements(By.CSS_SELECTOR, "#inspect-table tbody tr")
    assert len(rows) == len(answer["tokens"]) - 1  # BOS is not shown
    for i, row in enumerate(rows):
        for readout in answer["readouts"]:
            name = readout["dictionary"]["name"]
            cell = row.find_element(By.CSS_SELECTOR, f'td[data-dictionary="{name}"]')
            buttons = cell.find_elements(By.CSS_SELECTOR, "button.highlight")
            top = readout["tokens"][i + 1]["top"]
            assert [int(b.get_attribute("data-feature")) for b in buttons] == [f["feature"] for f in top], (i, name)
            assert [float(b.get_attribute("data-value")) for b in buttons] == pytest.approx([f["value"] for f in top], rel=1e-4)
            assert all(b.text.startswith(f"#{f['feature']} ") for b, f in zip(buttons, top))
    page.save_screenshot(str(tmp_path / "inspect-two.png"))


def test_steer_this_feature_prefills_the_steering_form(page, browsed_server):
    open_view(page, "#/feature/7?dictionary=second")
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "feature-summary"), "dictionary second v1"))
    page.find_element(By.ID, "steer-this").click()
    row = wait_for(page, ready.visibility_of_element_located((By.CSS_SELECTOR, "#steer-rows .steer-row")))
    assert len(page.find_elements(By.CSS_SELECTOR, "#steer-rows .steer-row")) == 1
    assert row.find_element(By.CLASS_NAME, "steer-feature").get_attribute("value") == "7"
    assert Select(row.find_element(By.CLASS_NAME, "steer-dictionary")).first_selected_option.get_attribute("value") == "second"
    assert Select(row.find_element(By.CLASS_NAME, "steer-mode")).first_selected_option.get_attribute("value") == "clamp"
    peak = get_json(browsed_server, "/v1/features/7", dictionary="second")["max_activation"]
    assert float(row.find_element(By.CLASS_NAME, "steer-value").get_attribute("value")) == pytest.approx(max(1, 2 * peak), abs=0.05)
    assert hash_params(page)["dictionary"] == "second"


def test_a_feature_page_lists_its_counterpart_in_the_other_dictionary_and_links_to_it(page, browsed_server):
    open_view(page, "#/feature/7?dictionary=reference")
    first = wait_for(page, ready.visibility_of_element_located((By.CSS_SELECTOR, "#counterparts li[data-feature]")))
    assert (first.get_attribute("data-dictionary"), first.get_attribute("data-feature")) == ("second:v1", "4088")  # second is reference reversed
    first.find_element(By.TAG_NAME, "a").click()
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "feature-summary"), "dictionary second v1"))
    assert page.find_element(By.ID, "feature-title").text.startswith("Feature #4088")


def test_a_feature_page_shows_its_best_explanation_and_every_runs_with_their_scores(page):
    open_view(page, "#/feature/7?dictionary=reference")
    runs = wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#explanations li[data-run]") or None)
    assert [r.get_attribute("data-run") for r in runs] == ["first", "second"]
    assert runs[0].text.startswith("the word cat — score 0.90") and "first-explainer explained" in runs[0].text
    assert page.find_element(By.ID, "feature-title").text == "Feature #7 the word cat"


def test_search_by_explanation_lists_the_explained_features_best_scoring_first(page):
    page.find_element(By.ID, "search-q").send_keys("cats")
    Select(page.find_element(By.ID, "search-by")).select_by_value("explanation")
    page.find_element(By.CSS_SELECTOR, "#search-form button").click()
    wait_for(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#search-results tbody tr")) == 2 or None)
    rows = page.find_elements(By.CSS_SELECTOR, "#search-results tbody tr")
    assert [r.get_attribute("data-feature") for r in rows] == ["7", "9"]  # 7's second run says "cats"; 9 is unscored
    assert rows[1].find_elements(By.TAG_NAME, "td")[1].text == "cats in comments"
    assert "have an explanation with these words" in page.find_element(By.ID, "search-status").text


def test_measuring_steering_draws_every_methods_curve_and_the_steer_view_gets_the_suggested_strength(page, browsed_server):
    open_view(page, "#/feature/100?dictionary=reference")
    wait_for(page, ready.text_to_be_present_in_element((By.ID, "feature-summary"), "dictionary reference v1"))
    page.find_element(By.ID, "steer-eval-run").click()
    wait_for(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#steer-eval-chart polyline")) == 3 or None, timeout=120)
    assert {line.get_attribute("data-method") for line in page.find_elements(By.CSS_SELECTOR, "#steer-eval-chart polyline")} == {"clamp", "add", "mean_difference"}
    assert [li.get_attribute("data-budget") for li in page.find_elements(By.CSS_SELECTOR, "#steer-eval-best li")] == ["0.1", "0.5"]
    # The same question over the API (answered from the cache) names the strength the page suggests.
    answer = httpx.post(browsed_server.http_url + "/v1/steer-eval", json={"dictionary": "reference", "feature": 100, "effect": "promoted",
                                                                          "new_tokens": 12, "prompts": 4}, timeout=120).json()
    assert answer["cached"]
    own = max((b for b in answer["best"] if b["budget"] == 0.5 and b["point"] and b["method"] != "mean_difference" and b["point"]["multiple"] > 0),
              key=lambda b: b["point"]["promoted"])
    page.find_element(By.ID, "steer-this").click()
    row = wait_for(page, ready.visibility_of_element_located((By.CSS_SELECTOR, "#steer-rows .steer-row")))
    assert Select(row.find_element(By.CLASS_NAME, "steer-mode")).first_selected_option.get_attribute("value") == own["method"]
    assert float(row.find_element(By.CLASS_NAME, "steer-value").get_attribute("value")) == pytest.approx(own["point"]["strength"], abs=0.01)
    assert page.find_element(By.ID, "steer-suggested").text.startswith("suggested by the steering curve:")


def test_every_histogram_labels_both_axes(page):
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#density-histogram rect") or None)
    density = {e.get_attribute("class"): e.text for e in page.find_elements(By.CSS_SELECTOR, "#density-histogram text.axis-label")}
    assert density == {"axis-label x": "feature density (log10 share of tokens)", "axis-label y": "features (log count)"}
    open_view(page, "#/feature/5")
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#feature-histogram rect") or None)
    activation = {e.get_attribute("class"): e.text for e in page.find_elements(By.CSS_SELECTOR, "#feature-histogram text.axis-label")}
    assert activation == {"axis-label x": "activation (log10 bins)", "axis-label y": "tokens (log count)"}


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
        # imported without feature statistics: the feature list says so (the 409 the browser logs itself is the only error)
        wait_for(browser, ready.text_to_be_present_in_element((By.ID, "list-status"), "has no feature statistics"))
        logged = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert all(e["source"] == "network" and "/v1/features?dictionary=jb" in e["message"] and "409" in e["message"] for e in logged), logged
    finally:
        running.stop()


@pytest.fixture(scope="module")
def nested_server(tmp_path_factory):
    """A Matryoshka dictionary (prefixes of 64 and 256 of 1,024 features) with feature statistics, beside the shipped
    reference (which has no prefixes)."""
    from conftest import RunningServer
    from test_served_architectures import publish_trained_on_reference

    root = tmp_path_factory.mktemp("nested")
    shutil.copytree(reference_registry_path() / REFERENCE_DICTIONARY, root / REFERENCE_DICTIONARY)
    publish_trained_on_reference(root, "nested", "matryoshka", statistics=True, matryoshka_widths=(64, 256, 1024))
    running = RunningServer(registry=root, dictionaries=["nested", "reference:1"])
    yield running
    running.stop()


def test_the_feature_list_shows_one_prefix_of_a_matryoshka_dictionary(browser, nested_server):
    browser.get_log("browser")
    browser.get(nested_server.http_url + "/")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#feature-list tbody tr") or None)
    prefixes = Select(browser.find_element(By.ID, "list-prefix"))
    assert [o.get_attribute("value") for o in prefixes.options] == ["", "64", "256"]
    prefixes.select_by_value("64")
    wait_for(browser, lambda d: hash_params(d).get("prefix") == "64")
    wait_for(browser, ready.text_to_be_present_in_element((By.ID, "list-status"), "64 features of the first 64"))
    expected = get_json(nested_server, "/v1/features", dictionary="nested", order="density", below=64)["results"]
    wait_for(browser, lambda d: [int(r.get_attribute("data-feature")) for r in d.find_elements(By.CSS_SELECTOR, "#feature-list tbody tr")]
             == [f["feature"] for f in expected])
    assert all(f["feature"] < 64 for f in expected)
    Select(browser.find_element(By.ID, "dictionary")).select_by_value("reference")  # no prefixes: no picker
    wait_for(browser, lambda d: hash_params(d).get("dictionary", "").startswith("reference") and "prefix" not in hash_params(d))
    wait_for(browser, lambda d: not d.find_element(By.ID, "list-prefix").is_displayed())
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
