"""`ovi-server generate` checks its input before it imports torch or loads a model: a typo costs
milliseconds. Each case runs in a fresh interpreter, which then reports whether torch was imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROMPT = "A cat says <S>hello<E> Audio: purring"


def run_generate(*args: str) -> tuple[int, str, bool]:
    code = (
        "import json, sys\n"
        "from ovi_server.cli import main\n"
        f"rc = main({['generate', *args]!r})\n"
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["rc"], done.stderr, result["torch"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("A man says <S>hi",), "prompt: <S> at character offset 11 is never closed"),
        ((PROMPT, "--steps", "0"), "steps: must be between 1 and 1000, got 0"),
        ((PROMPT, "--solver", "heun"), None),  # argparse refuses it (exit 2 via SystemExit)
        ((PROMPT, "--seed", "-1"), "seed: must be between 0"),
        ((PROMPT, "--resolution", "0x512"), "size: width and height must be positive"),
        ((PROMPT, "--variant", "nope"), "no config for variant 'nope'"),
        ((PROMPT, "--image", "pyproject.toml"), "--image: pyproject.toml: not an image we can read"),
    ],
)
def test_bad_input_is_refused_before_torch_is_imported(args: tuple[str, ...], message: str | None):
    if message is None:
        done = subprocess.run(
            [sys.executable, "-m", "ovi_server.cli", "generate", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and "invalid choice: 'heun'" in done.stderr
        return
    rc, err, torch_imported = run_generate(*args)
    assert rc == 2 and f"error: {message}" in err, err
    assert "Traceback" not in err and "loading" not in err
    assert not torch_imported
