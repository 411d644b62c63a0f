"""STOW-RS to a DICOMweb destination."""


from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset

from node.config import DestinationConfig
from node.delivery.model import Item, Outcome, Record, all_outcomes, is_transient_status, status_text


@dataclass
class StowSender:
    """STOW-RS via dicomweb-client; one multipart POST per batch (per study, as STOW URLs are per study)."""

    timeout: float = 60.0
    max_per_request: int = 50

    def send(self, dest: DestinationConfig, items: Sequence[Item], record: Record | None = None) -> dict[int, Outcome]:
        import requests
        from dicomweb_client.api import DICOMwebClient

        headers = {"Authorization": f"Bearer {dest.bearer_token}"} if dest.bearer_token else None
        session = requests.Session()
        if dest.tls:  # HTTPS with a client certificate, verified against the configured CA
            session.cert = (str(dest.tls.cert), str(dest.tls.key))
            session.verify = str(dest.tls.ca) if dest.tls.ca else True
        client = DICOMwebClient(url=str(dest.url).rstrip("/"), session=session, headers=headers, timeout=self.timeout)
        client.set_http_retry_params(retry=False)  # our schedule, not theirs, survives restarts
        out: dict[int, Outcome] = {}
        by_study: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            by_study[it.study_uid].append(it)
        for study_uid, group in by_study.items():
            for start in range(0, len(group), self.max_per_request):
                chunk = group[start:start + self.max_per_request]
                datasets: list[Dataset] = []
                readable: list[Item] = []
                for it in chunk:
                    try:
                        datasets.append(dcmread(it.path))
                        readable.append(it)
                    except Exception as exc:
                        out[it.id] = Outcome("permanent", f"cannot read outbox file {it.path}: {exc}")
                if not readable:
                    continue
                try:
                    rsp = client.store_instances(datasets, study_instance_uid=study_uid)
                except requests.HTTPError as exc:
                    code = exc.response.status_code if exc.response is not None else 0
                    transient = code >= 500 or code in (408, 429) or code == 0
                    out.update(all_outcomes(readable, Outcome("transient" if transient else "permanent",
                                                      f"STOW-RS to {dest.url} failed: HTTP {code}")))
                    continue
                except (requests.RequestException, OSError) as exc:
                    out.update(all_outcomes(readable, Outcome("transient", f"STOW-RS to {dest.url} failed: {exc}")))
                    continue
                failed = {str(x.ReferencedSOPInstanceUID): int(getattr(x, "FailureReason", 0x0110))
                          for x in getattr(rsp, "FailedSOPSequence", [])}
                for it in readable:
                    if it.sop_uid in failed:
                        code = failed[it.sop_uid]
                        out[it.id] = Outcome("transient" if is_transient_status(code) else "permanent",
                                             f"STOW-RS refused {it.sop_uid}: failure reason 0x{code:04X} "
                                             f"({status_text(code)})")
                    else:
                        out[it.id] = Outcome("sent")
                if record is not None:
                    record(out)
        return out
