"""Settings: one class, read from NORMCORE_* environment variables and command-line flags."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Settings(BaseSettings):
    """Everything the service can be told. Flags (``python -m service --port``) win over
    the environment (``NORMCORE_PORT``), which wins over these defaults."""

    model_config = SettingsConfigDict(env_prefix="NORMCORE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to bind; the image sets 0.0.0.0.")
    port: int = Field(8000, ge=0, le=65535)
    catalog: Path | None = Field(None, description="Layer catalog TOML; built-in if unset.")
    state_dir: Path | None = Field(None, description="Durable state; memory only if unset.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    api_token: SecretStr | None = Field(None, description="Bearer token for state changes.")
    protect_reads: bool = Field(False, description="Require the token for reads too.")
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_elements: int = Field(64 * 1024 * 1024, gt=0, description="Per tensor.")
    max_rank: int = Field(8, gt=0, le=32)
    allow_non_finite: bool = Field(False, description="Let NaN/Inf into train updates.")
    request_timeout: float = Field(60.0, gt=0, description="Seconds for one request.")
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0,
                         description="torch intra-op threads.")
    kernels: bool = Field(True, description="Fused C++ kernels for float32 CPU tensors, "
                          "compiled (once per machine) before /readyz turns 200; off: the "
                          "plain torch path.")
    tune_allocator: bool = Field(True, description="Keep freed tensor memory in the process "
                                 "(python -m service only): large outputs skip page faults, "
                                 "resident memory stays near its peak.")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("api_token")
    @classmethod
    def _no_empty_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None  # NORMCORE_API_TOKEN= (empty) means no token, not an empty one
        return value
