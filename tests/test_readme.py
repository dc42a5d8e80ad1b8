"""`make run`'s stack comes up, prints a working credential, runs the README's examples, stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, Service, free_port

README = (ROOT / "README.md").read_text()


def attendee_blocks(language: str) -> list[str]:
    section = README.split("## Use it as an attendee", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, int, dict[str, str]]]:
    folder = tmp_path_factory.mktemp("run")
    port, table_port, sim_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "ORGANIZER_", "IDENTITY_"))}
    env.update(PROXY_PORT=str(port), AZURITE_TABLE_PORT=str(table_port), SIMULATOR_PORT=str(sim_port))
    args = [sys.executable, "-m", "devtools.run", "--settings-file", str(folder / "local.settings.json")]
    service = Service([*args, "--data-dir", str(folder / "azurite"), "--no-func"], "Ctrl-C stops everything", env)
    yield service, port, env
    service.stop(signal.SIGINT)


def test_make_run_prints_a_working_credential(stack: tuple[Service, int, dict[str, str]]) -> None:
    service, port, _ = stack
    assert "Demo event credential:  DEMO-EVENT/alice" in service.text
    assert f"http://localhost:{port}/api" in service.text


@pytest.mark.parametrize("index", range(len(attendee_blocks("python"))))
def test_readme_python_examples_run(stack: tuple[Service, int, dict[str, str]], index: int, tmp_path: Path) -> None:
    _, port, env = stack
    code = attendee_blocks("python")[index].replace("localhost:7071", f"localhost:{port}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_readme_curl_examples_run(stack: tuple[Service, int, dict[str, str]]) -> None:
    _, port, env = stack
    for block in attendee_blocks("bash"):
        script = "set -euo pipefail\n" + block.replace("localhost:7071", f"localhost:{port}")
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        assert '"error"' not in result.stdout and '"chat.completion"' in result.stdout


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port, table_port, sim_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "PROXY_PORT": str(port),
        "AZURITE_TABLE_PORT": str(table_port),
        "SIMULATOR_PORT": str(sim_port),
    }
    env.pop("AZURE_OPENAI_ENDPOINT", None)
    args = [sys.executable, "-m", "devtools.run", "--settings-file", str(tmp_path / "s.json"), "--no-func"]
    service = Service([*args, "--data-dir", str(tmp_path / "azurite")], "Ctrl-C stops everything", env)
    assert service.stop(signal.SIGINT) == 0
    for stopped in (port, table_port, sim_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", stopped)) != 0
