"""Association policy and bad input at the C-STORE SCP, against a real ``ainode run`` process."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from support.dicomgen import ct_series
from support.node import ECHOSCU, NodeProcess, base_config, free_port, storescu, wait_for
from support.node import spool_files as support_spool_files

from node import scu


def associate(node: NodeProcess, calling: str = "MODALITY1", called: str = "AINODE", contexts=(CTImageStorage,),
              handlers=()):
    ae = AE(ae_title=calling)
    for cx in contexts:
        ae.add_requested_context(cx, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    return scu.associate(ae, "127.0.0.1", node.port, ae_title=called, handlers=handlers)


def spool_files(node: NodeProcess) -> list[Path]:
    return support_spool_files(node.storage)


def test_echo_from_configured_peer(node: NodeProcess) -> None:
    r = subprocess.run([ECHOSCU, "-aet", "MODALITY1", "-aec", "AINODE", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    own = node.cli("echo", f"AINODE@127.0.0.1:{node.port}")  # our own AE is no configured peer
    assert own.returncode != 0
    assert "association rejected permanently: Calling AE title not recognised" in own.stdout


def test_unknown_calling_ae_is_rejected_with_the_standard_reason(node: NodeProcess) -> None:
    assoc = associate(node, calling="STRANGER")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    r = subprocess.run([ECHOSCU, "-aet", "STRANGER", "-aec", "AINODE", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr + r.stdout
    wait_for(lambda: "rejected association from STRANGER@127.0.0.1" in node.log_text(), 5)


def test_wrong_called_ae_is_rejected_with_the_standard_reason(node: NodeProcess) -> None:
    assoc = associate(node, called="NOTUS")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
    wait_for(lambda: "called AE 'NOTUS' is not ours" in node.log_text(), 5)
    r = subprocess.run([ECHOSCU, "-aet", "MODALITY1", "-aec", "NOTUS", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Called AE Title Not Recognized" in r.stderr + r.stdout


def test_a_rejection_is_reported_as_one_even_when_it_beats_the_requestor_thread(node: NodeProcess) -> None:
    """pynetdicom marks an association aborted when the RJ arrives and the transport closes before its
    requestor thread looks at the socket (one in six under load).  Holding that thread back makes the race
    certain; node.scu must still report the rejection and its reason, as delivery and ``ainode echo`` rely on it."""
    assoc = associate(node, calling="STRANGER", handlers=[(evt.EVT_REQUESTED, lambda event: time.sleep(0.5))])
    assert assoc.is_rejected and not assoc.is_aborted and not assoc.is_established
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)


@pytest.mark.parametrize("bad_uid", ["1.2.03.4", "1.2..3", "../../etc/passwd", "1." + "2" * 70, ""])
def test_invalid_uid_gets_a_failure_and_nothing_is_written(node: NodeProcess, tmp_path: Path, bad_uid: str) -> None:
    (good,) = ct_series(tmp_path, 1, size=16)
    ds = pydicom.dcmread(good)
    ds.StudyInstanceUID = bad_uid
    before = spool_files(node)
    assoc = associate(node)
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    # the association is still usable afterwards
    (good2,) = ct_series(tmp_path / "ok", 1, size=16)
    ok = assoc.send_c_store(pydicom.dcmread(good2))
    assoc.release()
    assert status.Status == 0xC000 and "invalid StudyInstanceUID" in status.ErrorComment
    assert ok.Status == 0x0000
    after = spool_files(node)
    assert [p for p in after if p not in before] == [
        p for p in after if p.name == f"{pydicom.dcmread(good2).SOPInstanceUID}.dcm"]


def _raw_file(path: Path, sop_uid: str, body: bytes) -> Path:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + buf.getvalue() + body)
    return path


def test_unparsable_dataset_gets_a_failure_and_the_association_carries_on(node: NodeProcess, tmp_path: Path) -> None:
    sop = generate_uid()
    # (0008,0016) UI with a length running far past the end of the data: no parser can read this
    garbage = _raw_file(tmp_path / "garbage.dcm", sop, b"\x08\x00\x16\x00UI\xff\x7f1.2.3" + b"\xde\xad" * 20)
    (good,) = ct_series(tmp_path / "ok", 1, size=16)
    before = spool_files(node)
    assoc = associate(node)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, undecoded
    try:
        bad_status = assoc.send_c_store(garbage)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    ok_status = assoc.send_c_store(pydicom.dcmread(good))
    assoc.release()
    assert bad_status.Status in (0xC000, 0xA900), hex(bad_status.Status)
    assert ok_status.Status == 0x0000
    new = [p for p in spool_files(node) if p not in before]
    assert len(new) == 1 and sop not in new[0].name
    assert node.cli("echo", f"AINODE@127.0.0.1:{node.port}").returncode is not None  # node still alive
    r = subprocess.run([ECHOSCU, "-aet", "MODALITY1", "-aec", "AINODE", "127.0.0.1", str(node.port)])
    assert r.returncode == 0


def test_duplicate_instance_is_stored_once_and_acknowledged(node: NodeProcess, tmp_path: Path) -> None:
    files = ct_series(tmp_path, 3, size=16)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(node.port, files)
    storescu(node.port, files[:2])  # re-send: success again, nothing new stored
    study = node.wait_study(study_uid, ("DONE",))
    assert study["instances"] == 3
    assert len(list((node.storage / "spool" / study_uid).rglob("*.dcm"))) == 3
    assert len(study["jobs"]) == 1, "the same set of instances must not be processed twice"


def test_low_disk_space_answers_out_of_resources_and_leaves_no_file(node_factory, tmp_path: Path) -> None:
    n = node_factory(min_free_disk_mb=10**9)  # no disk has a petabyte free: every store must be refused
    (f,) = ct_series(tmp_path, 1, size=16)
    assoc = associate(n)
    status = assoc.send_c_store(pydicom.dcmread(f))
    assoc.release()
    assert status.Status == 0xA700
    assert spool_files(n) == []
    assert "insufficient disk space" in status.ErrorComment
    wait_for(lambda: "node.min_free_disk_mb" in n.log_text(), 5)


# ------------------------------------------------------------------------------------------------ TLS
def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                                           serialization.NoEncryption()))
    return path.with_suffix(".key"), path.with_suffix(".crt")


def test_tls_with_client_certificates_from_a_throwaway_ca(node_factory, tmp_path: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("ainode test CA", ca_key, None, ca_key, ca=True)
    (tmp_path / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    keys = {}
    for who in ("server", "client"):
        k = ec.generate_private_key(ec.SECP256R1())
        keys[who] = _write(tmp_path / who, _cert(who, k, ca, ca_key, ca=False), k)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _write(tmp_path / "rogue", _cert("rogue", rogue_key, None, rogue_key, ca=False), rogue_key)
    cfg = base_config(tmp_path / "var", free_port())
    cfg["node"]["tls"] = {"key": str(keys["server"][0]), "cert": str(keys["server"][1]),
                          "ca": str(tmp_path / "ca.crt"), "require_client_cert": True}
    n = node_factory(config=cfg)
    files = ct_series(tmp_path / "ct", 2, size=16)
    tls = ["+tls", str(keys["client"][0]), str(keys["client"][1]), "+cf", str(tmp_path / "ca.crt")]
    storescu(n.port, files, extra=tls)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert n.wait_study(study_uid)["instances"] == 2
    # a client whose certificate no trusted CA signed gets nothing stored
    others = ct_series(tmp_path / "ct2", 1, size=16)
    r = storescu(n.port, others, extra=["+tls", str(rogue[0]), str(rogue[1]), "+cf", str(tmp_path / "ca.crt")],
                 check=False)
    assert r.returncode != 0
    assert not (n.storage / "spool" / str(pydicom.dcmread(others[0]).StudyInstanceUID)).exists()
    # and plain TCP is not spoken on a TLS port
    assert storescu(n.port, others, check=False).returncode != 0
