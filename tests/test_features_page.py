"""The feature browser in a real headless browser (Debian's chromium + chromedriver, driven by
Selenium): the table, search, sort, a latent view's tokens and shading, no console error, no
request beyond file://. Skipped, with the reason, only where chromium is not installed."""
import json
import shutil

import pytest

from tests.test_features import EVERY, F, brute, latent_records, read_data


@pytest.fixture(scope="module")
def crafted(features_crafted):
    return features_crafted


@pytest.fixture(scope="module")
def built(features_built):
    return features_built

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="chromium and chromedriver not installed (apt-get install chromium chromium-driver)")


def shown(token: str) -> str:
    """The page's rendering of a token (app.js showTok)."""
    import re

    return re.sub(r" {3,}", lambda m: "\u2423" + str(len(m.group())), token.replace("\n", "\u21b5"))


def make_driver(width=1400, height=1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-background-networking"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def wait_for(driver, css, timeout=10):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def table_latents(driver):
    from selenium.webdriver.common.by import By

    return [int(tr.get_attribute("data-latent")) for tr in driver.find_elements(By.CSS_SELECTOR, "#latents tr[data-latent]")]


@pytest.fixture(scope="module")
def page(built):
    out, _ = built
    driver = make_driver()
    driver.get((out / "index.html").absolute().as_uri() + "#sae=0")
    wait_for(driver, "#latents tr[data-latent]")
    yield driver, out
    driver.quit()


def test_table_search_and_sort(page):
    from selenium.webdriver.common.by import By

    driver, out = page
    assert sorted(table_latents(driver)) == list(range(F))
    q = driver.find_element(By.ID, "q")
    q.send_keys("7")
    shown = table_latents(driver)
    assert 7 in shown and len(shown) < F
    vocab, ix = read_data(out, "vocab"), read_data(out, "s0/index")
    for i in shown:   # a number finds its latent, otherwise the needle is in a top token or logit
        words = [vocab[str(t)] for t in ix["toptok"][i] + (ix["toplogit"][i] if ix["toplogit"] else [])]
        assert i == 7 or any("7" in w for w in words)
    q.clear()
    q.send_keys(" ")
    q.clear()
    driver.execute_script("document.getElementById('q').value=''; document.getElementById('q').oninput();")
    assert len(table_latents(driver)) == F
    driver.find_element(By.CSS_SELECTOR, "th[data-sort=density]").click()
    order = table_latents(driver)
    dens = [ix["density"][i] for i in order]
    assert dens == sorted(dens, reverse=True) and order[0] == EVERY
    driver.find_element(By.CSS_SELECTOR, "th[data-sort=density]").click()
    order = table_latents(driver)
    assert [ix["density"][i] for i in order] == sorted(ix["density"]) and ix["density"][order[0]] == 0


def test_latent_view_tokens_and_shading(page, crafted):
    from selenium.webdriver.common.by import By

    driver, out = page
    feats, seq, pos, used = brute(crafted)
    where = {(s, p): r for r, (s, p) in enumerate(zip(seq.tolist(), pos.tolist()))}
    vocab = read_data(out, "vocab")
    f = 5
    driver.get((out / "index.html").absolute().as_uri() + f"#sae=0&latent={f}")
    wait_for(driver, "#top .ctx")
    assert driver.find_element(By.ID, "title").text == f"Latent {f}"
    rec = latent_records(out, 0)[f]
    mx = float(feats[used, f].max())
    rows = driver.find_elements(By.CSS_SELECTOR, "#top .ctx")
    assert len(rows) == len(rec["top"]) == 5
    for div, ex in zip(rows, rec["top"]):
        spans = div.find_elements(By.CSS_SELECTOR, ".tok")
        s, p = ex["seq"], ex["pos"]
        span = range(max(0, p - 4), min(12, p + 3))
        want_tokens = [shown(vocab[str(t)]) for t in crafted["tokens"][s, span.start:span.stop]]
        assert [sp.get_attribute("textContent") for sp in spans] == want_tokens
        want = [float(feats[where[s, q], f]) for q in span]
        got = [float(sp.get_attribute("data-v")) for sp in spans]
        assert got == pytest.approx(want)
        assert [sp.get_attribute("title").split()[0] for sp in spans] == [sp.get_attribute("data-v") for sp in spans]
        for sp, v in zip(spans, want):
            alpha = float(sp.value_of_css_property("background-color").rsplit(",", 1)[1].strip(" )")) \
                if v > 0 else 0.0
            assert alpha == pytest.approx(min(1, v / mx), abs=2e-3)
        assert "center" in spans[ex["c"]].get_attribute("class") and crafted["tokens"][s, p] == f
    assert len(driver.find_elements(By.CSS_SELECTOR, "#logits tr")) == 10


def test_bad_latent_in_url_and_no_console_error_or_network(page):
    from selenium.webdriver.common.by import By

    driver, out = page
    driver.get((out / "index.html").absolute().as_uri() + f"#sae=0&latent={F}")
    wait_for(driver, "#error")
    driver.execute_script("return 1")
    assert "out of range" in driver.find_element(By.ID, "error").text
    driver.get((out / "index.html").absolute().as_uri() + "#sae=1&latent=3")
    wait_for(driver, "#top")
    assert driver.find_element(By.ID, "error").text == ""
    assert [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    assert urls and all(u.startswith("file://") for u in urls), [u for u in urls if not u.startswith("file://")]
    assert any(u.endswith("data/s1/c0.js") for u in urls)   # latent data loaded when viewed


def save_screenshots(out, docs, latent: int, sae: int = 0) -> None:
    """docs/features-index.png and docs/features-latent.png from a browser folder:
    `python -m tests.test_features_page demo-out/features docs 123`."""
    from pathlib import Path

    driver = make_driver(1280, 860)
    try:
        base = (Path(out) / "index.html").absolute().as_uri()
        driver.get(base + f"#sae={sae}")
        wait_for(driver, "#latents tr[data-latent]")
        driver.find_element("css selector", "th[data-sort=density]").click()
        driver.save_screenshot(str(Path(docs) / "features-index.png"))
        driver.get(base + f"#sae={sae}&latent={latent}")
        wait_for(driver, "#top .ctx")
        driver.save_screenshot(str(Path(docs) / "features-latent.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    import sys

    save_screenshots(sys.argv[1], sys.argv[2], int(sys.argv[3]))
