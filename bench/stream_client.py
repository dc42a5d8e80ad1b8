"""An async streaming client: N connections, each sending streamed chat requests back to back.

    python -m bench.stream_client --url URL --concurrency 64 --seconds 6 \\
        --header "api-key: CODE/u0,CODE/u1" --body '{"stream": true, ...}'

For each request it records the time to the first body chunk (the first
server-sent event) and to the end of the stream, and checks that the stream
ended with ``data: [DONE]``. Header values separated by commas are used in
turn, one per request. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    header: str,
    values: list[str],
    body: bytes,
    deadline: float,
    counter: list[int],
    out: dict[str, list[float] | int],
) -> None:
    while time.perf_counter() < deadline:
        counter[0] += 1
        headers = {header: values[counter[0] % len(values)], "content-type": "application/json"}
        start = time.perf_counter()
        first = 0.0
        tail = b""
        events = 0
        try:
            async with session.post(url, data=body, headers=headers) as response:
                async for data in response.content.iter_any():
                    if not first:
                        first = time.perf_counter()
                    events += data.count(b"data: ")
                    tail = (tail + data)[-64:]
                ok = response.status == 200 and b"data: [DONE]" in tail
        except aiohttp.ClientError:
            ok = False
        end = time.perf_counter()
        if not ok:
            out["errors"] += 1  # type: ignore[operator]
            continue
        out["ttfc_ms"].append((first - start) * 1000)  # type: ignore[union-attr]
        out["total_ms"].append((end - start) * 1000)  # type: ignore[union-attr]
        out["events"] += events  # type: ignore[operator]


async def main(args: argparse.Namespace) -> dict[str, object]:
    header, _, raw = args.header.partition(":")
    values = [v.strip() for v in raw.split(",")]
    body = args.body.encode()
    out: dict[str, list[float] | int] = {"ttfc_ms": [], "total_ms": [], "errors": 0, "events": 0}
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        start = time.perf_counter()
        deadline = start + args.seconds
        counter = [0]
        await asyncio.gather(
            *(
                _worker(session, args.url, header.strip(), values, body, deadline, counter, out)
                for _ in range(args.concurrency)
            )
        )
        duration = time.perf_counter() - start
    total = out["total_ms"]
    assert isinstance(total, list)
    return {**out, "requests": len(total), "duration_s": duration}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--header", required=True, help="NAME: value[,value...]")
    parser.add_argument("--body", required=True)
    parsed = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main(parsed))
    else:
        result = uvloop.run(main(parsed))
    print(json.dumps(result))
