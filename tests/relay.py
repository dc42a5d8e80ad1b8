"""A loopback TCP relay in front of Azurite that breaks chosen storage calls, as a network does.

Requests pass through unchanged, one at a time per connection (aiohttp and
azure-core never pipeline). A rule armed with ``arm`` picks requests by
method, path and body, and then, for as many requests as it is armed for:

- ``"drop"``: the request reaches Azurite, which carries it out; its answer is
  thrown away and the connection closed (a write that landed, its answer lost);
- ``"truncate"``: the answer's head and half its body reach the client, then the
  connection closes (a payload cut short);
- ``"tamper"``: the request body is rewritten by the rule's function before it
  reaches Azurite, which then answers what it answers (a genuine refusal);
- ``"delay"``: the request reaches Azurite ``delay`` seconds late (a slow write);
- ``"before"``: the rule's function runs (in a thread: it may call the app or
  Azurite, blocking) and returns before the request reaches Azurite (a write of
  someone else's that lands between a read and the write that follows it).

Runs its own event loop in a thread, so sync and async tests can use it alike.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["drop", "truncate", "tamper", "delay", "before"]
Match = Callable[[str, str, bytes], bool]


@dataclass
class Rule:
    match: Match
    action: Action
    times: int
    rewrite: Callable[[bytes], bytes] | None = None
    delay: float = 0.0
    before: Callable[[], None] | None = None
    fired: int = 0
    seen: list[tuple[str, str]] = field(default_factory=list)


class StorageRelay:
    """Relays TCP to ``127.0.0.1:target_port``; ``port`` is where to connect instead."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.rules: list[Rule] = []
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("the storage relay did not start")

    def connection_string(self, account_connection_string: str) -> str:
        """``account_connection_string`` (Azurite's) with its table endpoint moved to this relay."""
        return account_connection_string.replace(f"127.0.0.1:{self.target_port}/", f"127.0.0.1:{self.port}/")

    def arm(
        self,
        match: Match,
        action: Action,
        times: int = 1,
        rewrite: Callable[[bytes], bytes] | None = None,
        delay: float = 0.0,
        before: Callable[[], None] | None = None,
    ) -> Rule:
        rule = Rule(match, action, times, rewrite, delay, before)
        with self._lock:
            self.rules.append(rule)
        return rule

    def _pick(self, method: str, path: str, body: bytes) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.fired < rule.times and rule.match(method, path, body):
                    rule.fired += 1
                    rule.seen.append((method, path))
                    return rule
        return None

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = int(self.server.sockets[0].getsockname()[1])
        started.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        pending: list[Action | None] = [None]  # what to do with the answer now coming

        def close() -> None:
            writer.close()
            up_writer.close()

        async def requests() -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, path = lines[0].split(" ")[:2]
                    length = 0
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        if name.strip().lower() == "content-length":
                            length = int(value.strip())
                    body = await reader.readexactly(length) if length else b""
                    rule = self._pick(method, path, body)
                    pending[0] = rule.action if rule is not None else None
                    if rule is not None and rule.action == "tamper" and rule.rewrite is not None:
                        body = rule.rewrite(body)
                        kept = [line for line in lines[1:] if line and not line.lower().startswith("content-length")]
                        head = "\r\n".join([lines[0], *kept, f"Content-Length: {len(body)}", "", ""]).encode("latin-1")
                    if rule is not None and rule.action == "delay":
                        await asyncio.sleep(rule.delay)
                    if rule is not None and rule.action == "before" and rule.before is not None:
                        await asyncio.to_thread(rule.before)
                    up_writer.write(head + body)
                    await up_writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.LimitOverrunError):
                close()

        async def answers() -> None:
            buffered = b""
            try:
                while data := await up_reader.read(65536):
                    action = pending[0]
                    if action == "drop":
                        close()
                        return
                    if action == "truncate":
                        buffered += data
                        head, separator, body = buffered.partition(b"\r\n\r\n")
                        if not separator or not body:
                            continue
                        writer.write(head + separator + body[: max(1, len(body) // 2)])
                        await writer.drain()
                        close()
                        return
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            close()

        await asyncio.gather(requests(), answers())
        self._writers.discard(writer)
        self._writers.discard(up_writer)

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
            for writer in list(self._writers):
                writer.close()
            await self.server.wait_closed()
            # Each connection's relay ends on the closed sockets: let it, so no task is left pending at exit.
            serving = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            if serving:
                _, pending = await asyncio.wait(serving, timeout=2)
                for task in pending:
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
