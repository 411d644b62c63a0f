"""The console as IT staff use it, in headless Chromium over the DevTools protocol, against a real node,
real storescp destinations and the real config file. Screenshots land in the test's tmp dir."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import yaml
from support.browser import Browser
from support.dcmtk import StoreSCP
from support.dicomgen import copy_with_new_uids, sample_file
from support.node import base_config, free_port, storescu, wait_for

from node.web.auth import hash_password


@pytest.fixture
def browser(tmp_path: Path):
    b = Browser(tmp_path / "chromium")
    yield b
    b.close()


def test_console_in_a_browser(node_factory, browser: Browser, tmp_path: Path) -> None:
    shots = tmp_path / "screens"
    archive = StoreSCP(tmp_path / "archive", aet="ARCHIVE").start()
    moved = StoreSCP(tmp_path / "archive-moved", aet="ARCHIVE").start()  # where the destination moves to
    try:
        web = free_port()
        cfg = base_config(tmp_path / "var", free_port(), web_port=web,
                          outbox_audit_hours=1)  # delivered results stay re-sendable for an hour
        cfg["destinations"] = [{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}]
        cfg["delivery"] = {"retry_base_seconds": 1, "retry_max_delay_seconds": 2, "poll_seconds": 0.5}
        cfg["routes"] = [{"name": "chest", "match": {"Modality": ["CR"]}, "pipelines": ["finder"],
                          "destinations": ["archive"], "complete_on": "release"}]
        cfg["console"] = {"users": [{"name": "ada", "role": "admin", "password_hash": hash_password("ada-pw")},
                                    {"name": "vic", "role": "viewer", "password_hash": hash_password("vic-pw")}]}
        node = node_factory(config=cfg, start=False)
        node.config_path.write_text("# site config: edited by hand and by the console\n"
                                    + node.config_path.read_text())
        node.start()
        cr = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / "cr.dcm")
        uid = str(pydicom.dcmread(cr, stop_before_pixels=True).StudyInstanceUID)
        storescu(node.port, [cr])
        wait_for(lambda: (s := node.study(uid)) and s.get("delivered"), 240, 0.5, "results delivered")
        first = sorted(archive.sop_uids())
        assert len(first) == 4
        base = f"http://127.0.0.1:{web}"

        # log in (the console asks, since users are configured)
        browser.goto(base + "/")
        assert browser.url.startswith(base + "/login")
        browser.fill("#name", "ada")
        browser.fill("#password", "ada-pw")
        browser.click("#login")
        assert "Dashboard" in browser.text("h1") and uid in browser.text("#studies")
        browser.screenshot(shots / "01-dashboard.png")

        # find the study and open its timeline
        browser.goto(base + "/studies")
        browser.fill("#q", uid[:30])
        browser.click("#search")
        assert uid in browser.text("#studies")
        browser.click(f"a[href='/studies/{uid}']")
        timeline = browser.text("#timeline")
        for step in ("first instance received", "complete", "finder", "queued", "started", "done",
                     "4 result object(s) delivered to archive"):
            assert step in timeline, (step, timeline)
        browser.screenshot(shots / "02-timeline.png")

        # a POST without the CSRF token is refused, even from the logged-in admin's own page
        assert browser.post("/actions/rerun", {"study_uid": uid}) == 403
        assert browser.post("/config/echo", {"section": "destinations", "name": "archive"}) == 403

        # re-send a result: confirmed, then it arrives at the real storescp again
        browser.click("#resend")
        assert "Send the result objects of job" in browser.text("#confirm-text")
        browser.screenshot(shots / "03-confirm.png")
        browser.click("#confirm")
        assert "4 result object(s) will be sent to archive" in browser.text("#msg")
        wait_for(lambda: len(archive.files()) == 8, 60, 0.3, "re-sent objects at storescp")
        assert sorted(archive.sop_uids()) == sorted(first * 2)

        # edit the destination's port with a mistake: error at the field, nothing saved
        before = node.config_path.read_bytes()
        browser.goto(base + "/config")
        browser.click("#edit-destinations-0")
        browser.fill("#f-port", "99999")
        browser.click("#save")
        assert "out of range" in browser.text("#err-port"), browser.text()
        assert browser.exists("#f-port.invalid") and browser.js("document.querySelector('#f-port').value") == "99999"
        browser.screenshot(shots / "04-port-error.png")
        assert node.config_path.read_bytes() == before
        assert not node.config_path.with_name(node.config_path.name + ".prev").exists()

        # fix it, save: written atomically, previous kept, comment kept, reloaded without a restart
        browser.fill("#f-port", str(moved.port))
        browser.click("#save")
        assert "saved destinations[0] and reloaded" in browser.text("#msg"), browser.text()
        saved = yaml.safe_load(node.config_path.read_text())
        assert saved["destinations"][0]["port"] == moved.port
        assert node.config_path.read_text().startswith("# site config")
        assert node.config_path.with_name(node.config_path.name + ".prev").read_bytes() == before

        # C-ECHO the destination where it now is
        browser.click("#echo-destinations-0")
        assert f"C-ECHO ARCHIVE@127.0.0.1:{moved.port}: success" in browser.text("#msg"), browser.text("#msg")
        browser.screenshot(shots / "05-config-saved-echo.png")

        # the reloaded destination is used by the next delivery, with no restart
        browser.goto(f"{base}/studies/{uid}")
        browser.click("#resend")
        browser.click("#confirm")
        wait_for(lambda: len(moved.files()) == 4, 60, 0.3, "re-send to the moved destination")
        assert sorted(moved.sop_uids()) == first

        browser.goto(base + "/audit")
        audit = browser.text("#audit")
        for what in ("login", "resend", "config-destinations", "invalid", "saved", "c-echo", "csrf-refused"):
            assert what in audit, what
        browser.screenshot(shots / "06-audit.png")
        browser.click("#logout")

        # a viewer sees everything and can do none of it
        browser.fill("#name", "vic")
        browser.fill("#password", "vic-pw")
        browser.click("#login")
        browser.goto(f"{base}/studies/{uid}")
        assert uid in browser.text("#study-uid") and not browser.exists("#resend") and not browser.exists("#rerun")
        csrf = browser.js("document.querySelector('input[name=csrf]').value")
        assert browser.post("/actions/resend", {"csrf": csrf, "study_uid": uid, "job_id": "x",
                                                "destination": "archive", "confirmed": "yes"}) == 403
        assert browser.post("/config/destinations/0", {"csrf": csrf, "name": "archive", "port": "1"}) == 403
        assert browser.post("/config/echo", {"csrf": csrf, "section": "destinations", "name": "archive"}) == 403
        browser.goto(base + "/config")
        assert not browser.exists("#edit-destinations-0") and not browser.exists("#echo-destinations-0")
        browser.goto(base + "/config/destinations/0")
        assert "this needs the admin role" in browser.text()
        browser.screenshot(shots / "07-viewer-refused.png")
        assert yaml.safe_load(node.config_path.read_text())["destinations"][0]["port"] == moved.port
        assert len(moved.files()) == 4 and len(archive.files()) == 8
    finally:
        archive.stop()
        moved.stop()
