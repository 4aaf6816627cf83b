"""The command line starts, answers --help and reports bad input without importing torch / diffusers / transformers.

Those libraries take seconds to import, so the modules a command imports at start-up keep them out: they are
imported inside the functions that load models, each with a one-line reason. Every check runs in a fresh
interpreter (``python -c``) and lists the heavy modules it finds in ``sys.modules`` afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "diffusers", "transformers")
SRC = str(Path(__file__).resolve().parents[1] / "src")

CHECKS = {
    "parse generate": """
from ipadapter.cli import build_parser
args = build_parser().parse_args(["generate", "--base", "x", "--image", "y"])
assert args.mode == "t2i", args.mode
""",
    "check options": """
from ipadapter.jobs.options import check_options
assert check_options({"base": "x", "steps": 2})["steps"] == 2
""",
    "help of every command": """
import argparse, contextlib, io
from ipadapter.cli import build_parser, main
parser = build_parser()
(commands,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
assert len(commands) >= 10, sorted(commands)
for command in ["--help", *(f"{c} --help" for c in commands)]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(command.split())
        except SystemExit as done:
            assert done.code == 0, (command, done.code)
    assert "usage: ipadapter" in out.getvalue(), command
""",
    "bad input, reported early": """
from ipadapter.cli import main
assert main(["generate", "--base", "b", "--adapter", "a", "--image", "missing.png"]) == 2
assert main(["train", "--base", "b"]) == 2  # no --data / --output
assert main(["embed", "--adapter", "a", "--image", "missing.png", "--output", "e.safetensors"]) == 2
assert main(["demo", "--output", "demo.jpg"]) == 2
assert main(["serve", "--base", "b", "--adapter", "a", "--token-file", "missing.txt"]) == 2
""",
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_start_up_imports_no_heavy_library(name: str, tmp_path: Path) -> None:
    code = CHECKS[name] + f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", f"{name}: imported {done.stdout.strip()}"
