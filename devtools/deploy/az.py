"""The ``az`` CLI as ``devtools.deploy`` runs it: a child process, JSON or TSV out, one error type."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class DeployError(Exception):
    """A step failed; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Az:
    """The ``az`` CLI, run as a child process with ``env`` added to this one's environment."""

    executable: str
    cwd: Path = ROOT

    def run(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        command = [self.executable, *args]
        result = subprocess.run(
            command,
            cwd=self.cwd,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise AzFailed(args, result.returncode, result.stderr.strip() or result.stdout.strip())
        return result.stdout

    def json(self, *args: str, env: Mapping[str, str] | None = None) -> Any:
        return json.loads(self.run(*args, "--output", "json", env=env) or "null")

    def text(self, *args: str) -> str:
        return self.run(*args, "--output", "tsv").strip()


class AzFailed(DeployError):
    def __init__(self, args: Sequence[str], code: int, output: str) -> None:
        last = output.splitlines()[-1] if output else f"exit code {code}"
        super().__init__(f"'az {' '.join(args[:3])} ...' failed: {last}")
        self.output = output
