"""Routing rules on DICOM tags, `ainode route test`, and what happens to studies no rule wants."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from support.dicomgen import copy_with_new_uids, ct_series, sample_file
from support.node import base_config, free_port, storescu, wait_for

from node.config import RouteConfig
from node.routing import matches, route

ROOT = Path(__file__).resolve().parent.parent


def R(name: str, match: dict, cont: bool = False) -> RouteConfig:
    return RouteConfig.model_validate({"name": name, "match": match, "pipelines": ["echo"], "continue": cont})


@pytest.mark.parametrize("cond, tags, expected", [
    ({"Modality": "CT"}, {"Modality": "CT"}, True),
    ({"Modality": "ct"}, {"Modality": "CT"}, True),  # code strings compare case-insensitively
    ({"Modality": "CT"}, {"Modality": "MR"}, False),
    ({"Modality": ["CR", "DX"]}, {"Modality": "DX"}, True),
    ({"Modality": ["CR", "DX"]}, {"Modality": "CT"}, False),
    ({"BodyPartExamined": {"regex": "CHEST|THORAX"}}, {"BodyPartExamined": "THORAX"}, True),
    ({"BodyPartExamined": {"regex": "CHEST|THORAX"}}, {"BodyPartExamined": "ABDOMEN"}, False),
    ({"BodyPartExamined": {"regex": "CHEST"}}, {}, False),  # a missing tag never matches
    ({"SliceThickness": {"min": 0.5, "max": 2.5}}, {"SliceThickness": "1.25"}, True),
    ({"SliceThickness": {"min": 0.5, "max": 2.5}}, {"SliceThickness": "5"}, False),
    ({"SliceThickness": {"max": 2.5}}, {"SliceThickness": "not a number"}, False),
    ({"ImageType": {"regex": "^LOCALIZER$"}}, {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, True),
    ({"ImageType": "AXIAL"}, {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}, True),
    ({"calling_ae": "MODALITY1"}, {"calling_ae": ["MODALITY1"]}, True),
    ({"calling_ae": "MODALITY1"}, {"calling_ae": ["OTHER"]}, False),
    ({"Modality": "CT", "called_ae": "AINODE"}, {"Modality": "CT", "called_ae": "AINODE"}, True),
])
def test_conditions(cond: dict, tags: dict, expected: bool) -> None:
    assert matches(cond, tags) is expected


def test_first_match_wins_unless_continue() -> None:
    chest = R("chest", {"Modality": "CR"})
    also = R("any-xr", {"Modality": ["CR", "DX"]})
    series = [{"Modality": "CR"}]
    assert [r.name for r in route([chest, also], series).routes] == ["chest"]
    chest_cont = R("chest", {"Modality": "CR"}, cont=True)
    assert [r.name for r in route([chest_cont, also], series).routes] == ["chest", "any-xr"]
    assert route([chest, also], [{"Modality": "CT"}]).routes == []


def test_a_study_matches_when_any_of_its_series_does() -> None:
    ct = R("ct", {"Modality": "CT", "ImageType": {"regex": "AXIAL"}})
    assert route([ct], [{"Modality": "SR"}, {"Modality": "CT", "ImageType": ["ORIGINAL", "AXIAL"]}]).routes
    assert not route([ct], [{"Modality": "SR"}, {"Modality": "CT", "ImageType": ["LOCALIZER"]}]).routes


def test_route_test_command_prints_the_matching_rule(tmp_path: Path) -> None:
    cfg = {"routes": [
        {"name": "chest-xray", "match": {"Modality": ["CR", "DX"], "BodyPartExamined": {"regex": "CHEST|THORAX"}},
         "pipelines": ["echo"]},
        {"name": "ct-abdomen", "match": {"Modality": "CT", "BodyPartExamined": "ABDOMEN"}, "pipelines": ["echo"]}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cr = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / "in" / "cr.dcm")  # CR, BodyPart CHEST
    ct_series(tmp_path / "in" / "ct", 2, size=16)
    ct_series(tmp_path / "in" / "head", 1, size=16, body_part="HEAD")
    r = subprocess.run([sys.executable, "-m", "node.cli", "route", "test", "--config", str(tmp_path / "c.yaml"),
                        str(tmp_path / "in")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cr_uid = str(pydicom.dcmread(cr, stop_before_pixels=True).StudyInstanceUID)
    line = {ln.split(":")[0]: ln for ln in r.stdout.splitlines() if not ln.startswith(" ")}
    assert "chest-xray -> echo" in line[cr_uid]
    assert sum("ct-abdomen -> echo" in v for v in line.values()) == 1
    assert sum(v.endswith("no route") for v in line.values()) == 1


def test_unrouted_study_is_recorded_as_no_route_and_purged_after_retention(node_factory, tmp_path: Path) -> None:
    cfg = base_config(tmp_path / "var", free_port(), no_route_retention_hours=0, housekeeping_seconds=1)
    cfg["routes"] = [{"name": "mr-only", "match": {"Modality": "MR"}, "pipelines": ["probe"]}]
    node = node_factory(config=cfg)
    files = ct_series(tmp_path / "ct", 2, size=16)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(node.port, files)
    s = node.wait_study(uid, ("NO_ROUTE", "PURGED"))
    assert s["jobs"] == [] and s["route"] is None
    # retention 0 h: the next housekeeping pass deletes the instances
    wait_for(lambda: not (node.storage / "spool" / uid).exists(), 20, 0.3, "spool purged")
    assert node.study(uid)["state"] == "PURGED"
