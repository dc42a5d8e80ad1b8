"""Timer triggers for the host emulator: NCRONTAB schedules and the invocations they make.

A timer trigger's ``schedule`` is an NCRONTAB expression with six fields, seconds first
(``{second} {minute} {hour} {day} {month} {day-of-week}``), each ``*``, a number, a range
``a-b``, a list ``a,b`` or a step ``*/n`` / ``a-b/n``; times are UTC (``WEBSITE_TIME_ZONE``
is not read). Each firing sends an ``InvocationRequest`` whose trigger input is the JSON the
host sends (``Schedule``, ``ScheduleStatus``, ``IsPastDue``), which the worker turns into an
``azure.functions.TimerRequest``. ``runOnStartup`` fires once when a worker is ready. As with
a singleton timer in Azure, a timer does not fire again while its previous run is going on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from devtools.funchost.workers import TimerFunction, Worker, WorkerGone

_RANGES = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6))


def _field(text: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if span == "*":
            start, end = low, high
        elif "-" in span:
            first, last = span.split("-", 1)
            start, end = int(first), int(last)
        else:
            start = int(span)
            end = high if step_text else start
        if not (low <= start <= end <= high) or step < 1:
            raise ValueError(f"{part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Schedule:
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]

    @classmethod
    def parse(cls, expression: str) -> Schedule:
        fields = expression.split()
        if len(fields) != 6:
            raise ValueError(f"NCRONTAB {expression!r} needs six fields, seconds first")
        fields[5] = fields[5].replace("7", "0") if fields[5] != "*" else fields[5]
        parsed = [_field(text, low, high) for text, (low, high) in zip(fields, _RANGES, strict=True)]
        return cls(*parsed)

    def next_after(self, moment: datetime) -> datetime:
        """The first time strictly after ``moment`` (whole seconds) that the schedule fires."""
        candidate = moment.replace(microsecond=0) + timedelta(seconds=1)
        limit = candidate + timedelta(days=366 * 4)
        while candidate < limit:
            weekday = (candidate.weekday() + 1) % 7  # NCRONTAB: Sunday is 0
            if candidate.month not in self.months or candidate.day not in self.days or weekday not in self.weekdays:
                candidate = candidate.replace(hour=0, minute=0, second=0) + timedelta(days=1)
            elif candidate.hour not in self.hours:
                candidate = candidate.replace(minute=0, second=0) + timedelta(hours=1)
            elif candidate.minute not in self.minutes:
                candidate = candidate.replace(second=0) + timedelta(minutes=1)
            elif candidate.second not in self.seconds:
                candidate += timedelta(seconds=1)
            else:
                return candidate
        raise ValueError("the schedule never fires")


def timer_payload(last: datetime | None, now: datetime, following: datetime, past_due: bool) -> str:
    def iso(moment: datetime | None) -> str:
        return (moment or datetime(1, 1, 1, tzinfo=UTC)).isoformat()

    return json.dumps(
        {
            "Schedule": {"AdjustForDST": True},
            "ScheduleStatus": {"Last": iso(last), "Next": iso(following), "LastUpdated": iso(now)},
            "IsPastDue": past_due,
        }
    )


class TimerRunner:
    """Fires one worker's timer functions until stopped (its worker died or the host stops)."""

    def __init__(self, worker: Worker, interval: float | None) -> None:
        self.worker = worker
        self.interval = interval
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self.interval == 0:
            return
        for timer in self.worker.timers:
            try:
                schedule = Schedule.parse(timer.schedule) if self.interval is None else None
            except ValueError as error:
                print(f"timer {timer.name}: {error}; it will not fire", file=sys.stderr, flush=True)
                continue
            self.tasks.append(asyncio.create_task(self._run(timer, schedule)))

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    def _next(self, schedule: Schedule | None, now: datetime) -> datetime:
        if schedule is None:
            assert self.interval is not None
            return now + timedelta(seconds=self.interval)
        return schedule.next_after(now)

    async def _run(self, timer: TimerFunction, schedule: Schedule | None) -> None:
        last: datetime | None = None
        if timer.run_on_startup:
            last = await self._fire(timer, schedule, last)
        while True:
            now = datetime.now(UTC)
            due = self._next(schedule, now)
            await asyncio.sleep((due - now).total_seconds())
            last = await self._fire(timer, schedule, last)

    async def _fire(self, timer: TimerFunction, schedule: Schedule | None, last: datetime | None) -> datetime:
        now = datetime.now(UTC)
        protos = self.worker.protos
        invocation_id = str(uuid.uuid4())
        payload = timer_payload(last, now, self._next(schedule, now), past_due=False)
        request = protos.InvocationRequest(
            invocation_id=invocation_id,
            function_id=timer.function_id,
            input_data=[protos.ParameterBinding(name=timer.parameter, data=protos.TypedData(json=payload))],
        )
        answer = self.worker.request(f"invocation:{invocation_id}", invocation_request=request)
        with contextlib.suppress(WorkerGone):
            response = await answer
            if response.result.status == response.result.Failure:
                message = response.result.exception.message
                print(f"Executed 'Functions.{timer.name}' (Failed, Id={invocation_id}): {message}", flush=True)
        return now
