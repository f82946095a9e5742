"""POST /v1/search: the nearest stored items to an image or an embedding, best first."""

from __future__ import annotations

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request

from serve import parsing
from serve.dependencies import State
from serve.embedding import dense_to_outputs, embed_blobs
from serve.errors import ApiError
from serve.images import decode_base64, encode_base64
from serve.schemas import SEARCH_FORM, SearchHit, SearchJSON, SearchResponse, body_doc, error_docs
from serve.store import rows_to_csr

router = APIRouter(tags=["index"])


@router.post(
    "/v1/search",
    summary="Nearest items to an image or an embedding, best first",
    openapi_extra=body_doc(SearchJSON, SEARCH_FORM),
    responses=error_docs(400, 409, 413, 415, 422, 503),
)
async def search(
    request: Request,
    state: State,
    k: int | None = Query(None, description="number of neighbours"),
    thumbnails: bool | None = Query(None),
) -> SearchResponse:
    if k is not None:  # FastAPI's int would also take "1_0"; the raw text must be ASCII digits
        k = parsing.parse_int(request.query_params.get("k"), "k", 10)
    store = state.need_store()
    query_out = None
    if parsing.content_kind(request) == "multipart":
        form = await parsing.read_form(request, state.settings)
        image_blobs = await parsing.form_files(form, "file", state.settings)
        if len(image_blobs) != 1:
            raise ApiError(422, "invalid_request", f"search takes one image in field 'file', got {len(image_blobs)}")
        k_value = k if k is not None else parsing.parse_int(parsing.form_text(form, "k"), "k", 10)
        if thumbnails is None:
            thumbnails = parsing.parse_bool(parsing.form_text(form, "thumbnails"), "thumbnails", False)
        row = None
    else:
        body = await parsing.read_json(request, SearchJSON)
        k_value = k if k is not None else body.k
        thumbnails = body.thumbnails if thumbnails is None else thumbnails
        image_blobs = [("image", decode_base64(body.image, "image"))] if body.image is not None else None
        row = None if body.embedding is None else parsing.embedding_row(body.embedding, state.dim, "embedding")
    parsing.check_k(k_value, state.settings)
    if row is not None:
        parsing.check_query(row, "the query embedding")
    if image_blobs is not None:
        embedded = await embed_blobs(state, image_blobs)
        vector = embedded.dense[0]
        query_out = dense_to_outputs(state, embedded.dense, False, embedded.ood)[0]
        idx = np.flatnonzero(vector)
        row = (idx.astype(np.int32), vector[idx])
        parsing.check_query(row, "the query image's embedding")
    assert row is not None
    hits = await anyio.to_thread.run_sync(store.search, rows_to_csr([row], state.dim), k_value, thumbnails)
    results = [SearchHit(id=h.id, score=h.score, payload=h.payload, thumbnail=encode_base64(h.thumbnail)) for h in hits]
    return SearchResponse(results=results, query=query_out)
