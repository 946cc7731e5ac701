"""Settings: one class, read from command-line flags, NORMCORE_* environment variables and
a ``.env`` file, in that order of precedence.

The flags of ``python -m service`` are generated from the class (``load_settings``), so a
field is a flag, an environment variable and a line of ``--help`` at once, and they cannot
drift apart. Secrets are never flags (a command line shows in ``ps``): the token comes from
``NORMCORE_API_TOKEN`` or from the file ``NORMCORE_API_TOKEN_FILE`` names.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, CliSettingsSource, NoDecode, SettingsConfigDict

from .core.devices import DEVICE_HELP, DEVICE_OR_AUTO

PROG = "python -m service"
# Read by the entry points (``load_settings``, ``create_app()`` without settings), relative to
# the working folder; ``Settings(...)`` built in code reads no file.
ENV_FILE = ".env"
# Fields that never become flags.
SECRETS = frozenset({"api_token"})


def cores() -> int:
    """The machine's CPU count (``threads``' default)."""
    return os.cpu_count() or 1


HELP = """\
Serve normcore layers over HTTP (REST and the KServe V2 protocol) and gRPC (KServe V2).
Every flag also reads
the environment variable shown with it, and a .env file in the working folder; flags win,
then the environment, then .env. The token is never a flag: set NORMCORE_API_TOKEN or
NORMCORE_API_TOKEN_FILE."""


class Settings(BaseSettings):
    """Everything the service can be told (``HELP``)."""

    model_config = SettingsConfigDict(
        env_prefix="NORMCORE_", extra="ignore", env_file=None, cli_kebab_case=True,
        cli_prog_name=PROG, cli_hide_none_type=True, json_schema_extra={"description": HELP})

    host: str = Field("127.0.0.1", description="Interface to bind; the image sets 0.0.0.0.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: any free one).")
    grpc_port: int = Field(8001, ge=0, le=65535,
                           description="gRPC port (KServe V2), on the same host; 0: no gRPC.")
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
    api_token_file: Path | None = Field(
        None, description="File holding the bearer token (Docker/Kubernetes secrets), instead "
        "of NORMCORE_API_TOKEN.")
    protect_reads: bool = Field(False, description="Require the token for reads too.")
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0,
                                description="Largest request body, sent or decompressed.")
    max_elements: int = Field(64 * 1024 * 1024, gt=0,
                              description="Largest tensor, in elements.")
    max_rank: int = Field(8, gt=0, le=32, description="Largest tensor rank.")
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
        description="Seconds a client has to send one request's headers and body, and to "
        "take each 64 KB of a reply it lets back up; slower connections are closed.",
    )
    batch_max_size: int = Field(
        0, ge=0, le=4096,
        description="Merge up to this many concurrent eval requests per layer (0 or 1: off).",
    )
    batch_max_delay_ms: float = Field(
        2.0, gt=0, le=1000, description="Longest wait for a batch to fill, in milliseconds.",
    )
    threads: int = Field(default_factory=cores, gt=0,
                         description="torch intra-op threads; the CPU count by default.")
    kernels: bool = Field(True, description="Fused C++ kernels for float32 CPU tensors, "
                          "compiled (once per machine) before /readyz turns 200; off: the "
                          "plain torch path.")
    tune_allocator: bool = Field(True, description="Keep freed tensor memory in the process "
                                 "(python -m service only): large outputs skip page faults, "
                                 "resident memory stays near its peak.")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="Least severe messages logged.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per event; json: one JSON object per "
        "line (time, level, message, request_id, route, status, latency_ms, layer).")

    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="Origins browsers may call from, comma-separated "
        "(or *); none by default.")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

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
        if self.api_token_file is not None:
            if self.api_token is not None:
                raise ValueError("set api_token (NORMCORE_API_TOKEN) or api_token_file "
                                 "(NORMCORE_API_TOKEN_FILE), not both")
            self.api_token = _read_token(self.api_token_file)
        # Failing closed: "protect reads" without a token would silently protect nothing.
        if self.protect_reads and self.api_token is None:
            raise ValueError("protect_reads needs api_token (NORMCORE_API_TOKEN) to be set")
        return self

    def weak_token(self) -> bool:
        """A token so short it could be guessed (start-up warns about it)."""
        return self.api_token is not None and len(self.api_token.get_secret_value()) < 16


def _read_token(path: Path) -> SecretStr:
    try:
        token = path.read_text().strip()  # files usually end with a newline
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read api_token_file {path}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise ValueError(f"api_token_file {path} is empty")
    return SecretStr(token)


class _SecretFlagAction(argparse.Action):
    """Refuses a secret given as a flag, saying where it belongs."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        env = f"NORMCORE_{self.dest.upper()}"
        parser.error(f"{option_string}: secrets are not taken from the command line (it shows "
                     f"in ps and shell history); set {env} or {env}_FILE")


def _add_argument(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> Any:
    if kwargs.get("dest") in SECRETS:
        return parser.add_argument(*names, dest=kwargs["dest"], action=_SecretFlagAction,
                                   help=argparse.SUPPRESS)
    return parser.add_argument(*names, **kwargs)


def load_settings(argv: Sequence[str] | None = None, env_file: str | None = ENV_FILE
                  ) -> Settings:
    """Settings from the command line (``sys.argv`` when None), the environment and
    ``env_file``. ``--help`` prints every flag with its default and variable and exits;
    a bad flag exits with status 2; invalid values raise ``ValidationError``."""
    source = CliSettingsSource(
        Settings, cli_parse_args=True if argv is None else list(argv), cli_show_env_vars=True,
        add_argument_method=_add_argument,
    )
    return Settings(_cli_settings_source=source, _env_file=env_file)
