"""Settings: one class, read from NORMCORE_* environment variables and command-line flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .core.devices import DEVICE_HELP, DEVICE_OR_AUTO


class Settings(BaseSettings):
    """Everything the service can be told. Flags (``python -m service --port``) win over
    the environment (``NORMCORE_PORT``), which wins over these defaults."""

    model_config = SettingsConfigDict(env_prefix="NORMCORE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to bind; the image sets 0.0.0.0.")
    port: int = Field(8000, ge=0, le=65535)
    catalog: Path | None = Field(None, description="Layer catalog TOML; built-in if unset.")
    state_dir: Path | None = Field(None, description="Durable state; memory only if unset.")
    state_url: SecretStr | None = Field(
        None, description="postgresql://user:password@host:port/db: state shared by every "
        "replica pointed at the same database (instead of state_dir).")
    workers: int = Field(1, gt=0, le=256, description="Server processes on one port, sharing "
                         "one state (needs state_dir or state_url when above 1).")
    snapshot_every: int = Field(10_000, gt=0,
                                description="Journal records between two snapshots.")
    idempotency_window: int = Field(10_000, gt=0,
                                    description="How many recent request_ids are remembered.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    api_token: SecretStr | None = Field(None, description="Bearer token for state changes.")
    protect_reads: bool = Field(False, description="Require the token for reads too.")
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_elements: int = Field(64 * 1024 * 1024, gt=0, description="Per tensor.")
    max_rank: int = Field(8, gt=0, le=32)
    max_json_bytes: int = Field(
        16 * 1024 * 1024, gt=0,
        description="Largest JSON body (or V2 JSON header): parsing one holds the interpreter, "
        "so big tensors travel as V2 binary data, up to max_body_bytes.")
    max_layers: int = Field(1024, gt=0, description="Layers the admin API may create, in all.")
    max_layer_features: int = Field(
        1 << 20, gt=0, le=1 << 24,
        description="Widest layer the admin API creates: channels (BatchNorm, InstanceNorm, "
        "GroupNorm) or normalized elements (LayerNorm, RMSNorm).")
    allow_non_finite: bool = Field(False, description="Let NaN/Inf into train updates.")
    request_timeout: float = Field(
        60.0, gt=0, description="Seconds a request may wait to start its compute; later it is "
        "refused (503) with nothing applied. Started work always finishes.")
    client_timeout: float = Field(
        10.0, gt=0, le=600,
        description="Seconds a client has to send one request's headers and body; slower "
        "connections are closed.",
    )
    batch_max_size: int = Field(
        0, ge=0, le=4096,
        description="Merge up to this many concurrent eval requests per layer (0 or 1: off).",
    )
    batch_max_delay_ms: float = Field(
        2.0, gt=0, le=1000, description="Longest wait for a batch to fill, in milliseconds.",
    )
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
        if not DEVICE_OR_AUTO.match(value):
            raise ValueError(f"device must be auto, {DEVICE_HELP}")
        return value

    @field_validator("api_token")
    @classmethod
    def _no_empty_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None  # NORMCORE_API_TOKEN= (empty) means no token, not an empty one
        return value

    @field_validator("state_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("state_url must be a postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _one_state(self) -> Settings:
        if self.state_dir is not None and self.state_url is not None:
            raise ValueError("state_dir and state_url both set: choose one place for the state")
        if self.workers > 1 and self.state_dir is None and self.state_url is None:
            raise ValueError("workers above 1 need a shared state: set state_dir or state_url "
                             "(memory-only state would differ between workers)")
        return self

    @model_validator(mode="after")
    def _reads_need_a_token(self) -> Settings:
        # Failing closed: "protect reads" without a token would silently protect nothing.
        if self.protect_reads and self.api_token is None:
            raise ValueError("protect_reads needs api_token (NORMCORE_API_TOKEN) to be set")
        return self

    def weak_token(self) -> bool:
        """A token so short it could be guessed (start-up warns about it)."""
        return self.api_token is not None and len(self.api_token.get_secret_value()) < 16
