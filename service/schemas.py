"""Response bodies of the native v1 API, as pydantic models (they are also the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from models.manifest import Metric
from service.settings import Mode


class Scores(BaseModel):
    """All three detection scores; higher = more like clean data (Pang et al., NeurIPS 2018)."""

    confidence: float
    non_me: float
    log_kd: float


class DecisionInfo(BaseModel):
    metric: Metric
    score: float | None = Field(description="null if withheld (a rejected image, enforce mode).")
    threshold: float | None = Field(description="null if withheld, as `score`.")
    target_fpr: float


class ImageSize(BaseModel):
    width: int
    height: int


class ImageResult(BaseModel):
    index: int = Field(description="Position of the image in the request, from 0.")
    filename: str | None = Field(description="Multipart filename; null for a raw body.")
    label: int | None = Field(description="Predicted class index; null if withheld (enforce).")
    class_name: str | None
    probabilities: list[float] | None
    accepted: bool = Field(description="score >= threshold for the decision's metric.")
    decision: DecisionInfo
    scores: Scores | None = Field(description="null if withheld, as `decision.score`.")
    original_size: ImageSize
    resized: bool = Field(description="True when the image was resized to the model's input.")


class PredictResponse(BaseModel):
    model: str
    version: int
    mode: Mode
    predictions: list[ImageResult]


class InputInfo(BaseModel):
    channels: int
    height: int
    width: int
    value_range: tuple[float, float]


class DetectionSummary(BaseModel):
    default_metric: Metric
    target_fpr: float = Field(description="The target FPR served when the request names none.")
    calibrated_target_fpr: float
    thresholds: dict[Metric, float] = Field(description="Per metric, at the served target FPR.")
    target_fpr_range: tuple[float, float] = Field(description="Accepted target_fpr values.")
    sigma2: float
    clean_acceptance: dict[Metric, float]


class ModelInfo(BaseModel):
    name: str
    version: int
    created_at: datetime
    source_commit: str | None
    dataset: str
    class_names: list[str]
    input: InputInfo
    objective: str
    architecture: str
    clean_test_accuracy: float
    detection: DetectionSummary
    sha256: str
    providers: list[str] = Field(description="Execution providers ONNX Runtime really uses.")
    provider_options: dict[str, dict[str, str]] = Field(
        description="Each provider's options as ONNX Runtime reports them (CUDA: "
        "cudnn_conv_algo_search, gpu_mem_limit, arena_extend_strategy, ...)."
    )
    batch_shapes: list[int] | None = Field(
        description="Batch sizes the model runs (a batch is padded up to the next); null: any "
        "size up to max_batch_size."
    )
    warmup_seconds: float = Field(description="Time of the warm-up run of every batch shape.")
    default: bool = Field(description="True for the version that POST /v1/predict serves.")


class RefusedModel(BaseModel):
    name: str
    version: str
    reason: str


class ModelList(BaseModel):
    models: list[ModelInfo]
    refused: list[RefusedModel] = Field(description="Versions that failed verification.")


class Health(BaseModel):
    status: str
    detail: str | None = None


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str


class ErrorBody(BaseModel):
    """The one error shape of the service."""

    error: ErrorDetail
