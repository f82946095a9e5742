"""/v1/items: one stored item (GET, a read), add or replace items (PUT) and delete one (DELETE), durable before
the reply. `router` holds the read, `write_router` the writes: the API key guards them separately."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi import Path as FastApiPath

from index.validation import MAX_ID
from serve import parsing
from serve.dependencies import ServeState, State
from serve.embedding import embed_blobs, embedding_out
from serve.errors import ApiError
from serve.images import decode_base64, encode_base64
from serve.schemas import PUT_ITEMS_FORM, DeleteResponse, ItemOut, PutItemsJSON, PutItemsResponse, body_doc, error_docs
from serve.store import rows_to_csr
from serve.strict_json import check_payload_value

router = APIRouter(tags=["index"])
write_router = APIRouter(tags=["index"])
PathItemId = Annotated[int, FastApiPath(ge=0, le=MAX_ID, description="item id, 0 .. 2**63-2")]


def _item_id(request: Request) -> int:
    """The path's id as ASCII digits (FastAPI's int would also take "1_0"), in range."""
    item_id = parsing.parse_int(request.path_params["item_id"], "item_id", 0)
    parsing.check_id(item_id)
    return item_id


@router.get(
    "/v1/items/{item_id}",
    summary="One stored item: payload, embedding and thumbnail",
    responses=error_docs(404, 409, 422, 503),
)
async def get_item(request: Request, state: State, item_id: PathItemId, thumbnail: bool = Query(True)) -> ItemOut:
    store = state.need_store()
    item_id = _item_id(request)
    item = await anyio.to_thread.run_sync(store.get, item_id)
    if item is None:
        raise ApiError(404, "unknown_id", f"no item with id {item_id}")
    emb = None if item.vector is None else embedding_out(item.vector[0], item.vector[1], state.dim)
    return ItemOut(
        id=item_id, payload=item.payload, embedding=emb, thumbnail=encode_base64(item.thumbnail if thumbnail else None)
    )


@write_router.put(
    "/v1/items",
    summary="Add or replace items (durable before the reply)",
    openapi_extra=body_doc(PutItemsJSON, PUT_ITEMS_FORM),
    responses=error_docs(400, 409, 413, 415, 422, 503),
)
async def put_items(request: Request, state: State) -> PutItemsResponse:
    store = state.need_store()
    settings = state.settings
    ids, payloads, rows, blobs, image_pos = await _read_items(request, state)
    if len(set(ids)) != len(ids):
        raise ApiError(422, "duplicate_ids", "the same id appears more than once in the request")
    for i, payload in enumerate(payloads):
        check_payload_value(payload, f"payload of item {ids[i]}", settings.max_payload_bytes)
    thumbs: list[bytes | None] = [None] * len(ids)
    if blobs:
        vectors, blob_thumbs, _, _ = await embed_blobs(state, blobs, thumbs=settings.thumbnail_px > 0, observe=False)
        for j, pos in enumerate(image_pos):
            nz = np.flatnonzero(vectors[j])
            rows[pos] = (nz.astype(np.int32), vectors[j][nz])
            thumbs[pos] = blob_thumbs[j]
    matrix = rows_to_csr(rows, state.dim)
    created, replaced = await anyio.to_thread.run_sync(
        store.upsert, np.asarray(ids, dtype=np.int64), matrix, payloads, thumbs
    )
    size = await anyio.to_thread.run_sync(len, store)  # a round trip when the index is remote
    return PutItemsResponse(ids=ids, created=created, replaced=replaced, index_size=size)


async def _read_items(request: Request, state: ServeState) -> tuple[list[int], list[Any], list[Any], list, list[int]]:
    """(ids, payloads, rows: a client embedding or None per item, image blobs, the item position of each blob)."""
    settings = state.settings
    if parsing.content_kind(request) == "multipart":
        form = await parsing.read_form(request, settings)
        blobs = await parsing.form_files(form, "files", settings)
        ids = parsing.parse_ids(parsing.form_text(form, "ids"), len(blobs))
        payloads = parsing.parse_payloads(parsing.form_text(form, "payloads"), len(blobs))
        return ids, payloads, [None] * len(blobs), blobs, list(range(len(blobs)))
    body = await parsing.read_json(request, PutItemsJSON)
    if len(body.items) > settings.max_items_per_request:
        raise ApiError(413, "too_many_items", f"at most {settings.max_items_per_request} items per request")
    blobs, image_pos, rows = [], [], []
    for i, item in enumerate(body.items):
        if item.image is not None:
            blobs.append((f"items[{i}].image", decode_base64(item.image, f"items[{i}].image")))
            image_pos.append(i)
            rows.append(None)
        else:
            rows.append(parsing.embedding_row(item.embedding, state.dim, f"items[{i}].embedding"))
    return [item.id for item in body.items], [item.payload for item in body.items], rows, blobs, image_pos


@write_router.delete(
    "/v1/items/{item_id}",
    summary="Delete one item (durable before the reply)",
    responses=error_docs(404, 409, 422, 503),
)
async def delete_item(request: Request, state: State, item_id: PathItemId) -> DeleteResponse:
    store = state.need_store()
    item_id = _item_id(request)
    if not await anyio.to_thread.run_sync(store.delete, item_id):
        raise ApiError(404, "unknown_id", f"no item with id {item_id}")
    size = await anyio.to_thread.run_sync(len, store)
    return DeleteResponse(id=item_id, deleted=True, index_size=size)
