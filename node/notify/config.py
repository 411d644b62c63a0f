"""The ``notify:`` section: webhook and HL7 channels, validated where the config is read."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChannelBase(Strict):
    name: str = Field(min_length=1, max_length=64)
    enabled: bool = True
    #: Send events produced by models whose manifest says ``verified: false`` (they are marked UNVERIFIED).
    include_unverified: bool = True
    timeout_s: float = Field(10.0, gt=0, le=300)
    max_attempts: int = Field(20, ge=1, le=1000)
    max_hours: float = Field(24.0, gt=0)
    backoff_base_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)
    #: Fraction of each delay drawn at random, so channels that failed together do not retry in lock-step.
    jitter: float = Field(0.25, ge=0, le=1)


class WebhookChannel(ChannelBase):
    """POST JSON to ``url``; signed with HMAC-SHA256 when a secret is configured."""

    kind: Literal["webhook"]
    url: str
    secret: str | None = None
    #: Read the secret from this environment variable instead of keeping it in the config file.
    secret_env: str | None = None
    headers: dict[str, str] = {}
    verify_tls: bool = True
    #: CA bundle (PEM) for an https endpoint signed by the hospital's own CA.
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> WebhookChannel:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url {self.url!r} must start with http:// or https://")
        if self.secret and self.secret_env:
            raise ValueError("give secret or secret_env, not both")
        return self

    def resolved_secret(self) -> str | None:
        if self.secret_env:
            value = os.environ.get(self.secret_env)
            if not value:
                raise RuntimeError(f"environment variable {self.secret_env} (secret_env of channel "
                                   f"{self.name!r}) is not set")
            return value
        return self.secret


class HL7Channel(ChannelBase):
    """HL7 v2.5 ORU^R01 over MLLP to a RIS / EMR / interface engine, waiting for the ACK."""

    kind: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "AINODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: Literal["P", "T", "D"] = "P"
    #: OBR-4 universal service identifier as code, text, coding system.
    service_code: str = "18748-4"
    service_text: str = "Diagnostic imaging study"
    service_scheme: str = "LN"
    #: Where the accession number goes: OBR-2 placer order number, OBR-3 filler order number, or both.
    accession_in: Literal["placer", "filler", "both"] = "both"
    #: Issuer (assigning authority) for PID-3 when the study has no IssuerOfPatientID.
    patient_id_authority: str = ""
    #: AR (application reject) means the receiver will never take this message; retrying is usually pointless.
    retry_on_reject: bool = False
    encoding: str = "utf-8"
    #: MLLP over TLS ("MLLP/S"): verify the receiver against ``ca_file`` (or the system CAs), optionally
    #: present a client certificate.
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        ctx.check_hostname = self.check_hostname
        if self.cert_file:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return ctx


ChannelConfig = Annotated[WebhookChannel | HL7Channel, Field(discriminator="kind")]


class NotifyConfig(Strict):
    """The ``notify:`` section of the node config."""

    enabled: bool = True
    channels: list[ChannelConfig] = []
    #: How often the background thread looks for due retries when nothing wakes it.
    poll_interval_s: float = Field(2.0, gt=0, le=300)
    #: ``study``: one notification per study, finding and model, however often the study is re-processed;
    #: ``job``: one per processing job (a re-sent series pages again).
    dedupe: Literal["study", "job"] = "study"

    @model_validator(mode="after")
    def _unique(self) -> NotifyConfig:
        names = [c.name for c in self.channels]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate notify channel names {dupes}; give each channel a unique name")
        return self
