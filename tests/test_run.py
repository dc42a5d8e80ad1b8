"""`make run` (devtools/local/run.py) stops all it started when its terminal closes, and notices a dead child."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import httpx

from tests.support import Service, free_port, wait_for, worker_pids


def start_stack(tmp_path: Path, **extra: str) -> tuple[Service, tuple[int, int, int]]:
    ports = port, table_port, sim_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "ORGANIZER_", "IDENTITY_"))}
    env.update(PROXY_PORT=str(port), AZURITE_TABLE_PORT=str(table_port), SIMULATOR_PORT=str(sim_port), **extra)
    args = [sys.executable, "-m", "devtools.local.run", "--settings-file", str(tmp_path / "s.json"), "--no-func"]
    service = Service([*args, "--data-dir", str(tmp_path / "azurite")], "Ctrl-C stops everything", env)
    return service, ports


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pid_of(fragment: str) -> int:
    """The pid of the one process whose command line holds ``fragment``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if fragment in command:
                return int(entry.name)
    raise LookupError(fragment)


def test_closing_the_terminal_stops_everything(tmp_path: Path) -> None:
    service, ports = start_stack(tmp_path)
    worker = worker_pids(service)[-1]
    assert service.stop(signal.SIGHUP) == 0
    for port in ports:
        assert not listening(port), port
    assert not alive(worker), "the Python worker went with the host emulator"


def test_a_dead_azurite_is_noticed_and_named(tmp_path: Path) -> None:
    service, (port, table_port, sim_port) = start_stack(tmp_path)
    os.kill(pid_of(f"--tablePort {table_port} "), signal.SIGKILL)
    wait_for(lambda: service.process.poll() is not None, timeout=20, what="make run to stop")
    assert service.stop() == 1
    assert "Azurite (pid" in service.text and "exited with code" in service.text
    assert "cannot reach Table Storage" in service.text
    assert not listening(port) and not listening(sim_port)


def test_a_supplied_organizer_key_is_never_printed(tmp_path: Path) -> None:
    """The banner says which key to use without echoing it; requests print access lines, not the key."""
    supplied = "supplied-organizer-key-" + os.urandom(6).hex()
    service, (port, _, _) = start_stack(tmp_path, ORGANIZER_KEY=supplied)
    try:
        base = f"http://127.0.0.1:{port}/api"
        listed = httpx.get(f"{base}/manage/events", headers={"authorization": f"Bearer {supplied}"})
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
        answered = httpx.post(f"{base}/v1/chat/completions", json=chat, headers={"api-key": "DEMO-EVENT/alice"})
        assert listed.status_code == answered.status_code == 200
        for response in (listed, answered):
            service.wait_for_output(f"request_id={response.headers['x-request-id']}")
    finally:
        service.stop()
    assert "Organizer key the one you set" in service.text
    assert supplied not in service.text and "DEMO-EVENT/alice" in service.text  # the demo credential is shown
