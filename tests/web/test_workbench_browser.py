"""The workbench in a real browser against a real `exchange serve` (real sockets, SQLite and
PostgreSQL): a review opened over MLLP, a login made with `exchange user add`, then Debian's
chromium, driven through its chromium-driver by Selenium, logs in, opens the queue and the
review, sees every field's weight, clicks "Link", and the link has changed in the API; after
logging out a patient page sends it back to the login page.

The browser comes from the system (`.ci/run` installs Debian's chromium and chromium-driver).
Without it these tests are skipped on a developer's machine, and fail under CI
(``CI`` or ``EXCHANGE_REQUIRE_POSTGRES=1``), so a CI run never passes without them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from exchange.store.db import make_engine
from exchange.store.schema import audit_event_table
from tests.support import ExchangeProcess, MLLPConnection, api_request, msa, write_config
from tests.test_reviews_e2e import HANSEN, HANSON, a0x

PASSWORD = "correct horse battery staple"
CHROMIUM = ("chromium", "chromium-browser")
DRIVER = ("chromedriver", "chromium-driver")


def _which(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") or os.environ.get("EXCHANGE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (required under CI: .ci/run installs Debian's chromium and chromium-driver)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chrome() -> Iterator[object]:
    """One headless chromium for the module (each test clears its cookies)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    binary, driver_path = _which(CHROMIUM), _which(DRIVER)
    if binary is None or driver_path is None:
        _unavailable("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def exchange_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exchange.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=60)


def start(chrome, database_url: str, tmp_path, user: str) -> tuple[ExchangeProcess, str]:
    """A fresh browser (no cookies), a technician ``user`` made with `exchange user add`, and
    `exchange serve` running: (the server, its workbench's base URL)."""
    chrome.execute_cdp_cmd("Network.clearBrowserCookies", {})
    added = exchange_cli("user", "add", user, "--role", "technician", "--database", database_url,
                         stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    server = ExchangeProcess(write_config(tmp_path), database_url).start()
    host, port = server.http
    return server, f"http://{host}:{port}"


def test_a_technician_links_a_review_in_the_browser(chrome, database_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome
    wait = WebDriverWait(driver, 20)
    server, base = start(chrome, database_url, tmp_path, "tess")
    try:
        server.expect(rf"workbench: {re.escape(base)}/ .*exchange user add NAME --role admin")
        with MLLPConnection(server.address) as mllp:
            assert msa(mllp.request(a0x("W1", "GENHOSP", "GH-1", HANSON)))[0] == "AA"
            assert msa(mllp.request(a0x("W2", "OAKNH", "OA-1", HANSEN)))[0] == "AA"
        gh = api_request(server, database_url, "GET", "/api/records/GENHOSP/GH-1")["person"]
        assert api_request(server, database_url, "GET", "/api/records/OAKNH/OA-1")["person"] != gh

        # a patient page without a login: the login page, which comes back to it after
        driver.get(f"{base}/persons/{gh}")
        assert driver.current_url == f"{base}/login?next=%2Fpersons%2F{gh}"
        driver.find_element(By.ID, "name").send_keys("tess")
        driver.find_element(By.ID, "password").send_keys("not the password")
        driver.find_element(By.ID, "login").click()
        wait.until(until.presence_of_element_located((By.CSS_SELECTOR, "p.problem")))
        assert "did not work" in driver.find_element(By.CSS_SELECTOR, "p.problem").text
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()
        wait.until(until.url_to_be(f"{base}/persons/{gh}"))
        assert "GH-1" in driver.find_element(By.TAG_NAME, "main").text

        # the queue, the review, each field's agreement and weight
        driver.find_element(By.LINK_TEXT, "Reviews").click()
        wait.until(until.url_to_be(f"{base}/reviews"))
        [link] = driver.find_elements(By.CSS_SELECTOR, "a.review-link")
        review_url = link.get_attribute("href")
        link.click()
        wait.until(until.url_to_be(review_url))
        weights = {row.get_attribute("class").removeprefix("field-"): row.find_element(By.CSS_SELECTOR, "td.weight").text
                   for row in driver.find_elements(By.CSS_SELECTOR, "#comparison tbody tr")}
        assert set(weights) >= {"family", "given", "birth", "address", "phone", "sex"}
        assert all(re.fullmatch(r"[+-]\d+\.\d\d\*?|0\.00\*?", w) for w in weights.values()), weights
        assert weights["birth"].startswith("+")  # the same birth date counts for them
        assert "review from" in driver.find_element(By.ID, "thresholds").text

        driver.find_element(By.ID, "link").click()
        wait.until(until.presence_of_element_located((By.ID, "decision")))
        assert driver.current_url == review_url
        assert driver.find_element(By.ID, "decision").text.startswith("link by tess")

        # the link changed at once, as the API tells
        assert api_request(server, database_url, "GET", "/api/records/OAKNH/OA-1")["person"] == gh
        review_id = int(review_url.rsplit("/", 1)[1])
        review = api_request(server, database_url, "GET", f"/api/reviews/{review_id}")
        assert (review["state"], review["decision"], review["decided_by"]) == ("resolved", "link", "tess")

        # logged out, a patient page is the login page again
        driver.find_element(By.ID, "logout").click()
        wait.until(until.url_to_be(f"{base}/login"))
        driver.get(f"{base}/records/OAKNH/OA-1")
        assert driver.current_url == f"{base}/login?next=%2Frecords%2FOAKNH%2FOA-1"
        assert "HANSEN" not in driver.page_source
    finally:
        assert server.terminate() == 0
    output = "".join(server.output)
    assert "HANSON" not in output and "HANSEN" not in output and "OA-1" not in output  # nothing of theirs in the log

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(audit_event_table).where(audit_event_table.c.actor == "tess")
                                .order_by(audit_event_table.c.id)).mappings().all()
    finally:
        engine.dispose()
    pages = [(r["action"], r["resource"], r["key"], r["outcome"]) for r in rows if r["resource"] != "record"]
    shown = {(r["facility"], r["key"]) for r in rows if r["resource"] == "record"}
    assert shown == {("GENHOSP", "GH-1"), ("OAKNH", "OA-1")}  # each record a page showed has its row
    assert pages == [
        ("login", "session", None, "forbidden"),
        ("login", "session", None, "ok"),
        ("read", "person", str(gh), "ok"),
        ("read", "review", "state=open", "ok"),
        ("read", "review", str(review_id), "ok"),
        ("decide", "review", str(review_id), "ok"),
        ("read", "review", str(review_id), "ok"),
        ("logout", "session", None, "ok"),
    ]


def test_a_very_long_value_wraps_instead_of_widening_the_page(chrome, database_url, tmp_path):
    """Found by a workbench audit: a 3,000-character name made the record and person pages about
    27,000 pixels wide, the source column and the Split buttons far off screen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome
    wait = WebDriverWait(driver, 20)
    server, base = start(chrome, database_url, tmp_path, "tom")
    try:
        with MLLPConnection(server.address) as mllp:
            assert msa(mllp.request(a0x("L1", "GENHOSP", "GH-LONG", "X" * 3000 + "^ELIZABETH||19470312|F")))[0] == "AA"
            note = (f"MSH|^~\\&|APP|GENHOSP|EX|EX|20261127120000||MDM^T02^MDM_T02|L2|P|2.5\r"
                    f"EVN|T02|20261127120000\rPID|1||GH-LONG^^^GENHOSP^MR||{'X' * 3000}^ELIZABETH\r"
                    f"TXA|1|{'T' * 200}|TX|||||||||{'D' * 400}||||AU||AV\rOBX|1|TX|||{'Y' * 5000}\r")
            assert msa(mllp.request(note.encode()))[0] == "AA"
        person = api_request(server, database_url, "GET", "/api/records/GENHOSP/GH-LONG")["person"]
        driver.get(f"{base}/login?next=%2Frecords%2FGENHOSP%2FGH-LONG")
        driver.find_element(By.ID, "name").send_keys("tom")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()
        wait.until(until.url_to_be(f"{base}/records/GENHOSP/GH-LONG"))
        for path in ("/records/GENHOSP/GH-LONG", f"/persons/{person}"):
            driver.get(base + path)
            assert "XXXXXXXX" in driver.page_source
            wide, view = driver.execute_script(
                "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert wide <= view + 2, (path, wide, view)
        # ... and the short columns beside it keep their width (a privacy audit: "G/E/N/H/O/S/P" one
        # letter a line)
        narrowest = driver.execute_script(
            "return Math.min(...Array.from(document.querySelectorAll('table.best tbody th, table.best td:last-child'))"
            ".map(e => e.getBoundingClientRect().width))")
        assert narrowest > 60, narrowest
    finally:
        assert server.terminate() == 0
