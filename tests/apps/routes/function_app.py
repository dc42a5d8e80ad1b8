"""A tiny function app for the host emulator's tests: routes, streaming, failures, a timer."""

import asyncio
import json
import os

import azure.functions as func
from azurefunctions.extensions.http.fastapi import JSONResponse, Request, StreamingResponse

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


def answer(request: Request, function: str) -> JSONResponse:
    return JSONResponse(
        {
            "function": function,
            "method": request.method,
            "params": dict(request.path_params),
            "headers": dict(request.headers),
            "pid": os.getpid(),
        }
    )


@app.route(route="items/special", methods=["GET"])
async def literal(req: Request) -> JSONResponse:
    return answer(req, "literal")


@app.route(route="items/{id}", methods=["GET"])
async def parameter(req: Request) -> JSONResponse:
    return answer(req, "parameter")


@app.route(route="items/{id}/parts/{*rest}", methods=["GET"])
async def nested(req: Request) -> JSONResponse:
    return answer(req, "nested")


@app.route(route="upload", methods=["POST"])
async def upload(req: Request) -> JSONResponse:
    return JSONResponse({"length": len(await req.body())})


@app.route(route="sleep/{seconds}", methods=["GET"])
async def sleep(req: Request) -> JSONResponse:
    await asyncio.sleep(float(req.path_params["seconds"]))
    return answer(req, "sleep")


@app.route(route="stream/{count}", methods=["GET"])
async def stream(req: Request) -> StreamingResponse:
    async def chunks():
        for index in range(int(req.path_params["count"])):
            yield f"data: {index}\n\n".encode()
            await asyncio.sleep(0.2)

    return StreamingResponse(chunks(), media_type="text/event-stream")


@app.route(route="boom", methods=["GET"])
async def boom(req: Request) -> JSONResponse:
    raise RuntimeError("boom on purpose")


@app.route(route="{*path}", methods=["GET", "POST"])
async def catch_all(req: Request) -> JSONResponse:
    return answer(req, "catch_all")


@app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer", run_on_startup=False)
async def tick(timer: func.TimerRequest) -> None:
    path = os.environ.get("TICK_FILE")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps({"past_due": timer.past_due}) + "\n")
