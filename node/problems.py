"""A configuration problem names its key path and the fix; ``ConfigError`` carries all of them at once.

Its own module so that the checks the config calls (``node.pipeline_options``) report problems without
importing the config they check.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))
