"""Organizer writes that race: blocks, unblocks, PATCHes and rotations from two app processes and the CLI at once.

The invariants: every write answered with success is in the stored event afterwards, and the event
opens with its current code (the one the last successful rotation returned) and with no other.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config.hashing import SecretHasher
from proxy.policy.events import MODIFY_ATTEMPTS, EventStore
from proxy.storage.tables import Tables
from tests.relay import StorageRelay
from tests.support import CODE_HASH_KEY, ORGANIZER_KEY, ROOT, Service, app_env, start_app

AUTH = {"Authorization": f"Bearer {ORGANIZER_KEY}"}


def window() -> dict[str, str]:
    now = datetime.now(UTC)
    return {"start": (now - timedelta(hours=1)).isoformat(), "end": (now + timedelta(hours=2)).isoformat()}


async def blocked_names(client: httpx.AsyncClient, app: str, event_id: str) -> set[str]:
    answer = await client.get(f"{app}/api/manage/events/{event_id}/attendees", headers=AUTH)
    assert answer.status_code == 200, answer.text
    return {row["user"] for row in answer.json()["data"] if row["blocked"]}


async def set_blocked(client: httpx.AsyncClient, app: str, event_id: str, user: str, blocked: bool) -> None:
    url = f"{app}/api/manage/events/{event_id}/attendees/{user}"
    answer = await client.patch(url, json={"blocked": blocked}, headers=AUTH)
    assert answer.status_code == 200, answer.text


async def cli_block(folder: Path, azurite: str, event_id: str, user: str) -> None:
    """``python -m proxy.manage attendees block`` as a process of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "STORAGE_", "ORGANIZER_"))}
    env.update(PYTHONPATH=str(ROOT), STORAGE_CONNECTION_STRING=azurite, CODE_HASH_KEY=CODE_HASH_KEY)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.manage", "attendees", "block", event_id, user, "--json",
        cwd=folder, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()


@pytest.fixture
async def client() -> Any:
    async with httpx.AsyncClient(timeout=60) as http:
        yield http


async def test_blocks_from_two_apps_and_the_cli_at_once_all_land(
    app: str, app_process: tuple[Service, str], azurite: str, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    apps = (app, app_process[1])
    created = (await client.post(f"{app}/api/manage/events", json={"name": "Blocks", **window()}, headers=AUTH)).json()
    event_id = created["id"]
    earlier = [f"earlier{i}" for i in range(6)]
    for user in earlier:
        await set_blocked(client, app, event_id, user, True)
    unblocked = earlier[:3]
    by_cli = [f"cli{i}" for i in range(3)]
    by_http: list[str] = []
    cli = asyncio.gather(*(cli_block(tmp_path, azurite, event_id, user) for user in by_cli))

    async def writer(number: int) -> None:
        """Block fresh names through one app or the other until every CLI process is done (they overlap)."""
        round_ = 0
        while not cli.done() or round_ < 3:
            user = f"http{number}-{round_}"
            await set_blocked(client, apps[(number + round_) % 2], event_id, user, True)
            by_http.append(user)
            round_ += 1

    async def unblocker(user: str, number: int) -> None:
        await set_blocked(client, apps[number % 2], event_id, user, False)

    await asyncio.gather(cli, *(writer(n) for n in range(4)), *(unblocker(u, n) for n, u in enumerate(unblocked)))
    expected = (set(earlier) - set(unblocked)) | set(by_cli) | set(by_http)
    assert await blocked_names(client, app, event_id) == expected
    assert len(by_http) >= 12


async def test_rotations_racing_blocks_never_leave_the_event_without_its_code(
    app: str, app_process: tuple[Service, str], tables: Tables, client: httpx.AsyncClient
) -> None:
    apps = (app, app_process[1])
    created = (await client.post(f"{app}/api/manage/events", json={"name": "Rotate", **window()}, headers=AUTH)).json()
    event_id, code = created["id"], created["code"]
    store = EventStore(tables, SecretHasher(CODE_HASH_KEY), 0)  # no cache: what storage says now
    blocked: set[str] = set()

    async def rotate(via: str, new: str) -> str:
        answer = await client.post(f"{via}/api/manage/events/{event_id}/rotate-code", json={"code": new}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["code"])

    async def probe(codes: tuple[str, ...], done: asyncio.Event) -> int:
        """While the round runs: at every moment, one of the codes (the current one, or a rotation's) opens it."""
        probes = 0
        while not done.is_set():
            opening = await asyncio.gather(*(store.by_code(candidate) for candidate in codes))
            assert any(event is not None and event.id == event_id for event in opening), codes
            probes += 1
        return probes

    async def block(via: str, user: str) -> None:
        await set_blocked(client, via, event_id, user, True)
        blocked.add(user)

    async def patch(via: str, description: str) -> None:
        answer = await client.patch(f"{via}/api/manage/events/{event_id}", json={"description": description},
                                    headers=AUTH)  # fmt: skip
        assert answer.status_code == 200, answer.text

    probes = 0
    for round_ in range(6):
        chosen = ("Rot" + secrets.token_hex(8), "Rot" + secrets.token_hex(8))
        done = asyncio.Event()
        prober = asyncio.create_task(probe((code, *chosen), done))
        blocks = [block(apps[i % 2], f"r{round_}-{i}") for i in range(4)]
        first, second, *_ = await asyncio.gather(
            rotate(apps[0], chosen[0]), rotate(apps[1], chosen[1]), *blocks, patch(apps[round_ % 2], f"round {round_}")
        )
        done.set()
        probes += await prober
        # Two rotations: both answered, one after the other; exactly one of their codes is the event's now.
        opened = [await store.by_code(new) for new in (first, second)]
        assert [event is not None and event.id == event_id for event in opened].count(True) == 1, round_
        assert await store.by_code(code) is None
        code = first if opened[0] is not None else second
        event = await store.get(event_id)
        assert set(event.blocked) == blocked and event.description == f"round {round_}"
    answer = await client.get(f"{app}/api/v1/event", headers={"api-key": f"{code}/alice"})
    assert answer.status_code == 200 and answer.json()["blocked"] is False
    assert len(blocked) == 24 and probes >= 6


@pytest.fixture(scope="module")
def relayed(azurite: str, simulator: str) -> Iterator[tuple[StorageRelay, str]]:
    """An app whose storage calls pass a relay that can slip another organizer's write in before one of them."""
    port = int(azurite.split("TableEndpoint=http://127.0.0.1:")[1].split("/")[0])
    relay = StorageRelay(port)
    service, url = start_app(app_env(relay.connection_string(azurite), simulator, EVENT_CACHE_SECONDS="1"))
    yield relay, url
    service.stop()
    relay.close()


async def test_a_change_overtaken_every_time_is_refused_with_409_and_changes_nothing(
    app: str, relayed: tuple[StorageRelay, str], client: httpx.AsyncClient
) -> None:
    """Organizer A changes an event through one app; before each of its writes reaches storage, organizer B's
    block lands through the other app, so every write of A's fails on the ETag it read. A's PATCH, rotation
    and delete are each refused with 409 edit_conflict after MODIFY_ATTEMPTS tries and change nothing; every
    block of B's answered 200 is in the event and the audit log; A's change made again afterwards lands."""
    relay, slow = relayed
    old_code = "Old" + secrets.token_hex(8)
    created = await client.post(f"{app}/api/manage/events", json={"name": "Overtaken", "code": old_code, **window()},
                                headers=AUTH)  # fmt: skip
    event_id = created.json()["id"]
    base = f"{slow}/api/manage/events/{event_id}"
    by_b: list[tuple[str, int]] = []  # (name, status) of each of B's blocks

    def b_blocks() -> None:
        """Runs in the relay's thread while A's write waits (so, no assertion here: the test checks after)."""
        name = f"b{len(by_b)}"
        with httpx.Client(timeout=60) as sync:
            url = f"{app}/api/manage/events/{event_id}/attendees/{name}"
            by_b.append((name, sync.patch(url, json={"blocked": True}, headers=AUTH).status_code))

    def a_writes_the_event(method: str, path: str, body: bytes) -> bool:
        # EventStore.save and .delete: one entity group transaction on proxyevents with the change and its entry.
        return method == "POST" and path.endswith("$batch") and f"RowKey='{event_id}'".encode() in body

    new_code = "New" + secrets.token_hex(8)
    attempts = (
        ("PATCH", base, {"description": "from A"}),
        ("POST", f"{base}/rotate-code", {"code": new_code}),
        ("DELETE", base, None),
    )
    for method, url, body in attempts:
        rule = relay.arm(a_writes_the_event, "before", times=MODIFY_ATTEMPTS + 1, before=b_blocks)
        refused = await client.request(method, url, json=body, headers=AUTH)
        rule.times = 0  # disarmed
        assert refused.status_code == 409, refused.text
        assert (
            refused.json()["error"]["code"] == "edit_conflict"
            and "try again" in refused.json()["error"]["message"].lower()
        )
        assert rule.fired == MODIFY_ATTEMPTS  # every try was overtaken, and there was no other
    assert len(by_b) == 3 * MODIFY_ATTEMPTS and all(status == 200 for _, status in by_b), by_b

    # Nothing of A's landed: the description, the code (the new one was released), the event itself.
    event = (await client.get(f"{app}/api/manage/events/{event_id}", headers=AUTH)).json()
    assert event["description"] == ""
    opened = await client.get(f"{app}/api/v1/event", headers={"api-key": f"{old_code}/alice"})
    assert opened.status_code == 200, opened.text
    elsewhere = await client.post(f"{app}/api/manage/events", json={"name": "Takes it", "code": new_code, **window()},
                                  headers=AUTH)  # fmt: skip
    assert elsewhere.status_code == 201, elsewhere.text
    # Every write of B's answered 200 is there, with its audit entry; A's refused changes have none.
    assert await blocked_names(client, app, event_id) == {name for name, _ in by_b}
    entries = (await client.get(f"{app}/api/manage/audit", params={"event": event_id}, headers=AUTH)).json()["data"]
    assert sorted(entry["action"] for entry in entries) == ["block"] * len(by_b) + ["create"]

    # Made again with nobody in the way, A's change lands.
    again = await client.patch(base, json={"description": "from A"}, headers=AUTH)
    assert again.status_code == 200 and again.json()["description"] == "from A", again.text


async def test_a_code_released_twice_never_takes_it_from_the_event_that_claimed_it_between(
    app: str, relayed: tuple[StorageRelay, str], tables: Tables, client: httpx.AsyncClient
) -> None:
    """Rotation R2 of event A reads A's code X and is about to write; meanwhile rotation R1 lands (A's code X
    -> Y, X released) and another organizer creates event B with code X. R2's write fails on the ETag and
    lands on its second try, replacing Y, and releases what it replaced: Y, and X, which is B's by now. B
    must still open with X (its index row is B's, not A's), and A with R2's code only."""
    relay, slow = relayed
    codes = {name: name + secrets.token_hex(8) for name in ("Xcode", "Ycode", "Zcode")}
    created = await client.post(f"{app}/api/manage/events", json={"name": "A", "code": codes["Xcode"], **window()},
                                headers=AUTH)  # fmt: skip
    a_id = created.json()["id"]
    between: list[httpx.Response] = []

    def r1_and_b() -> None:
        with httpx.Client(timeout=60) as sync:
            between.append(sync.post(f"{app}/api/manage/events/{a_id}/rotate-code", json={"code": codes["Ycode"]},
                                     headers=AUTH))  # fmt: skip
            between.append(sync.post(f"{app}/api/manage/events", json={"name": "B", "code": codes["Xcode"], **window()},
                                     headers=AUTH))  # fmt: skip

    def r2_writes_a(method: str, path: str, body: bytes) -> bool:
        return method == "POST" and path.endswith("$batch") and f"RowKey='{a_id}'".encode() in body

    relay.arm(r2_writes_a, "before", times=1, before=r1_and_b)
    r2 = await client.post(f"{slow}/api/manage/events/{a_id}/rotate-code", json={"code": codes["Zcode"]}, headers=AUTH)
    assert r2.status_code == 200, r2.text
    assert [answer.status_code for answer in between] == [200, 201], [answer.text for answer in between]
    b_id = between[1].json()["id"]
    store = EventStore(tables, SecretHasher(CODE_HASH_KEY), 0)  # no cache: what storage says now
    opened = {name: await store.by_code(code) for name, code in codes.items()}
    assert {name: None if event is None else event.id for name, event in opened.items()} == {
        "Xcode": b_id, "Ycode": None, "Zcode": a_id
    }  # fmt: skip
