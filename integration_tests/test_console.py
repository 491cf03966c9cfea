"""The live console in a real browser: headless Chromium, driven through Selenium and
Debian's chromedriver (``make test`` installs ``chromium`` and ``chromium-driver`` with
apt-get; nothing is downloaded at run time), against the session's system, whose
``make up`` started the console.

Through the page's forms: an adjustment and a validated reservation, whose value then
shows on every calculator and on the Cassandra service; a bad count, whose error shows
next to the count field. Then a calculator stopped with its button: its partitions move
to the other instance in the topology view; started again with its button, it gets its
share back (and the session's system is as before for the tests after this one).

The screenshots go to the test's temporary directory;
``SAVE_CONSOLE_SCREENSHOT=docs/console.png`` also copies the first one there (how the
README's picture is made; not a ``CONSOLE_`` variable, which the console would take for
a misspelt setting of its own).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from integration_tests.support import PARTITIONS, System
from local_stack.testing import wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_SECONDS = 60


@pytest.fixture(scope="module")
def console(system: System) -> str:
    """The console's base URL (``make up`` started it with the system)."""
    if "console" not in system.services:
        pytest.skip("the system was started without the console (--no-console)")
    return f"http://127.0.0.1:{system.services['console'].env['CONSOLE_PORT']}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium, or a skip that says what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]' (make test does)")
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        pytest.skip(
            f"no {' or '.join(missing)}: apt-get install chromium chromium-driver "
            "(make test tries to; it needs root and Debian's package lists)"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root, Chromium refuses to start sandboxed
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1700",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def _until(driver: Any, script: str, *args: Any, timeout: float = WAIT_SECONDS) -> Any:
    """Wait until ``script`` (run in the page, with ``args``) returns something truthy."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
            lambda d: d.execute_script(script, *args)
        )
    except Exception as exc:
        page_error = driver.execute_script(
            "return document.getElementById('page-error').textContent"
        )
        raise AssertionError(
            f"not true within {timeout} s: {script.strip()[:300]} (args {args}); "
            f"page error: {page_error!r}"
        ) from exc


def _fill(driver: Any, field_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, field_id)
    field.clear()
    field.send_keys(text)


def _click(driver: Any, css: str, confirm: bool = False) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    # The topology is drawn anew with every update (every 0.4 s): a button found just
    # before an update is gone by the click. Find it again then.
    deadline = time.monotonic() + 10
    while True:
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
            break
        except StaleElementReferenceException:
            if time.monotonic() > deadline:
                raise
    if confirm:
        WebDriverWait(driver, 10).until(expected_conditions.alert_is_present())
        driver.switch_to.alert.accept()


def _post(driver: Any, kind: str, location: str, sku: str, count: str) -> dict[str, str]:
    """Fill and send one of the forms; the answer box's status and text once it came."""
    prefix = "adj" if kind == "adjustment" else "res"
    driver.execute_script(f"document.getElementById('{prefix}-answer').dataset.status = ''")
    _fill(driver, f"{prefix}-location", location)
    _fill(driver, f"{prefix}-sku", sku)
    _fill(driver, f"{prefix}-count", count)
    _click(driver, f"#{prefix}-submit")
    return dict(
        _until(
            driver,
            """const box = document.getElementById(arguments[0]);
            return box.dataset.status ? {status: box.dataset.status, text: box.textContent}
                                      : null;""",
            f"{prefix}-answer",
        )
    )


ROW = """const row = [...document.querySelectorAll('tr.key')]
    .find((r) => r.dataset.location === arguments[0] && r.dataset.sku === arguments[1]);"""


def test_post_through_the_forms_and_watch_every_side_converge(
    system: System, console: str, browser: Any, tmp_path: Path
) -> None:
    location = f"WEB {uuid.uuid4().hex[:6]}"
    sku = "sku ü%1"  # percent-encoded on its way to every side
    browser.get(console + "/")
    _until(browser, "return document.getElementById('status').dataset.state === 'live'")

    adjusted = _post(browser, "adjustment", location, sku, "100")
    assert adjusted["status"] == "200", adjusted
    assert "inventory_adjustments:" in adjusted["text"]  # the position
    _click(browser, "#res-validate")
    reserved = _post(browser, "reservation", location, sku, "10")
    assert reserved["status"] == "200" and "CONFIRMED" in reserved["text"], reserved

    # Every side shows 90, and the row turns green.
    cells = _until(
        browser,
        ROW
        + """if (!row || row.dataset.agree !== 'true') return null;
        const cells = [...row.querySelectorAll('td.cell')];
        return cells.every((c) => c.dataset.count === arguments[2])
            ? cells.map((c) => c.dataset.reader) : null;""",
        location,
        sku,
        "90",
    )
    assert sorted(cells) == sorted(system.readers)
    # The write was chased to every side: the milliseconds each took to show it.
    sides = _until(
        browser,
        """const write = document.querySelector('li.write[data-status="200"]');
        if (!write) return null;
        const sides = [...write.querySelectorAll('.side')];
        return sides.length === arguments[0] && sides.every((s) => s.dataset.ms)
            ? sides.map((s) => [s.dataset.reader, Number(s.dataset.ms)]) : null;""",
        len(system.readers),
    )
    assert sorted(url for url, _ in sides) == sorted(system.readers)

    # A bad count: the mutator's 422, shown next to the field it names.
    refused = _post(browser, "adjustment", location, sku, "0")
    assert refused["status"] == "422", refused
    problem = _until(
        browser,
        """const slot = document.querySelector('.field-error[data-for="adj-count"]');
        const input = document.getElementById('adj-count');
        return slot.textContent && input.classList.contains('invalid')
            ? slot.textContent : null;""",
    )
    assert "must not be zero" in problem

    screenshot = tmp_path / "console.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
    if os.environ.get("SAVE_CONSOLE_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["SAVE_CONSOLE_SCREENSHOT"])


INSTANCE = """const row = [...document.querySelectorAll('tr.instance')]
    .find((r) => r.dataset.url === arguments[0]);"""


def test_stop_a_calculator_and_watch_its_partitions_move(
    system: System, console: str, browser: Any, tmp_path: Path
) -> None:
    control = httpx.get(f"{console}/api/control", timeout=10).json()
    assert control["allowed"], control
    # One that local_stack still runs (another test may have replaced one by hand).
    running = [
        s
        for s in control["services"]
        if s["state"] == "running" and s["name"].startswith("calculator-")
    ]
    if len(running) < 1 or len(system.calculators) < 2:
        pytest.skip(f"no calculator of local_stack's own to stop: {control['services']}")
    victim = running[-1]
    victim_url = f"http://127.0.0.1:{victim['port']}"
    survivor_url = next(url for url in system.calculators if url != victim_url)
    every = ",".join(str(p) for p in range(PARTITIONS))
    browser.get(console + "/")
    _until(browser, INSTANCE + "return row && row.dataset.partitions !== '';", victim_url)

    try:
        _click(browser, f'button[data-action="stop"][data-service="{victim["name"]}"]', True)
        # The stopped instance shows as unreachable, and the survivor holds every
        # partition, active, in the topology view.
        _until(
            browser,
            INSTANCE
            + """const survivor = [...document.querySelectorAll('tr.instance')]
                .find((r) => r.dataset.url === arguments[1]);
            return row && row.dataset.reachable === 'false' && survivor
                && survivor.dataset.partitions === arguments[2]
                && survivor.dataset.restoring === '';""",
            victim_url,
            survivor_url,
            every,
        )
        owners = browser.execute_script(
            "return [...document.querySelectorAll('tr[data-partition]')]"
            ".map((r) => [r.dataset.owner, r.dataset.state]);"
        )
        assert len(owners) == PARTITIONS and len({owner for owner, _ in owners}) == 1
        assert {state for _, state in owners} == {"active"}
        browser.save_screenshot(str(tmp_path / "console-stopped.png"))

        _click(browser, f'button[data-action="start"][data-service="{victim["name"]}"]', True)
        # Back: it answers, and the group gives it a share again.
        _until(
            browser,
            INSTANCE
            + """return row && row.dataset.reachable === 'true' && row.dataset.partitions !== ''
                && row.dataset.restoring === '';""",
            victim_url,
        )
    finally:
        _restore(system, console, victim["name"], victim_url)


def _restore(system: System, console: str, name: str, url: str) -> None:
    """Leave the calculator running and ready, as the tests after this one expect, and
    note its new process where they look for it."""
    state = _service(console, name)
    if state["state"] != "running":
        httpx.post(f"{console}/api/control/{name}/start", json={}, timeout=60)
    wait_until(lambda: httpx.get(f"{url}/health/ready").status_code == 200, timeout=120)
    pid = _service(console, name)["pid"]
    if name in system.services and pid is not None:
        system.services[name] = dataclasses.replace(system.services[name], pid=pid)


def _service(console: str, name: str) -> dict[str, Any]:
    services = httpx.get(f"{console}/api/control", timeout=10).json()["services"]
    return dict(next(s for s in services if s["name"] == name))
