"""Operator views of a running mesh (real agents on the test bed): `nodemesh posture` against the
admin endpoint, and the live flow map in a headless browser."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prereq import require_tool, requires
from support.agents import BACKEND
from support.agents import live_mesh as live_agents

from agent.cli import main
from agent.commands.demo import _run_client
from agent.host import netns
from agent.testbed import Cluster


@dataclass
class Mesh:
    cluster: Cluster
    work: Path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The demo mesh on two nodes with backend:8080 and db:5432 serving."""
    work = tmp_path_factory.mktemp("operator-views")
    with live_agents(work, "operator views e2e",
                     servers=(BACKEND, (1, 0, "db", "5432"))) as live:
        yield Mesh(live.cluster, work)


def test_posture_of_a_running_agent(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    c = mesh.cluster
    assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "x").startswith("OK")
    assert _run_client(c.pod(0, 0), str(c.pod(1, 0).ip), 5432, "x") == "ERR EPERM"
    with netns.entered(c.nodes[0].netns):
        rc = main(["posture", "--json"])  # the default admin address, as an operator runs it
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)
    assert report["source"] == {"kind": "agent", "node": "node0"}
    assert {(f["check"], f["subject"]) for f in report["findings"]} == {
        ("mtls-permissive", "tools"),
        ("open-workload", "shop/frontend"),
        ("open-workload", "tools/debug"),
        ("recent-denies", "shop/frontend -> shop/db:5432"),
    }
    # node0 runs frontend and backend: their certificates, and the embedded CA's root.
    certs = {(x["kind"], x["subject"], x["state"]) for x in report["certificates"]}
    assert ("workload", "spiffe://cluster.local/ns/shop/sa/frontend", "ok") in certs
    assert ("workload", "spiffe://cluster.local/ns/shop/sa/backend", "ok") in certs
    assert [k for k, _, _ in certs].count("root") == 1
    assert report["rate_limits"] == {"supported": True, "in_force": []}  # none configured
    assert report["inventory"]["flows_examined"] >= 2
    with netns.entered(c.nodes[0].netns):
        assert main(["posture", "--admin", "127.0.0.1:15000"]) == 0
    assert "[INFO] 1 connection(s) refused shop/frontend -> shop/db:5432" in \
        capsys.readouterr().out


def _browser(tmp: Path) -> object:
    """Headless Debian chromium driven by Debian's chromedriver (no downloads: Selenium Manager
    is not consulted when both paths are given)."""
    requires(importlib.util.find_spec("selenium") is not None,
             "needs selenium (pip install -e '.[dev]')")
    from selenium import webdriver  # noqa: PLC0415  # optional dev dependency
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    opts = webdriver.ChromeOptions()
    opts.binary_location = require_tool("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1300", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp / 'chromium-profile'}"):
        opts.add_argument(arg)
    service = Service(executable_path=require_tool("chromedriver"),
                      log_output=str(tmp / "chromedriver.log"))
    return webdriver.Chrome(options=opts, service=service)


def test_flow_map_in_a_headless_browser(mesh: Mesh) -> None:
    """The page shows the workloads, then an allowed and a denied edge appear live as traffic
    flows; the table filters. Screenshot: <tmp>/flowmap.png (path printed)."""
    from selenium.common.exceptions import StaleElementReferenceException  # noqa: PLC0415
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: PLC0415

    c, work = mesh.cluster, mesh.work
    # The browser runs in node0's netns (the admin endpoint is localhost-only there): every
    # Selenium call goes through a socket to chromedriver made in that netns.
    with netns.entered(c.nodes[0].netns):
        driver = _browser(work)
        try:
            # The page re-renders the map as flows arrive: an element read mid-render is stale,
            # and the wait reads it again.
            wait = WebDriverWait(driver, 60,  # type: ignore[arg-type]
                                 ignored_exceptions=(StaleElementReferenceException,))
            driver.get("http://127.0.0.1:15000/ui/")  # type: ignore[attr-defined]

            def workloads(d: object) -> set[str]:
                return {e.get_attribute("data-workload")
                        for e in d.find_elements(By.CSS_SELECTOR, "#map .wl")}  # type: ignore[attr-defined]

            wait.until(lambda d: {"shop/frontend", "shop/backend", "shop/db",
                                  "tools/debug"} <= workloads(d))
            wait.until(lambda d: d.find_element(By.ID, "status").text == "live")
            before = len(driver.find_elements(By.CSS_SELECTOR, "#flows tbody tr"))  # type: ignore[attr-defined]
            # Live traffic after the page is up: two allowed, one denied.
            for _ in range(2):
                assert _run_client(c.pod(0, 0), str(c.pod(0, 1).ip), 8080, "map").startswith("OK")
            assert _run_client(c.pod(0, 0), str(c.pod(1, 0).ip), 5432, "map") == "ERR EPERM"

            def edge(d: object, pair: str, kind: str) -> int:
                found = d.find_elements(  # type: ignore[attr-defined]
                    By.CSS_SELECTOR, f'#map .edge[data-edge="{pair}"][data-kind="{kind}"]')
                return int(found[0].get_attribute("data-count")) if found else 0

            wait.until(lambda d: edge(d, "shop/frontend>shop/backend", "allowed") >= 2)
            wait.until(lambda d: edge(d, "shop/frontend>shop/db", "denied") >= 1)
            # Counts are per connection: the destination's copy of a local connection is not
            # counted again (the posture test's earlier traffic may add to the same edges).
            allowed = driver.find_element(  # type: ignore[attr-defined]
                By.CSS_SELECTOR, '#map .edge[data-edge="shop/frontend>shop/backend"] text')
            assert allowed.text.endswith(":8080")
            rows = driver.find_elements(By.CSS_SELECTOR, "#flows tbody tr")  # type: ignore[attr-defined]
            assert len(rows) > before

            driver.find_element(By.ID, "filter").send_keys("shop/db")  # type: ignore[attr-defined]
            Select(driver.find_element(By.ID, "verdict")).select_by_value("denied")  # type: ignore[attr-defined]
            visible = [r.text for r in driver.find_elements(  # type: ignore[attr-defined]
                By.CSS_SELECTOR, "#flows tbody tr") if r.is_displayed()]
            assert visible and all("shop/db" in t and "denied" in t for t in visible), visible
            assert "shown" in driver.find_element(By.ID, "shown").text  # type: ignore[attr-defined]
            hidden = [r for r in driver.find_elements(  # type: ignore[attr-defined]
                By.CSS_SELECTOR, "#flows tbody tr") if not r.is_displayed()]
            assert hidden  # the allowed frontend -> backend rows are filtered out
            # Clear the filter for the screenshot, so the map and a full table show.
            driver.find_element(By.ID, "filter").clear()  # type: ignore[attr-defined]
            Select(driver.find_element(By.ID, "verdict")).select_by_value("")  # type: ignore[attr-defined]
            shot = work / "flowmap.png"
            assert driver.save_screenshot(str(shot))  # type: ignore[attr-defined]
            print(f"flow map screenshot: {shot}")
        finally:
            driver.quit()  # type: ignore[attr-defined]
