"""docker-compose.yml: the real Compose CLI validates it; its services are hardened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .deploy_files import (
    CATALOG_DIR,
    COMPOSE_FILE,
    STATE_DIR,
    _clean_env,
    _defaults,
    _env_map,
    _run,
    _stage_args,
    _stages,
    _volume_strings,
)

# --------------------------------------------------------------------------------------------
# (a) the compose file validates (real Compose CLI, no engine needed)


@pytest.mark.parametrize("profiles", [[], ["--profile", "gpu"], ["--profile", "replicas"]],
                         ids=["default", "gpu", "replicas"])
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
# scale out: the replicas profile


def test_compose_replicas_share_postgres_behind_a_load_balancer(
    compose_cli: list[str], compose_project: Path, tmp_path: Path
) -> None:
    (compose_project / ".env").write_text("NORMCORE_DB_PASSWORD=from-dot-env\n", encoding="utf-8")
    proc = _run([*compose_cli, "--profile", "replicas", "config", "--format", "json"],
                compose_project, _clean_env(tmp_path))
    assert proc.returncode == 0, f"compose config failed:\n{proc.stdout}\n{proc.stderr}"
    model = json.loads(proc.stdout)
    db, replica, lb = (model["services"][n] for n in ("postgres", "normcore-replica",
                                                       "normcore-lb"))
    assert db["image"].startswith("postgres:")  # the official image
    assert db["environment"]["POSTGRES_PASSWORD"] == "from-dot-env"
    assert "pg_isready" in db["healthcheck"]["test"]
    (data,) = db["volumes"]
    assert data["type"] == "volume"
    assert data["source"] == "normcore-db"
    assert "ports" not in db, "the database is reached only on the compose network"

    env = replica["environment"]
    assert env["NORMCORE_STATE_URL"].startswith("postgresql://normcore@postgres:5432/")
    assert env["PGPASSWORD"] == "from-dot-env"
    assert "NORMCORE_STATE_DIR" not in env, "a state dir and a state URL do not mix"
    assert replica["deploy"]["replicas"] == 3
    assert "ports" not in replica, "replicas are reached through the load balancer"
    assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert replica["read_only"] is True
    assert replica["cap_drop"] == ["ALL"]

    assert lb["image"].startswith("nginx:")
    (port,) = lb["ports"]
    assert port["host_ip"] == "127.0.0.1"
    assert port["target"] == 8000
    (conf,) = lb["volumes"]
    assert conf["target"] == "/etc/nginx/conf.d/default.conf"
    assert conf["read_only"] is True
    for name in ("postgres", "normcore-replica", "normcore-lb"):
        assert model["services"][name]["profiles"] == ["replicas"]


def test_the_load_balancer_sends_requests_to_every_replica() -> None:
    conf = (COMPOSE_FILE.parent / "deploy" / "nginx.conf").read_text(encoding="utf-8")
    assert "server normcore-replica:8000 resolve;" in conf
    assert "proxy_pass http://normcore;" in conf
    assert "non_idempotent" not in conf, "a POST that reached a replica must not be resent"
    assert "listen 8000;" in conf
