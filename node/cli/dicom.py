"""``ainode echo | send``: C-ECHO and C-STORE to a peer from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from node.cli.common import load

if TYPE_CHECKING:
    from pynetdicom.association import Association


def _parse_peer(text: str) -> tuple[str, str, int]:
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return ae, host, int(port)
    except ValueError:
        raise SystemExit(f"peer {text!r} must look like AE@HOST:PORT, e.g. PACS@10.0.0.5:104") from None


def _why_not(assoc: Association) -> str:
    """IT staff read this line to decide what to fix: the AE titles, or the network."""
    from node import scu

    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        return f"association rejected {scu.rejection_kind(rj)}ly: {scu.rejection_reason(rj)}"
    if assoc.is_aborted:
        return "association aborted by the peer"
    return "could not connect"


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from node import scu

    cfg = load(args, semantics=False)
    ae_title, host, port = _parse_peer(args.peer)
    ae = AE(ae_title=cfg.node.ae_title)
    ae.add_requested_context(Verification)
    t0 = time.monotonic()
    assoc = scu.associate(ae, host, port, ae_title=ae_title)
    if not assoc.is_established:
        print(f"echo {ae_title}@{host}:{port}: {_why_not(assoc)}")
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    ok = bool(status) and status.Status == 0
    print(f"echo {ae_title}@{host}:{port}: {'success' if ok else 'failed'} in {1000 * (time.monotonic() - t0):.0f} ms")
    return 0 if ok else 1


def dicom_files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


def cmd_send(args: argparse.Namespace) -> int:
    import pydicom
    from pynetdicom import AE

    from node import scu

    cfg = load(args, semantics=False)
    ae_title, host, port = _parse_peer(args.to)
    datasets = []
    for f in dicom_files(args.paths):
        try:
            datasets.append((f, pydicom.dcmread(f)))
        except Exception as exc:
            print(f"skip {f}: not DICOM ({exc})", file=sys.stderr)
    ae = AE(ae_title=cfg.node.ae_title)
    for sop, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for _, d in datasets}):
        ae.add_requested_context(sop, [ts])
    assoc = scu.associate(ae, host, port, ae_title=ae_title)
    if not assoc.is_established:
        print(f"send: association with {ae_title}@{host}:{port} failed: {_why_not(assoc)}")
        return 1
    failed = 0
    for f, d in datasets:
        st = assoc.send_c_store(d)
        if not st or st.Status != 0:
            failed += 1
            print(f"send {f}: status 0x{getattr(st, 'Status', 0xFFFF):04X}", file=sys.stderr)
    assoc.release()
    print(f"sent {len(datasets) - failed}/{len(datasets)} to {ae_title}@{host}:{port}")
    return 0 if failed == 0 else 1
