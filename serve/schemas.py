"""Request and response models: they are the OpenAPI contract at /docs and the validation of every JSON body."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, model_validator

from index.validation import MAX_ID

ItemId = int  # non-negative int64 ids, as the index stores them (the largest int64 is reserved by the index)
# Request fields are strict: no "12" -> 12, no true -> 1, no 1.0 -> 1 (a client sending those has a bug to see).
ItemIdIn = Annotated[StrictInt, Field(ge=0, le=MAX_ID, description="item id, 0 .. 2**63-2")]
INT32_MAX = 2**31 - 1
Dimension = Annotated[StrictInt, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]  # range vs dim checked after
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # JSON integers are accepted as numbers
MAX_K_FIELD = 2**63 - 1  # the schema's bound; the server's own --max-k (in /v1/info limits) is checked after


class StrictModel(BaseModel):
    """Unknown fields are an error: a misspelt `k` or `dense` should not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class EmbeddingIn(StrictModel):
    """An embedding supplied by the client: sparse (indices + values) or dense (exactly `dim` numbers).

    Values must be finite and non-negative: the model's codes are rectified (ReLU), so a negative value can only
    come from a different model or a bug on the client's side.
    """

    indices: list[Dimension] | None = Field(None, description="active dimensions (any order, no repeats)")
    values: list[Number] | None = Field(
        None, description="values of the active dimensions, same length; finite, non-negative float32"
    )
    dense: list[Number] | None = Field(None, description="all `dim` values instead of indices/values")
    dim: Annotated[StrictInt, Field(ge=1, le=INT32_MAX)] | None = Field(
        None, description="optional; when given it must equal the model's dimension"
    )

    @model_validator(mode="after")
    def _one_form(self) -> EmbeddingIn:
        sparse_given = self.indices is not None or self.values is not None
        if sparse_given and self.dense is not None:
            raise ValueError("give either indices/values or dense, not both")
        if not sparse_given and self.dense is None:
            raise ValueError("give indices and values, or dense")
        if sparse_given and (self.indices is None or self.values is None):
            raise ValueError("indices and values must be given together")
        if sparse_given and len(self.indices) != len(self.values):  # type: ignore[arg-type]
            raise ValueError(f"indices ({len(self.indices)}) and values ({len(self.values)}) differ in length")  # type: ignore[arg-type]
        return self


class OODOut(BaseModel):
    score: float = Field(description="the served OOD score (see score_name); higher = more unusual")
    is_ood: bool = Field(description="score above the calibrated threshold")
    l0: float = Field(description="fraction of active dimensions")
    rate_score: float
    pattern_score: float
    score_name: str = Field(description="which score `score` and `is_ood` are (chosen at calibration by evidence)")
    threshold: float = Field(description="the served score's threshold")


class EmbeddingOut(BaseModel):
    indices: list[int] = Field(description="active dimensions, ascending")
    values: list[float] = Field(description="their values")
    dim: int
    nnz: int = Field(description="number of active dimensions")
    l0: float = Field(description="fraction of active dimensions (nnz / dim)")
    dense: list[float] | None = Field(None, description="all values, only when requested with dense=true")
    ood_score: float | None = Field(None, description="OOD score, when the model carries an OOD calibration")
    is_ood: bool | None = Field(None, description="OOD flag, when the model carries an OOD calibration")
    ood_score_name: str | None = Field(None, description="which score ood_score and is_ood are")
    ood_threshold: float | None = Field(None, description="the served score's threshold")


class EmbedJSON(StrictModel):
    images: list[StrictStr] = Field(description="base64-encoded image files (PNG, JPEG, ...); data: URLs accepted")
    dense: StrictBool = False


class EmbedResponse(BaseModel):
    embeddings: list[EmbeddingOut]


class SearchJSON(StrictModel):
    embedding: EmbeddingIn | None = None
    image: StrictStr | None = Field(None, description="base64 image instead of an embedding")
    k: StrictInt = Field(10, ge=1, le=MAX_K_FIELD, description="number of neighbours, at most limits.max_k")
    thumbnails: StrictBool = Field(False, description="include the stored thumbnail (base64 PNG) of each hit")

    @model_validator(mode="after")
    def _one_query(self) -> SearchJSON:
        if (self.embedding is None) == (self.image is None):
            raise ValueError("give exactly one of embedding or image")
        return self


class SearchHit(BaseModel):
    id: ItemId
    score: float
    payload: Any = None
    thumbnail: str | None = Field(None, description="base64 PNG, when requested and stored")


class SearchResponse(BaseModel):
    results: list[SearchHit] = Field(description="best first; fewer than k when the index holds fewer items")
    query: EmbeddingOut | None = Field(None, description="the query image's embedding, for image queries")


class ItemIn(StrictModel):
    id: ItemIdIn
    image: StrictStr | None = Field(None, description="base64 image to embed")
    embedding: EmbeddingIn | None = None
    payload: dict[str, Any] | None = Field(None, description="any JSON object stored with the item")

    @model_validator(mode="after")
    def _one_source(self) -> ItemIn:
        if (self.image is None) == (self.embedding is None):
            raise ValueError("each item needs exactly one of image or embedding")
        return self


class PutItemsJSON(StrictModel):
    items: list[ItemIn] = Field(min_length=1)


class PutItemsResponse(BaseModel):
    ids: list[ItemId]
    created: int = Field(description="ids that were new")
    replaced: int = Field(description="ids that already existed and were overwritten")
    index_size: int


class ItemOut(BaseModel):
    id: ItemId
    payload: Any = None
    embedding: EmbeddingOut | None = None
    thumbnail: str | None = None


class DeleteResponse(BaseModel):
    id: ItemId
    deleted: bool
    index_size: int


class OODResponse(BaseModel):
    results: list[OODOut]
    score_name: str = Field(description="the served score")
    threshold: float
    tpr: float | None = Field(None, description="in-distribution true-positive rate the threshold was set for")


class DriftResponse(BaseModel):
    enabled: bool = Field(description="false when the model has no calibration with a drift section")
    alarm: bool = Field(description="the latest evaluation rejected 'recent traffic is in-distribution'")
    pvalue: float | None = Field(None, description="Bonferroni-combined p-value of the current window")
    test: str
    window_size: int
    window_count: int = Field(description="images in the window now (the test runs once it is full)")
    window_l0: float | None = Field(None, description="mean fraction of active dimensions over the window")
    target_l0: float | None = Field(None, description="the model's analytic expected l0")
    false_alarm_rate: float = Field(description="chance that one evaluation on ID traffic raises the alarm")
    pvalue_l0: float | None = None
    pvalue_pattern: float | None = None
    evaluations: int = 0
    alarms: int = Field(0, description="alarm onsets since start")
    images: int = Field(0, description="images observed since start")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class IndexInfo(BaseModel):
    size: int
    dim: int
    metric: str | None = None
    backend: str | None = None
    directory: str | None = Field(None, description="index directory (csr, faiss); null for a Milvus collection")
    collection: str | None = Field(None, description="the Milvus collection (backend milvus)")
    durability: str | None = Field(None, description="who keeps acknowledged writes: sqlite (this server) or backend")
    wal_records: int
    snapshots: int


class InfoResponse(BaseModel):
    model: dict[str, Any] = Field(description="the exported model's metadata (config, target, precision, ...)")
    dim: int
    ood_calibrated: bool
    ood: dict[str, Any] | None = Field(None, description="summary of the OOD calibration, when there is one")
    index: IndexInfo | None
    target_l0: float | None = Field(
        None, description="the model's expected fraction of active dimensions (its sparsity target), when it has one"
    )
    index_size: int | None = Field(None, description="items in the index (same as index.size); null without one")
    backend: str | None = Field(None, description="index backend (csr, faiss, ...); null without an index")
    limits: dict[str, Any]
    version: str


class Health(BaseModel):
    status: str
    checks: dict[str, bool] = Field(default_factory=dict)


MULTIPART = "multipart/form-data"
IMAGE_FILES_SCHEMA = {"type": "array", "items": {"type": "string", "format": "binary"}}
# The multipart fields of each route that takes images (the JSON bodies are the models below/above).
OOD_FORM = {"files": IMAGE_FILES_SCHEMA}
EMBED_FORM = {**OOD_FORM, "dense": {"type": "boolean"}}
SEARCH_FORM = {
    "file": {"type": "string", "format": "binary"},
    "k": {"type": "integer"},
    "thumbnails": {"type": "boolean"},
}
PUT_ITEMS_FORM = {
    **OOD_FORM,
    "ids": {"type": "string", "description": "JSON list or comma-separated ids, one per file"},
    "payloads": {"type": "string", "description": "optional JSON list of objects, one per file"},
}
# The JSON bodies are parsed by hand (strictly, serve/parsing.py), so FastAPI does not see these models: the app
# adds them to the components its routes' `body_doc` references.
REQUEST_MODELS = (EmbedJSON, SearchJSON, PutItemsJSON, EmbeddingIn)
ERROR_DESCRIPTIONS = {
    400: "malformed body (not JSON, not UTF-8, broken multipart)",
    404: "no item with this id",
    409: "this server has no index, or the model no OOD calibration",
    413: "body, image, pixel budget, payload or count over a limit",
    415: "unsupported content or image type",
    422: "invalid input (the message names the field)",
    503: "overloaded, loading or shutting down (Retry-After)",
}


def body_doc(json_model: type[BaseModel], multipart: dict[str, Any]) -> dict[str, Any]:
    """Document both accepted body encodings of a route (FastAPI can declare only one natively)."""
    content = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
        MULTIPART: {"schema": {"type": "object", "properties": multipart}},
    }
    return {"requestBody": {"required": True, "content": content}}


def error_docs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route: exactly the error statuses it can answer (401 comes with the key check,
    serve/dependencies.py)."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}
