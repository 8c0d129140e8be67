"""Service settings: one pydantic-settings class, read from `RCEGATE_*` environment variables.

Built once (by the CLI or the uvicorn factory) and passed into `create_app(settings)`. Every
value is validated at start-up, so a typo in a deployment fails loudly instead of silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

import models

Providers = Literal["auto", "cpu", "cuda"]
Mode = Literal["annotate", "enforce"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

# The model repository that ships with the project (`models/<name>/<version>/`).
DEFAULT_MODEL_DIR = Path(models.__file__).resolve().parent


class Settings(BaseSettings):
    """Every knob of the service; the README's configuration table documents each one."""

    model_config = SettingsConfigDict(env_prefix="RCEGATE_", frozen=True, extra="ignore")

    model_dir: Path = Field(
        DEFAULT_MODEL_DIR, description="Model repository: <model_dir>/<name>/<version>/."
    )
    default_model: str = Field("mnist-rce", description="Model served by POST /v1/predict.")
    host: str = Field("127.0.0.1", description="Bind address of `rcegate serve`.")
    port: int = Field(8000, ge=0, le=65535, description="Port of `rcegate serve`.")
    providers: Providers = Field(
        "auto", description="ONNX Runtime providers: auto (CUDA if it loads, else CPU), cpu, cuda."
    )
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads (0 = ORT default).")
    inter_op_threads: int = Field(0, ge=0, description="ORT inter-op threads (0 = ORT default).")
    max_body_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="Largest accepted request body, in bytes."
    )
    max_images: int = Field(64, gt=0, description="Most images in one request.")
    # Decoding limits, all judged from image headers before any pixel is decoded. Defaults sized
    # for a classifier whose inputs are at most a few hundred pixels a side: 2048 x 2048 is a
    # 1080p or 1440p frame with room to spare, and its decoded samples take at most 16 MiB
    # (RGBA/CMYK, 4 bytes a pixel). The request budget is four such images (64 MiB of samples if
    # a pool held them all at once; ours decodes one image at a time per worker).
    max_pixels: int = Field(
        2048 * 2048,
        gt=0,
        description="Most pixels (width x height) one image may declare; also Pillow's limit.",
    )
    max_image_side: int = Field(
        4096, gt=0, description="Most pixels one image may declare in width or in height."
    )
    max_request_pixels: int = Field(
        4 * 2048 * 2048,
        gt=0,
        description="Most pixels all images of one request may declare together.",
    )
    target_fpr: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Default target FPR; unset = each manifest's calibrated target_fpr.",
    )
    mode: Mode = Field("annotate", description="Default mode: annotate or enforce.")
    log_level: LogLevel = Field("info", description="Log level of the rcegate loggers.")
