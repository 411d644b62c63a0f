"""Small, realistic DICOM instances for node tests (CT series, CR), written as real Part 10 files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_series(directory: Path, n: int, size: int = 64, study_uid: str | None = None,
              series_uid: str | None = None, shuffle: bool = True, seed: int = 0,
              images_in_acquisition: bool = False, patient_id: str = "TEST-001",
              body_part: str = "ABDOMEN") -> list[Path]:
    """A CT series with distinct, known pixel values per slice (slope 1, intercept -1024)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = generate_uid()
    paths = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", patient_id, "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC1", "1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "CT", body_part, 2, i + 1
        ds.StudyDescription, ds.SeriesDescription = "CT ABDOMEN", "AXIAL 5MM"
        ds.Manufacturer = "ainode-test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-0.5 * size, -0.5 * size, 5.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 5.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP, ds.WindowCenter, ds.WindowWidth = 120, 40, 400
        if images_in_acquisition:
            ds.ImagesInAcquisition = n
        px = (rng.integers(0, 200, (size, size)) + 10 * i + 900).astype(np.uint16)
        ds.PixelData = px.tobytes()
        p = directory / f"ct_{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    if shuffle:
        random.Random(seed).shuffle(paths)
    return paths


def expected_volume(paths: list[Path]) -> np.ndarray:
    """Independent reference: HU volume sorted by z, straight from pydicom."""
    items = []
    for p in paths:
        ds = pydicom.dcmread(p)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        items.append((float(ds.ImagePositionPatient[2]), hu))
    items.sort(key=lambda t: t[0])
    return np.stack([h for _, h in items])


def copy_with_new_uids(src: str | Path, dst: Path, study_uid: str | None = None) -> Path:
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def sample_file(name: str) -> Path:
    return Path(get_testdata_file(name))
