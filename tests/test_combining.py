"""Writes to one partition combined while one is on its way (``proxy.storage.combining``), against Azurite.

Each test sends the writes through a relay in front of Azurite that holds the
first write a moment (so the others are sure to wait behind it) and names
every call. The invariant, whatever storage does: each caller hears about its
own row only, as if it had written alone, and what storage holds is what the
callers were told landed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

from proxy.config.settings import Settings
from proxy.storage.combining import Combiner
from proxy.storage.entities import EntityClient
from proxy.storage.tables import USAGE_TABLE, Tables
from tests.relay import StorageRelay
from tests.support import eventually
from tests.test_round_trips import Calls


@pytest.fixture
async def relayed(azurite: str, tables: Tables) -> AsyncIterator[tuple[StorageRelay, Calls, EntityClient, Combiner]]:
    port = int(azurite.split("TableEndpoint=http://127.0.0.1:")[1].split("/")[0])
    relay = StorageRelay(port)
    calls = Calls(relay)
    settings = Settings.from_env({"STORAGE_CONNECTION_STRING": relay.connection_string(azurite)}, need_upstream=False)
    entities = EntityClient.for_settings(settings.storage_connection_string, None, USAGE_TABLE, None)
    yield relay, calls, entities, Combiner(entities, tables.ensure)
    await entities.aclose()
    relay.close()


async def rows(entities: EntityClient, count: int) -> tuple[str, list[list[Any]]]:
    """A fresh partition with ``count`` rows: ``[entity, etag]`` each."""
    partition = f"combining-{uuid.uuid4().hex[:8]}"
    made = []
    for index in range(count):
        entity = {"PartitionKey": partition, "RowKey": f"row{index:03d}", "value": 0}
        made.append([entity, await entities.insert(entity)])
    return partition, made


def hold_first_write(relay: StorageRelay) -> None:
    """The next PUT reaches Azurite 0.3 s late: the writes sent meanwhile wait behind it."""
    relay.arm(lambda method, path, body: method == "PUT", "delay", delay=0.3)


def batch(indexes: Any) -> str:
    """The relay's name for a transaction of these rows."""
    return "batch " + "+".join(f"row{index:03d}" for index in indexes)


async def outcomes(combiner: Combiner, writes: list[tuple[dict[str, Any], str]]) -> list[str | BaseException]:
    return await asyncio.gather(*(combiner.write(entity, etag) for entity, etag in writes), return_exceptions=True)


async def test_writes_that_wait_go_together_each_under_its_own_etag(relayed: Any) -> None:
    relay, calls, entities, combiner = relayed
    _, made = await rows(entities, 20)
    hold_first_write(relay)
    mark = len(calls.since(0))
    results = await outcomes(combiner, [({**entity, "value": 1}, etag) for entity, etag in made])
    assert calls.since(mark) == ["write row000", batch(range(1, 20))]
    for (entity, _), etag in zip(made, results, strict=True):
        assert isinstance(etag, str)
        stored_etag, stored = await entities.get(entity["PartitionKey"], entity["RowKey"])
        assert (stored_etag, stored["value"]) == (etag, 1)


async def test_a_lost_race_refuses_its_own_row_only(relayed: Any) -> None:
    relay, calls, entities, combiner = relayed
    _, made = await rows(entities, 10)
    stale = made[5]
    await entities.replace({**stale[0], "value": 7}, stale[1])  # another instance wrote row 5 meanwhile
    hold_first_write(relay)
    mark = len(calls.since(0))
    results = await outcomes(combiner, [({**entity, "value": 1}, etag) for entity, etag in made])
    assert isinstance(results[5], ResourceModifiedError)
    assert all(isinstance(result, str) for index, result in enumerate(results) if index != 5)
    # The one held alone, the nine together (refused: nothing of it landed), the eight again.
    assert calls.since(mark) == ["write row000", batch(range(1, 10)), batch([1, 2, 3, 4, 6, 7, 8, 9])]
    for index, (entity, _) in enumerate(made):
        _, stored = await entities.get(entity["PartitionKey"], entity["RowKey"])
        assert stored["value"] == (7 if index == 5 else 1)


async def test_an_insert_of_a_row_that_exists_refuses_that_row_only(relayed: Any) -> None:
    relay, _, entities, combiner = relayed
    partition, made = await rows(entities, 4)
    hold_first_write(relay)
    fresh = [{"PartitionKey": partition, "RowKey": f"new{index}", "value": 2} for index in range(3)]
    writes = [({**made[0][0], "value": 1}, made[0][1]), *((entity, "") for entity in fresh)]
    writes.insert(2, ({**made[1][0], "value": 3}, ""))  # an insert of a row that exists
    results = await outcomes(combiner, writes)
    assert isinstance(results[2], ResourceExistsError)
    assert all(isinstance(result, str) for index, result in enumerate(results) if index != 2)
    for entity in fresh:
        _, stored = await entities.get(partition, entity["RowKey"])
        assert stored["value"] == 2
    _, kept = await entities.get(partition, made[1][0]["RowKey"])
    assert kept["value"] == 0


async def test_a_transaction_whose_answer_is_lost_leaves_every_caller_knowing_what_landed(relayed: Any) -> None:
    """The transaction lands, its answer is lost: sent again, it is refused on its first row's ETag, and so
    on. Every caller is told it landed or that its row changed (its caller reads again and finds its own
    write there, as ``proxy.admission.counters`` does); none is told of a write that is not stored."""
    relay, _, entities, combiner = relayed
    _, made = await rows(entities, 8)
    hold_first_write(relay)
    relay.arm(lambda method, path, body: path.endswith("/$batch"), "drop")
    results = await outcomes(combiner, [({**entity, "value": 5}, etag) for entity, etag in made])
    assert isinstance(results[0], str)
    assert any(isinstance(result, ResourceModifiedError) for result in results[1:])
    for (entity, _), result in zip(made, results, strict=True):
        stored_etag, stored = await entities.get(entity["PartitionKey"], entity["RowKey"])
        assert stored["value"] == 5  # every write landed, once
        if isinstance(result, str):
            assert result == stored_etag
        else:
            assert isinstance(result, ResourceModifiedError)


async def test_a_lone_write_goes_at_once_and_alone(relayed: Any) -> None:
    _, calls, entities, combiner = relayed
    _, made = await rows(entities, 2)
    mark = len(calls.since(0))
    for entity, etag in made:
        await combiner.write({**entity, "value": 9}, etag)
    assert calls.since(mark) == ["write row000", "write row001"]


async def test_a_caller_gone_while_its_write_waits_leaves_the_others_told(relayed: Any) -> None:
    """Three callers wait behind a held write; one is cancelled (its client gone) before the transaction leaves.
    The transaction still carries every row, as queued: the two callers still there hear their ETags, and the
    rows hold what they were told; the one gone hears nothing, and nothing is left unretrieved."""
    relay, calls, entities, combiner = relayed
    _, made = await rows(entities, 4)
    hold_first_write(relay)
    mark = len(calls.since(0))
    tasks = [asyncio.ensure_future(combiner.write({**entity, "value": 2}, etag)) for entity, etag in made]

    async def sent() -> list[str]:
        return calls.since(mark)

    await eventually(sent, bool, what="the held write on its way")  # the three others wait behind it
    tasks[2].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    assert all(isinstance(results[index], str) for index in (0, 1, 3)), results
    assert calls.since(mark) == ["write row000", batch([1, 2, 3])]
    for index in (0, 1, 3):
        entity = made[index][0]
        stored_etag, stored = await entities.get(entity["PartitionKey"], entity["RowKey"])
        assert (stored_etag, stored["value"]) == (results[index], 2)
    _, gone = await entities.get(made[2][0]["PartitionKey"], made[2][0]["RowKey"])
    assert gone["value"] == 2  # queued before its caller left: it went with the others
