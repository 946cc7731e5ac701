"""Settings: every field is a flag of ``python -m service`` and a NORMCORE_* variable, shown
in ``--help`` with its default; flags win over the environment, which wins over ``.env``;
the token never comes from a flag, and may come from a file."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.settings import SECRETS, Settings, load_settings
from tests.server_process import service_process

TOKEN = "settings-test-token-0123456789"


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        load_settings(["--help"], env_file=None)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _help_blocks(text: str) -> dict[str, str]:
    """Each option's help text, by its first flag."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        found = re.match(r"\s{2}(--[a-z0-9-]+)", line)
        if found:
            current = found.group(1)
            blocks[current] = ""
        if current is not None:
            blocks[current] += " " + line.strip()
    return blocks


def test_help_lists_every_setting_with_its_default_and_variable(capsys) -> None:
    blocks = _help_blocks(_help(capsys))
    fields = [name for name in Settings.model_fields if name not in SECRETS]
    for name in fields:
        assert _flag(name) in blocks, f"{name} has no flag"
        text = " ".join(blocks[_flag(name)].split())
        assert "(default" in text, f"{_flag(name)} shows no default: {text}"
        assert f"NORMCORE_{name.upper()}" in text, f"{_flag(name)} names no variable: {text}"
    assert not {_flag(s) for s in SECRETS} & set(blocks)


def test_the_historic_flags_still_work(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    settings = load_settings(
        ["--host", "0.0.0.0", "--port", "9000", "--catalog", str(catalog), "--state-dir",
         str(tmp_path / "state"), "--device", "cpu", "--log-level", "warning"], env_file=None)
    assert (settings.host, settings.port, settings.device, settings.log_level) == (
        "0.0.0.0", 9000, "cpu", "warning")
    assert settings.catalog == catalog
    assert settings.state_dir == tmp_path / "state"


def test_flags_win_over_the_environment_which_wins_over_dotenv(tmp_path, monkeypatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("NORMCORE_PORT=9002\nNORMCORE_MAX_LAYERS=7\nNORMCORE_DEVICE=cpu\n"
                        "NORMCORE_KERNELS=false\n")
    monkeypatch.setenv("NORMCORE_PORT", "9001")
    monkeypatch.setenv("NORMCORE_MAX_LAYERS", "8")
    settings = load_settings(["--port", "9000"], env_file=str(env_file))
    assert settings.port == 9000  # flag
    assert settings.max_layers == 8  # environment over .env
    assert settings.device == "cpu"  # .env
    assert settings.kernels is False
    assert load_settings(["--kernels", "true"], env_file=str(env_file)).kernels is True


def test_dotenv_is_read_from_the_working_folder_by_the_entry_point_only(
    tmp_path, monkeypatch
) -> None:
    (tmp_path / ".env").write_text("NORMCORE_MAX_LAYERS=5\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings([]).max_layers == 5
    assert Settings().max_layers == 1024  # built in code: no file is read


def test_a_bad_flag_value_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="port"):
        load_settings(["--port", "70000"], env_file=None)
    with pytest.raises(SystemExit) as exit_:
        load_settings(["--no-such-flag", "1"], env_file=None)
    assert exit_.value.code == 2


def test_the_token_is_refused_as_a_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        load_settings(["--api-token", TOKEN], env_file=None)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "NORMCORE_API_TOKEN" in error
    assert TOKEN not in error


def test_the_token_comes_from_a_file(tmp_path, monkeypatch) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    settings = load_settings(["--api-token-file", str(secret)], env_file=None)
    assert settings.api_token.get_secret_value() == TOKEN
    monkeypatch.setenv("NORMCORE_API_TOKEN_FILE", str(secret))
    assert Settings().api_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(Settings())
    with pytest.raises(ValidationError, match="not both"):
        Settings(api_token=TOKEN)


@pytest.mark.parametrize(("content", "message"), [(None, "cannot read"), ("\n", "is empty")])
def test_an_unusable_token_file_stops_start_up(tmp_path, content, message) -> None:
    secret = tmp_path / "token"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(ValidationError, match=message):
        Settings(api_token_file=secret)


@pytest.mark.slow
def test_a_server_reads_dotenv_in_its_working_folder(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"NORMCORE_API_TOKEN={TOKEN}\nNORMCORE_DEVICE=cpu\n")
    with service_process(cwd=tmp_path) as server:
        reply = httpx.post(f"{server.url}/layers/stream.bn/reset", trust_env=False)
        assert reply.status_code == 401
        reply = httpx.post(f"{server.url}/layers/stream.bn/reset", trust_env=False,
                           headers={"Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == 200
