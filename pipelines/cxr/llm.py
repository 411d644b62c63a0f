"""The ``openai`` report backend: any OpenAI-compatible chat-completions server (vLLM, SGLang, Ollama).

A vision-language model (Janus-Pro, Qwen-VL, ...) drafts Findings/Impression from the windowed
image, *grounded* by the classifier's calls, which go in the prompt as the facts to report. Every
failure (connection, timeout, HTTP error, unparseable answer) falls back to the template text so
a study never goes without a draft; the fallback and its cause are recorded in the result.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests
from PIL import Image

from pipelines.base import Narrative
from pipelines.cxr.report import LabelCall

log = logging.getLogger(__name__)

LANG_NAMES = {"en": "English", "zh": "Simplified Chinese (简体中文), as a Chinese radiologist writes"}


@dataclass
class LLMOptions:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "default"
    api_key: str = ""
    #: Name of an environment variable holding the key, so the key need not sit in the config file.
    api_key_env: str = ""
    timeout_s: float = 60.0
    retries: int = 2
    backoff_s: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 800
    image_size: int = 512
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(cls, opts: dict[str, Any] | None) -> LLMOptions:
        opts = dict(opts or {})
        known = {k: opts.pop(k) for k in list(opts) if k in cls.__dataclass_fields__ and k != "extra"}
        return cls(**known, extra=opts)


class LLMFailed(Exception):
    pass


def png_data_url(display: np.ndarray, size: int) -> str:
    """The windowed image (MONOCHROME2 polarity, [0, 1]) as a base64 PNG data URL, longest side ``size``."""
    img = Image.fromarray((np.clip(display, 0, 1) * 255).astype(np.uint8), mode="L")
    img.thumbnail((size, size), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def grounding(calls: list[LabelCall]) -> str:
    lines = []
    for c in sorted(calls, key=lambda c: -c.probability):
        lines.append(f"- {c.concept.en}: {c.band} (probability {c.probability:.2f})"
                     + (" CRITICAL" if c.critical else ""))
    return "\n".join(lines)


def build_messages(calls: list[LabelCall], image_url: str, language: str) -> list[dict[str, Any]]:
    system = ("You are a radiologist drafting a chest radiograph report for review by another radiologist. "
              "Report only what the classifier findings below support; state present findings plainly, "
              "possible findings as possible, and do not invent findings, measurements, laterality or prior "
              "comparisons that are not given. Answer with exactly two sections headed 'Findings:' and "
              "'Impression:'.")
    user_text = (f"Write the report in {LANG_NAMES.get(language, language)}. Keep the section headings "
                 "'Findings:' and 'Impression:' in English.\n"
                 f"Classifier findings (ground truth for this draft):\n{grounding(calls)}")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [
            {"type": "text", "text": user_text},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]},
    ]


_SECTION = re.compile(
    r"(?im)^\s*(?:\*\*|#+\s*)?(findings|impression|所见|印象|影像所见|诊断意见)\s*[:：]?\s*(?:\*\*)?\s*[:：]?")


def parse_sections(text: str) -> Narrative:
    """Split the model's answer at its 'Findings:' / 'Impression:' headings; no headings -> LLMFailed."""
    parts = list(_SECTION.finditer(text))
    if not parts:
        raise LLMFailed("answer has no Findings/Impression headings")
    found: dict[str, str] = {}
    for i, m in enumerate(parts):
        end = parts[i + 1].start() if i + 1 < len(parts) else len(text)
        head = m.group(1).lower()
        key = "findings" if head in ("findings", "所见", "影像所见") else "impression"
        found[key] = text[m.end(): end].strip()
    if not found.get("findings") or not found.get("impression"):
        raise LLMFailed("answer lacks a non-empty Findings or Impression section")
    return Narrative(findings=found["findings"], impression=found["impression"])


def generate(calls: list[LabelCall], display: np.ndarray, language: str, opts: LLMOptions,
             session: requests.Session | None = None) -> tuple[Narrative, dict[str, Any]]:
    """Ask the endpoint; returns (narrative, details) or raises LLMFailed after the retries."""
    url = opts.base_url.rstrip("/") + "/chat/completions"
    body = {"model": opts.model, "messages": build_messages(calls, png_data_url(display, opts.image_size), language),
            "temperature": opts.temperature, "max_tokens": opts.max_tokens, **opts.extra}
    headers = {"Content-Type": "application/json"}
    key = opts.api_key or (os.environ.get(opts.api_key_env, "") if opts.api_key_env else "")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    http = session or requests.Session()
    errors: list[str] = []
    for attempt in range(opts.retries + 1):
        t0 = time.monotonic()
        try:
            r = http.post(url, json=body, headers=headers, timeout=opts.timeout_s)
            if r.status_code >= 400:
                raise LLMFailed(f"HTTP {r.status_code}: {r.text[:200]}")
            data = r.json()
            content = data["choices"][0]["message"]["content"]
            if isinstance(content, list):  # some servers return content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            narrative = parse_sections(str(content))
            return narrative, {"backend": "openai", "model": data.get("model", opts.model), "attempts": attempt + 1,
                               "latency_s": round(time.monotonic() - t0, 3)}
        except requests.Timeout:
            errors.append(f"attempt {attempt + 1}: timed out after {opts.timeout_s:g} s")
        except requests.RequestException as exc:
            errors.append(f"attempt {attempt + 1}: {type(exc).__name__}: {exc}")
        except (LLMFailed, KeyError, IndexError, TypeError, ValueError) as exc:
            errors.append(f"attempt {attempt + 1}: {exc}")
        log.warning("report LLM call failed (%s)", errors[-1])
        if attempt < opts.retries:
            time.sleep(opts.backoff_s * (2 ** attempt))
    raise LLMFailed("; ".join(errors))
