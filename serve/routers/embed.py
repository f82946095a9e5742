"""POST /v1/embed: sparse embeddings (with OOD scores when the model is calibrated) of one or many images."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from serve.dependencies import State, request_images
from serve.embedding import embed_blobs, embedding_rows
from serve.parsing import form_text, parse_bool
from serve.responses import NumpyJSONResponse
from serve.schemas import EMBED_FORM, EmbedJSON, EmbedResponse, body_doc, error_docs

router = APIRouter(tags=["model"])


@router.post(
    "/v1/embed",
    response_model=EmbedResponse,
    response_class=NumpyJSONResponse,
    summary="Sparse embeddings (and OOD scores) of one or many images",
    openapi_extra=body_doc(EmbedJSON, EMBED_FORM),
    responses=error_docs(400, 413, 415, 422, 503),
)
async def embed(
    request: Request, state: State, dense: bool | None = Query(None, description="also return dense vectors")
) -> NumpyJSONResponse:
    state.ready()
    blobs, body = await request_images(request, state.settings)
    if "json" in body:
        want_dense = bool(dense) or body["json"].dense
    else:
        want_dense = bool(dense) or parse_bool(form_text(body["form"], "dense"), "dense", False)
    out = await embed_blobs(state, blobs)
    return NumpyJSONResponse({"embeddings": embedding_rows(state, out.dense, want_dense, out.ood)})
