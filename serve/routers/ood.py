"""POST /v1/ood: OOD scores of one or many images, for a model that carries an OOD calibration."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serve.dependencies import State, request_images
from serve.embedding import embed_blobs
from serve.schemas import OOD_FORM, EmbedJSON, OODOut, OODResponse, body_doc, error_docs

router = APIRouter(tags=["ood"])


@router.post(
    "/v1/ood",
    summary="OOD scores of one or many images (needs a calibrated model)",
    openapi_extra=body_doc(EmbedJSON, OOD_FORM),
    responses=error_docs(400, 409, 413, 415, 422, 503),
)
async def ood(request: Request, state: State) -> OODResponse:
    state.ready()
    scorer = state.need_scorer()
    blobs, _ = await request_images(request, state.settings)
    out = await embed_blobs(state, blobs)
    return OODResponse(
        results=[OODOut(**r) for r in out.ood or []],
        score_name=scorer.score_name,
        threshold=float(scorer.threshold),
        tpr=scorer.tpr,
    )
