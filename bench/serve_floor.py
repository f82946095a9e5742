"""The HTTP floor for bench_serve.py: the same FastAPI/uvicorn stack and multipart parsing as `lpjepa serve`'s
/v1/embed, and a small JSON reply, but no image decoded and no model. Its CPU per request is what any server in
this framework spends before its own work, which bounds the share of the ORT-only ceiling a server can reach when
the framework and the model share the cores."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse

app = FastAPI()


@app.post("/v1/embed")
async def embed(request: Request) -> JSONResponse:
    form = await request.form()
    sizes = [len(await f.read()) for f in form.getlist("files") if hasattr(f, "read")]
    return JSONResponse({"embeddings": [{"bytes": n} for n in sizes]})


@app.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})
