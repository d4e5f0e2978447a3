"""The settings object: defaults < config file < environment < flags, for every kind of option, on
every command; bad values name the option and where they came from; --help names env vars and defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ovi_server import settings
from ovi_server.cli import build_parser, build_server_config, main
from ovi_server.config import ServerConfig
from ovi_server.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

# One option of each kind: (flag, env var, file value, env value, flag value, how to read it back, the
# three values read back). An int, a float, a Literal choice, a path, a comma list, a switch, a string
# with its own parser (--previews) and an engine setting.
KINDS = [
    ("--port", "OVI_PORT", 8001, "8002", "8003", lambda c: c.port, (8001, 8002, 8003)),
    ("--lease-seconds", "OVI_LEASE_SECONDS", 1.5, "2.5", "3.5", lambda c: c.lease_s, (1.5, 2.5, 3.5)),
    ("--offload", "OVI_OFFLOAD", "model", "block", "model", lambda c: c.engine.offload, ("model", "block", "model")),
    ("--data-dir", "OVI_DATA_DIR", "/f", "/e", "/c", lambda c: c.data_dir, (Path("/f"), Path("/e"), Path("/c"))),
    ("--api-keys", "OVI_API_KEYS", ["a:1", "b:2"], "c:3", "d:4, e:5", lambda c: c.api_keys,
     (("a:1", "b:2"), ("c:3",), ("d:4", "e:5"))),
    ("--previews", "OVI_PREVIEWS", "off", "3", "7", lambda c: c.engine.preview_every, (0, 3, 7)),
    ("--variant", "OVI_VARIANT", "720x720_5s", "960x960_5s", "960x960_10s", lambda c: c.engine.variant,
     ("720x720_5s", "960x960_5s", "960x960_10s")),
    ("--batch-guidance", "OVI_BATCH_GUIDANCE", "on", "off", "on", lambda c: c.engine.batch_guidance,
     ("on", "off", "on")),
    ("--gpu-memory", "OVI_GPU_MEMORY", 31.5, "12", "23.5", lambda c: c.engine.gpu_memory, (31.5, 12.0, 23.5)),
]  # fmt: skip


@pytest.fixture(autouse=True)
def no_ovi_env(monkeypatch: pytest.MonkeyPatch):
    """The developer's own OVI_* settings must not leak into these checks."""
    for opt in settings.options():
        monkeypatch.delenv(opt.env, raising=False)
    monkeypatch.delenv("OVI_CONFIG", raising=False)


def load(*argv: str) -> ServerConfig:
    return build_server_config(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize("kind", KINDS, ids=[k[0] for k in KINDS])
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_default_then_file_then_env_then_flag(kind, suffix, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    flag, env, in_file, in_env, on_flag, read, (from_file, from_env, from_flag) = kind
    default = read(ServerConfig())
    assert read(load()) == default and default not in (from_file, from_env, from_flag)
    path = tmp_path / f"ovi{suffix}"
    key = flag.lstrip("-")
    if suffix == ".json":
        path.write_text(json.dumps({key: in_file}))
    else:
        path.write_text(f"{key} = {json.dumps(in_file)}\n")  # a JSON scalar or list is TOML too
    assert read(load("--config", str(path))) == from_file
    monkeypatch.setenv("OVI_CONFIG", str(path))  # the file by env var, as in a systemd unit
    assert read(load()) == from_file
    monkeypatch.setenv(env, in_env)
    assert read(load()) == from_env
    assert read(load(flag, on_flag)) == from_flag


def test_a_switch_is_on_from_any_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert load().no_auth is False
    (tmp_path / "on.toml").write_text("no_auth = true\n")  # underscores work as well as dashes
    (tmp_path / "off.toml").write_text("no-auth = false\n")
    assert load("--config", str(tmp_path / "on.toml")).no_auth is True
    monkeypatch.setenv("OVI_NO_AUTH", "0")  # the environment wins over the file, both ways
    assert load("--config", str(tmp_path / "on.toml")).no_auth is False
    monkeypatch.setenv("OVI_NO_AUTH", "1")
    assert load("--config", str(tmp_path / "off.toml")).no_auth is True
    monkeypatch.delenv("OVI_NO_AUTH")
    assert load("--config", str(tmp_path / "off.toml"), "--no-auth").no_auth is True


def test_a_shared_file_serves_serve_worker_and_generate(tmp_path: Path):
    """Keys a command does not take are left alone, so one file configures the server and its workers."""
    path = tmp_path / "ovi.toml"
    path.write_text(
        'port = 9100\nqueue = "redis://127.0.0.1:6390/0"\nvariant = "720x720_5s"\ndevice = "cpu"\n'
    )
    worker = build_server_config(build_parser().parse_args(["worker", "--config", str(path)]))
    assert (worker.queue, worker.engine.variant, worker.port) == (
        "redis://127.0.0.1:6390/0",
        "720x720_5s",
        8000,
    )
    generate = build_server_config(build_parser().parse_args(["generate", "hi", "--config", str(path)]))
    assert (generate.engine.variant, generate.engine.device) == ("720x720_5s", "cpu")


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("flag", "ovi-server serve: error: --port: bad value 'eighty' from --port: "),
        ("env", "ovi-server serve: error: --port: bad value 'eighty' from OVI_PORT (environment): "),
        ("file", "ovi-server serve: error: --port: bad value 'eighty' from port in {path}: "),
    ],
)
def test_a_bad_value_is_one_line_naming_the_option_and_its_source(where, expected, tmp_path: Path):
    path = tmp_path / "ovi.toml"
    path.write_text('port = "eighty"\n' if where == "file" else "")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OVI_")}
    argv = ["serve", "--config", str(path), "--data-dir", str(tmp_path / "data")]
    if where == "flag":
        argv += ["--port", "eighty"]
    if where == "env":
        env["OVI_PORT"] = "eighty"
    done = subprocess.run(
        [sys.executable, "-m", "ovi_server.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(expected.format(path=path)) and "valid integer" in lines[0]
    assert not (tmp_path / "data").exists()  # refused before anything started


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown settings ['prot']"),
        ("port = \n", "not valid TOML"),
        ('storage = "ftp"\n', "--storage: bad value 'ftp' from storage in"),
        ('allowed-networks = "10.0.0.0/33"\n', "--allowed-networks: bad value '10.0.0.0/33'"),
        ("gpu-memory = 0\n", "--gpu-memory: bad value 0 from gpu-memory in"),
        ('gpu-memory = "lots"\n', "--gpu-memory: bad value 'lots' from gpu-memory in"),
    ],
)
def test_bad_config_files_are_refused(text: str, message: str, tmp_path: Path):
    path = tmp_path / "ovi.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load("--config", str(path))


def test_a_missing_config_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["worker", "--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"ovi-server worker: error: --config / OVI_CONFIG: cannot read {tmp_path / 'nope.toml'}: No such file or directory"
    )


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["generate", "x"], ["weights", "check"]])
def test_help_shows_every_option_with_its_env_var_and_default(command, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    name = "weights" if command[0] == "weights" else command[0]
    shown = 0
    for opt in settings.options(name):
        default = opt.default({"weights_dir": Path("weights")} if name == "weights" else {})
        assert f"{opt.flag} " in text and f"[env {opt.env}]" in text
        if default not in (None, ()):
            word = "off" if default is False else settings._text(default)
            assert f"[env {opt.env}] (default: {word})" in text, opt.flag
            shown += 1
    assert shown >= 3 and "[env OVI_CONFIG]" in text


def test_serve_hands_its_settings_to_a_worker_by_flags(tmp_path: Path):
    """What a server reads from its file and env reaches its workers (they get explicit flags)."""
    path = tmp_path / "ovi.toml"
    path.write_text(f'data-dir = "{tmp_path}"\nstorage = "s3"\ns3-bucket = "b"\npreviews = 2\nfp8 = true\n')
    config = load("--config", str(path), "--log-level", "debug")
    argv = settings.to_argv(config, "worker")
    again = build_server_config(build_parser().parse_args(["worker", *argv]))
    assert again.engine == config.engine and again.log == config.log and again.s3_bucket == "b"
    assert (again.engine.preview_every, again.engine.fp8, again.data_dir) == (2, True, tmp_path)


def test_gpu_memory_is_gib_or_off(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    assert load("--gpu-memory", "38").engine.gpu_memory == 38.0
    monkeypatch.setenv("OVI_GPU_MEMORY", "38")
    assert load("--gpu-memory", "off").engine.gpu_memory is None  # the flag lifts the env's limit
    from ovi_server.engine.device import resolve_placement

    with caplog.at_level("WARNING"):
        assert resolve_placement("cpu", gpu_memory_gib=8.0).memory_limit is None
    assert "--gpu-memory has no effect on the CPU" in caplog.text
