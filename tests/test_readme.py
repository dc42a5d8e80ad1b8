"""`make run`'s stack comes up, prints a working credential, runs the examples of the README and of the
guides in docs/ (Python, JavaScript, curl, the organizer's CLI and HTTP calls), stops on Ctrl-C.

The deploy guide's commands run against a fake ``az`` in tests/test_readme_deploy.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, Service, free_port

README = (ROOT / "README.md").read_text()
GUIDES = {path.stem: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
Stack = tuple[Service, int, dict[str, str], Path]


def section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def blocks(text: str, language: str) -> list[str]:
    return [textwrap.dedent(block) for block in re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)]


def attendee_blocks(language: str) -> list[str]:
    """The front page's quick start, then the attendees' guide."""
    return blocks(section(README, "Use it as an attendee"), language) + blocks(GUIDES["attendees"], language)


def test_the_front_page_is_short_and_links_every_guide() -> None:
    assert len(README.splitlines()) <= 200
    for name in GUIDES:
        assert f"](docs/{name}.md)" in README
    # Its deploy commands are the deploy guide's, which tests/test_readme_deploy.py runs.
    deploy = blocks(section(README, "Run an event"), "bash")[-1]
    assert "make deploy" in deploy and deploy in GUIDES["deploy"]


def test_links_between_guides_reach_a_heading() -> None:
    """Every ``[...](file.md#anchor)`` in the README and the guides names a file and a heading there."""
    pages = {"README.md": README, **{f"docs/{name}.md": text for name, text in GUIDES.items()}}
    anchors = {
        path: {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}
        for path, text in pages.items()
    }
    for path, text in pages.items():
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)(?:#([\w-]+))?\)", text):
            resolved = str((Path(path).parent / target).as_posix()) if target else path
            resolved = resolved.removeprefix("docs/../")
            assert (ROOT / resolved).exists(), f"{path}: {target}"
            if anchor and resolved in anchors:
                assert anchor in anchors[resolved], f"{path}: {target}#{anchor}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, int, dict[str, str], Path]]:
    folder = tmp_path_factory.mktemp("run")
    port, table_port, sim_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "ORGANIZER_", "IDENTITY_"))}
    env.update(PROXY_PORT=str(port), AZURITE_TABLE_PORT=str(table_port), SIMULATOR_PORT=str(sim_port))
    args = [sys.executable, "-m", "devtools.local.run", "--settings-file", str(folder / "local.settings.json")]
    service = Service([*args, "--data-dir", str(folder / "azurite"), "--no-func"], "Ctrl-C stops everything", env)
    yield service, port, env, folder
    service.stop(signal.SIGINT)


def test_make_run_prints_a_working_credential(stack: Stack) -> None:
    service, port, _, _ = stack
    assert "Demo event credential:  DEMO-EVENT/alice" in service.text
    assert f"http://localhost:{port}/api" in service.text


@pytest.mark.parametrize("index", range(len(attendee_blocks("python"))))
def test_readme_python_examples_run(stack: Stack, index: int, tmp_path: Path) -> None:
    _, port, env, _ = stack
    code = attendee_blocks("python")[index].replace("localhost:7071", f"localhost:{port}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("index", range(len(attendee_blocks("javascript"))))
def test_readme_javascript_examples_run(stack: Stack, index: int) -> None:
    """With the official openai package and Vercel's AI SDK, pinned in package.json."""
    _, port, env, _ = stack
    code = attendee_blocks("javascript")[index].replace("localhost:7071", f"localhost:{port}")
    result = subprocess.run(
        ["node", "--input-type=module", "-e", code], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_readme_curl_examples_run(stack: Stack) -> None:
    _, port, env, _ = stack
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
    args = [sys.executable, "-m", "devtools.local.run", "--settings-file", str(tmp_path / "s.json"), "--no-func"]
    service = Service([*args, "--data-dir", str(tmp_path / "azurite")], "Ctrl-C stops everything", env)
    assert service.stop(signal.SIGINT, timeout=60) == 0
    assert not service.left_children, f"make run left processes behind:\n{service.text}"
    for stopped in (port, table_port, sim_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", stopped)) != 0


# About 35 CLI processes, one after the other (each starts Python and the Azure SDK): 43 s on the shared machine,
# 109 s with two busy loops besides. The default 120 s timeout would cut it there; it only guards against hangs.
@pytest.mark.timeout(300)
def test_readme_organizer_walkthrough_runs(stack: Stack) -> None:
    """The organizer's CLI and curl examples, against make run's storage and app, with real ids."""
    _, port, env, folder = stack
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "PYTHONPATH": str(ROOT)}
    env["ORGANIZER_KEY"] = json.loads((folder / "local.settings.json").read_text())["Values"]["ORGANIZER_KEY"]

    def run(script: str) -> str:
        script = "set -euo pipefail\n" + script.replace("localhost:7071", f"localhost:{port}")
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=folder)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def new_event() -> str:
        window = "--start 2027-03-06T09:00:00+01:00 --end 2027-03-06T21:00:00+01:00"
        created = run(f"python -m proxy.manage events create --name Walkthrough {window} --json")
        return str(json.loads(created)["id"])

    guide = GUIDES["organizers"].split("\n## Several organizers", 1)[0]  # the walkthrough of one event
    cli = [b for b in blocks(guide, "bash") if "proxy.manage" in b and "ACCOUNT" not in b]
    assert len(cli) == 6  # create; watch usage; attendees; plan; update and rotate; disable, enable, delete
    quick = [b for b in blocks(section(README, "Run an event"), "bash") if "proxy.manage" in b]
    assert len(quick) == 1  # the front page's: create, usage, disable
    shared = new_event()
    for block in cli:
        assert "Traceback" not in run(block.replace("EVENT_ID", shared))
    assert "Traceback" not in run(quick[0].replace("EVENT_ID", new_event()))
    http = [b for b in blocks(guide, "bash") if "curl" in b]
    assert len(http) == 1
    output = run(http[0].replace("EVENT_ID", new_event()))
    assert '"error"' not in output and "OTHER-CODE-2027" in output and '"deleted":true' in output
    # Several organizers: accounts, sharing, the audit log.
    (accounts,) = [
        b
        for b in blocks(
            section(GUIDES["organizers"], "Several organizers: accounts, sharing and the audit log"), "bash"
        )
        if "proxy.manage" in b
    ]
    output = run(accounts.replace("EVENT_ID", new_event()))
    assert '"key": "ok-' in output and "unshare" in output and "Removed account ada" in output
