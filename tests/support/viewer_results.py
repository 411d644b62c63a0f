"""Real result objects for the viewer tests: CT quality, chest X-ray (random-weight model) and echo.

Each scenario runs the real pipeline on real DICOM files and encodes its result with the node's own
writer, so what a viewer is shown is exactly what a PACS would receive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from node.loader import load_study
from node.results import EncodeOptions, encode
from pipelines.base import PipelineResult

from .phantoms import PhantomSpec, write_recons

COMPREHENSIVE = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class Scenario:
    name: str
    sources: list[Path]
    result: PipelineResult
    objects: list[Dataset]

    def of_class(self, uids: set[str] | str) -> list[Dataset]:
        uids = {uids} if isinstance(uids, str) else uids
        return [o for o in self.objects if str(o.SOPClassUID) in uids]

    @property
    def tid1500(self) -> Dataset:
        return self.of_class(COMPREHENSIVE)[0]

    @property
    def narrative(self) -> Dataset:
        return self.of_class(ENHANCED_SR)[0]

    @property
    def scs(self) -> list[Dataset]:
        return self.of_class(SECONDARY_CAPTURE)

    def write(self, directory: Path) -> list[Path]:
        """Sources and result objects as files (sources first), for a PACS upload or dsr2html."""
        directory.mkdir(parents=True, exist_ok=True)
        out = list(self.sources)
        for o in self.objects:
            p = directory / f"{o.SOPInstanceUID}.dcm"
            o.save_as(p, enforce_file_format=True)
            out.append(p)
        return out


def ct_quality(tmp: Path, language: str = "en") -> Scenario:
    from pipelines.ct_quality import CTQualityPipeline

    spec = PhantomSpec(rows=256, cols=256, spacing=1.5, n_slices=6, sigma=20.0)
    series, _ = write_recons(tmp / "ct", spec)
    files = [p for paths in series.values() for p in paths]
    result = CTQualityPipeline().run(load_study(files))
    return Scenario("ct_quality", files, result, encode(result, files, EncodeOptions(language=language)))


def cxr_model_dir(tmp: Path, negative: bool = False) -> Path:
    """The random-weight torchxrayvision import with thresholds that make two labels present, one critical
    (``negative``: thresholds no probability reaches, the most common reading)."""
    from .cxr_models import xrv_model

    d = tmp / ("xrv-negative" if negative else "xrv")
    if negative:
        return xrv_model(d)
    return xrv_model(d, present=("Pneumothorax", "Cardiomegaly"), possible=("Effusion",),
                     critical={"Pneumothorax": 0.0})


def cxr(tmp: Path, language: str = "en", negative: bool = False) -> Scenario:
    from pipelines.cxr import CXRPipeline

    src = Path(get_testdata_file("RG1_UNCR.dcm"))
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = pydicom.uid.generate_uid()  # a study of its own in the PACS
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    # RG1's PixelSpacing is 0\\0, which no viewer can map to millimetres (OHIF draws NaN outlines); a
    # radiograph from a real detector states its spacing (0.171 mm is a common CR plate pitch)
    ds.PixelSpacing = [0.171, 0.171]
    (tmp / "cr").mkdir(parents=True, exist_ok=True)
    path = tmp / "cr" / "rg1.dcm"
    ds.save_as(path)
    opts = {"model": str(cxr_model_dir(tmp, negative)), "allow_unverified_models": True}
    result = CXRPipeline({}).run(load_study([path], options=opts, language=language))
    name = "cxr_negative" if negative else "cxr"
    return Scenario(name, [path], result, encode(result, [path], EncodeOptions(language=language)))


def echo(tmp: Path) -> Scenario:
    from pipelines.echo import EchoPipeline

    spec = PhantomSpec(rows=128, cols=128, spacing=3.0, n_slices=3, sigma=10.0)
    series, _ = write_recons(tmp / "echo", spec, recons=write_recons.__defaults__[0][:1])  # type: ignore[index]
    files = [p for paths in series.values() for p in paths]
    result = EchoPipeline().run(load_study(files, pixels=False))
    return Scenario("echo", files, result, encode(result, files, EncodeOptions()))
