"""What a new user meets first: a weights check that says how to fix it, a busy port in one line."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from ovi_server.cli import build_parser, build_server_config, main
from tests.conftest import REPO


def test_weights_check_on_an_empty_directory_ends_with_the_fixing_command(tmp_path, capsys):
    assert main(["weights", "check", "--variant", "720x720_5s", "--weights", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.strip().startswith("MISSING") for line in lines) == 6
    assert lines[-2] == "0 ok, 6 missing or bad"
    assert lines[-1] == f"fix: ovi-server weights download --variant 720x720_5s --weights {tmp_path}"


def test_a_bad_file_is_deleted_before_the_download(tmp_path, capsys):
    (tmp_path / "Ovi").mkdir()
    (tmp_path / "Ovi" / "model_fp8_e4m3fn.safetensors").write_bytes(b"not a checkpoint")
    main(["weights", "check", "--variant", "720x720_5s", "--fp8", "--weights", str(tmp_path)])
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (
        "fix: delete the BAD files above, then run: "
        f"ovi-server weights download --variant 720x720_5s --weights {tmp_path} --fp8"
    )


def test_a_busy_port_is_one_line_without_a_traceback(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "ovi_server.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if "Errno" in line]
    assert lines == [
        f"cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use; another process has it "
        f"(`ss -ltnp 'sport = :{port}'` shows which): stop it or pick another --port"
    ]
    assert not (tmp_path / "jobs.sqlite3").exists()  # said before anything else started


@pytest.mark.parametrize(("value", "every"), [("off", 0), ("5", 5), ("1", 1)])
def test_previews_flag(value, every):
    args = build_parser().parse_args(["serve", "--previews", value])
    assert build_server_config(args).engine.preview_every == every


def test_previews_flag_refuses_other_words(capsys):
    assert main(["serve", "--previews", "sometimes"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ovi-server serve: error: --previews: bad value 'sometimes' from --previews: "
        "expected a number of steps or 'off', got 'sometimes'"
    )
