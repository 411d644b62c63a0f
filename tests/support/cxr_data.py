"""Real radiographs as DICOM the way they reach a node without tags, and the images a chest check must refuse.

The NIH ChestX-ray14 sample (``shared/data/nih-cxr-frontal-dev``: 8-bit PNG, no tags) is wrapped
as DX and as CR MONOCHROME2 with no BodyPartExamined, ViewPosition or window, and as CR MONOCHROME1
with the pixels inverted (what a plate reader stores). Negatives come from pydicom-data: CT and MR
slices, ultrasound (greyscale, and colour turned grey), colour secondary captures, the RG3 extremity
radiograph and left-right-cropped half chests, all relabelled DX with their telling tags removed so
that only the image can refuse them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[2]
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
FORMS = ("DX", "CR", "CR-MONOCHROME1")
#: Tags that tell a pipeline what an image is; stripped so the image alone decides.
TELLING_TAGS = ("BodyPartExamined", "ViewPosition", "ViewCodeSequence", "SeriesDescription", "ProtocolName",
                "StudyDescription", "AcquisitionDeviceProcessingDescription", "ImageLaterality", "Laterality",
                "PatientOrientation", "ImageType")


def dev_dir() -> Path:
    """The 156 dev radiographs: ``$AINODE_CXR_DEV_DIR`` or ``shared/data/nih-cxr-frontal-dev`` beside the repo."""
    env = os.environ.get("AINODE_CXR_DEV_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "nih-cxr-frontal-dev"


def dev_images() -> list[Path]:
    return sorted(dev_dir().glob("*.png"))


def read_png(path: Path) -> np.ndarray:
    """8-bit greyscale as PIL reads it (RGBA files drop alpha, as ``convert('RGB')`` would)."""
    im = Image.open(path)
    return np.asarray(im.convert("L") if im.mode != "L" else im, dtype=np.uint8)


def _base(rows: int, cols: int, sop_class: str, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Chest", "CXR-DEV", "", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.Manufacturer = "ainode-test"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    return ds


def wrap(pixels: np.ndarray, form: str = "DX", bits: int | None = None) -> Dataset:
    """Greyscale pixels (uint8/uint16, MONOCHROME2 sense) as a tagless DX/CR instance; ``CR-MONOCHROME1`` inverts."""
    px = np.asarray(pixels)
    bits = bits or (8 if px.dtype == np.uint8 else 16)
    modality = "DX" if form == "DX" else "CR"
    ds = _base(px.shape[0], px.shape[1], DX_STORAGE if modality == "DX" else CR_STORAGE, modality)
    if form == "CR-MONOCHROME1":
        px = (2 ** bits - 1) - px.astype(np.int64)
        ds.PhotometricInterpretation = "MONOCHROME1"
    else:
        ds.PhotometricInterpretation = "MONOCHROME2"
    alloc = 8 if bits <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = alloc, bits, bits - 1, 0
    if modality == "DX":
        ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["DERIVED", "SECONDARY"]
    ds.PixelData = px.astype(np.uint8 if alloc == 8 else np.uint16).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dev_files(directory: Path, forms: tuple[str, ...] = FORMS, images: list[Path] | None = None
              ) -> Iterator[tuple[str, str, Path]]:
    """(image name, form, written DICOM path) for every dev image in every form."""
    for png in images if images is not None else dev_images():
        px = read_png(png)
        for form in forms:
            yield png.name, form, save(wrap(px, form), directory / form / f"{png.stem}.dcm")


def _relabel(src: str | Path, keep_window: bool = True) -> Dataset:
    """A pydicom-data instance as a tagless DX: new UIDs, telling tags removed, pixels as stored."""
    ds = pydicom.dcmread(src)
    for kw in TELLING_TAGS + (() if keep_window else ("WindowCenter", "WindowWidth", "VOILUTSequence")):
        if kw in ds:
            delattr(ds, kw)
    ds.Modality = "DX"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    return ds


def _grey_from(src: str, frame: int | None = None) -> Dataset:
    """A colour image turned into 8-bit grey (luma) and wrapped as a tagless DX."""
    ds = pydicom.dcmread(get_testdata_file(src))
    arr = ds.pixel_array if frame is None else ds.pixel_array[frame]
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        arr = (arr / max(1, arr.max()) * 255).astype(np.uint8) if arr.dtype != np.uint8 else arr
    elif ds.PhotometricInterpretation.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, ds.PhotometricInterpretation, "RGB")
    grey = (0.299 * arr[..., 0] + 0.587 * arr[..., 1] + 0.114 * arr[..., 2]).astype(np.uint8)
    return wrap(grey, "DX")


def _half_chest(px: np.ndarray, bits: int, form: str = "DX", side: str = "left") -> Dataset:
    half = px[:, : px.shape[1] // 2] if side == "left" else px[:, px.shape[1] // 2:]
    return wrap(np.ascontiguousarray(half), form, bits)


def negatives(directory: Path, dev: list[Path] | None = None) -> list[tuple[str, Path]]:
    """(name, path) of images a chest check must refuse, written under ``directory``."""
    out: list[tuple[str, Dataset]] = []
    for name in ("693_UNCR.dcm", "explicit_VR-UN.dcm", "MR2_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm",
                 "JPGLosslessP14SV1_1s_1f_8b.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm", "mlut_18.dcm"):
        for keep in (True, False):
            ds = _relabel(get_testdata_file(name), keep_window=keep)
            if keep or "WindowCenter" in pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True):
                out.append((f"{name} (DX, no tags{'' if keep else ', no window'})", ds))
    ect = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    out.append(("eCT_Supplemental.dcm frame 1 (DX, no tags)", wrap(
        np.clip(ect.pixel_array[0], 0, 4095).astype(np.uint16), "DX", 12)))
    out.append(("US1_UNCR.dcm as grey (DX, no tags)", _grey_from("US1_UNCR.dcm")))
    out.append(("OBXXXX1A.dcm palette US as grey (DX, no tags)", _grey_from("OBXXXX1A.dcm")))
    for name in ("US1_UNCR.dcm", "SC_rgb.dcm", "OBXXXX1A.dcm"):  # colour kept: refused as not greyscale
        out.append((f"{name} colour (relabelled DX)", _relabel(get_testdata_file(name))))
    rg1 = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    for side in ("left", "right"):
        out.append((f"RG1 {side} half (CR MONOCHROME1, no tags)",
                    _half_chest((2 ** 15 - 1) - rg1.pixel_array.astype(np.int64), 15, "CR-MONOCHROME1", side)))
    for png in (dev or dev_images())[:3]:
        out.append((f"{png.stem} left half (DX)", _half_chest(read_png(png), 8, "DX", "left")))
    paths = []
    for i, (name, ds) in enumerate(out):
        paths.append((name, save(ds, directory / f"neg{i:02d}.dcm")))
    return paths
