"""Hot reload under load: four senders push while the configuration is saved five times through the
console (and once more by SIGHUP). No association is dropped, no instance lost; a sender removed from
the peers finishes its running association and is refused on its next one."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import pydicom
import requests
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from support.dcmtk import echo
from support.dicomgen import ct_series
from support.node import base_config, free_port, storescu, wait_for


def up(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def csrf_of(session: requests.Session, url: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', session.get(url, timeout=30).text)
    assert m
    return m.group(1)


def test_config_saves_under_load_drop_nothing(node_factory, tmp_path: Path) -> None:
    web = free_port()
    cfg = base_config(tmp_path / "var", free_port(), web_port=web)
    cfg["peers"] += [{"ae_title": f"SENDER{i}"} for i in range(1, 5)]
    cfg["routes"][0]["match"] = {"Modality": "MR"}  # CT studies are only stored: the test is about receiving
    node = node_factory(config=cfg)
    base = f"http://127.0.0.1:{web}"
    wait_for(lambda: up(base + "/healthz"), 30, 0.2, "console")

    long_study = ct_series(tmp_path / "long", 60, size=16)
    stop = threading.Event()
    sent: list[tuple[int, list[Path], float]] = []
    failures: list[str] = []
    long_result: dict[str, object] = {}

    def sender(i: int) -> None:
        """Study after study until the saves are done, however long they take on a loaded machine."""
        b = 0
        while not stop.is_set() and b < 200:
            files = ct_series(tmp_path / f"s{i}" / f"b{b}", 6, size=16)
            b += 1
            t0 = time.time()
            r = storescu(node.port, files, aet=f"SENDER{i}", check=False)
            if r.returncode != 0:
                failures.append(f"SENDER{i}: storescu {r.returncode}: {r.stderr[-300:]}")
            else:
                sent.append((i, files, t0))

    def long_sender() -> None:
        ae = AE(ae_title="SENDER4")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
        long_result["established"] = assoc.is_established
        statuses = []
        for f in long_study:
            statuses.append(assoc.send_c_store(pydicom.dcmread(f)).Status)
            time.sleep(0.1)
        assoc.release()
        long_result.update(statuses=statuses, released=assoc.is_released, ended=time.time())

    threads = [threading.Thread(target=sender, args=(i,)) for i in (1, 2, 3)]
    threads.append(threading.Thread(target=long_sender))
    for t in threads:
        t.start()
    s = requests.Session()
    saves = []
    try:
        time.sleep(1.0)
        for n in range(5):
            if n == 2:  # take SENDER4 out while its association is running
                peers = yaml.safe_load(node.config_path.read_text())["peers"]
                idx = [p["ae_title"] for p in peers].index("SENDER4")
                form = {"csrf": csrf_of(s, f"{base}/config/peers/{idx}"), "delete": "yes"}
                r = s.post(f"{base}/config/peers/{idx}", data=form, timeout=60)
            else:
                form = {"csrf": csrf_of(s, f"{base}/config/peers/new"), "ae_title": f"EXTRA{n}"}
                r = s.post(f"{base}/config/peers/new", data=form, timeout=60)
            assert r.status_code == 200 and "reloaded" in r.text, r.text[-1500:]
            saves.append(time.time())
    finally:
        stop.set()
        for t in threads:
            t.join(180)

    assert not failures, failures
    assert long_result.get("established") and long_result.get("released"), long_result
    assert long_result["statuses"] == [0] * 60, "the running association finishes under the old config"
    assert long_result["ended"] > saves[2], "SENDER4 was removed while its association was running"
    assert any(t0 < saves[-1] for _, _, t0 in sent) and any(t0 > saves[0] for _, _, t0 in sent), \
        "saves happened while senders were pushing"
    assert len(sent) >= 6

    # nothing lost: every study holds every instance it was sent
    def counts() -> dict[str, int]:
        return {x["study_uid"]: x["instances"] for x in node.status()}

    expected = {str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID): len(files)
                for _, files, _ in sent}
    expected[str(pydicom.dcmread(long_study[0], stop_before_pixels=True).StudyInstanceUID)] = 60
    got = counts()
    assert {k: got.get(k) for k in expected} == expected

    # new associations use the new configuration
    assert echo(node.port, "AINODE", calling_aet="EXTRA4")
    assert not echo(node.port, "AINODE", calling_aet="SENDER4")

    # kill -HUP does the same from the shell
    data = yaml.safe_load(node.config_path.read_text())
    data["peers"].append({"ae_title": "BYHUP"})
    node.config_path.write_text(yaml.safe_dump(data))
    assert not echo(node.port, "AINODE", calling_aet="BYHUP")
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: echo(node.port, "AINODE", calling_aet="BYHUP"), 20, 0.5, "SIGHUP reload")
    assert node.proc.poll() is None
    node.config_path.write_text("peers: [{ae_title: BROKEN, port: 99999}]\n")
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in node.log_text(), 20, 0.5, "refused reload logged")
    assert echo(node.port, "AINODE", calling_aet="BYHUP"), "a bad file changes nothing"
