"""The OpenAI Batch API's objects, in the shapes the official SDK reads (`openai.types.Batch`, `FileObject`), and
its error body. Field names follow OpenAI's; kvbatch adds only `metadata`-free extras under `x_kvbatch`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]  # fmt: skip
ENDED_STATES = ("failed", "completed", "expired", "cancelled")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchErrorData(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorData] = Field(default_factory=list)


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    x_kvbatch: dict[str, Any] = Field(default_factory=dict)
    """kvbatch's own: the plan made for this batch, its run folder, its report, throughput and memory."""


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


def error_body(message: str, kind: str = "invalid_request_error", *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"error": ErrorBody(message=message, type=kind, param=param, code=code).model_dump()}


DeliveryState = Literal["pending", "delivered", "given_up"]


class WebhookDelivery(BaseModel):
    """One webhook event for one receiver, as the outbox holds it (SQLite `outbox`): written in the same transaction
    as the batch state that causes it, then delivered until the receiver acknowledges it or it is older than the
    give-up age. `body` is the event's exact JSON: every attempt sends the same bytes and `webhook-id`."""

    seq: int = 0
    event_id: str
    event_type: str
    batch_id: str
    url: str
    body: str
    created_at: float
    state: DeliveryState = "pending"
    attempts: int = 0
    next_at: float
    last_error: str | None = None
    ended_at: float | None = None

