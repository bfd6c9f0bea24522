"""Check that the lowest versions pyproject.toml declares for our runtime dependencies really work.

    python scripts/check_dependency_floors.py                         # the declared floors
    python scripts/check_dependency_floors.py --pin numpy==1.26.0     # try another version of one
    python scripts/check_dependency_floors.py --venv /tmp/floors      # reuse a venv between tries
    python scripts/check_dependency_floors.py tests/test_loading.py -k hub   # other arguments: pytest's

What it does:

1. Makes a tiny random checkpoint in the Hub layout with *this* interpreter
   (`python -m siglip_so400m.testing DIR --tiny`, which needs transformers).
2. Creates a clean venv (no system site-packages) and installs into it: `torch==2.13.0` (or
   `--torch SPEC`), exactly the declared minimum of each pure-Python runtime dependency
   (huggingface_hub, safetensors, sentencepiece, pillow, numpy, tqdm), the test extra *without
   transformers* (pytest, protobuf, scikit-image, at whatever versions pip finds compatible with
   those floors), and this package itself as a regular (non-editable) wheel, so package data is
   checked as a user gets it.
3. Runs the fast tests (`-m "not slow"`) in that venv against the prebuilt checkpoint
   (SIGLIP_SO400M_TEST_TINY_CKPT, see tests/conftest.py).

Why no transformers: transformers 5, our numerical reference, needs a far newer huggingface_hub
(and others) than our own code does, so installing it would lift the very floors under test. The
floors are about *our* package's runtime needs. Tests that stop on `ModuleNotFoundError:
transformers` (the parity tests, which compute the reference in the same run) are therefore counted
apart and printed as "need transformers", never as passed; any other failure or error fails the
check. The parity tests run in the normal test environment with current versions.

Exit status 0 only if no test failed and at least one passed. Network-bound (pip), a few minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE_PYTHON = ("huggingface_hub", "safetensors", "sentencepiece", "pillow", "numpy", "tqdm")
TEST_EXTRA_WITHOUT_TRANSFORMERS = ("pytest>=8", "protobuf", "scikit-image")

# Loaded into pytest in the venv: a test that fails only because transformers is absent is
# reported as its own outcome, so that it can be neither a pass nor a floor failure.
PLUGIN = textwrap.dedent('''
    import pytest

    NEEDS = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        outcome = yield
        report = outcome.get_result()
        if report.failed and call.excinfo is not None \\
                and call.excinfo.errisinstance(ModuleNotFoundError) \\
                and getattr(call.excinfo.value, "name", "") == "transformers":
            report.outcome = "skipped"
            report.longrepr = (str(item.path), 0, "needs transformers")
            if report.when in ("setup", "call"):
                NEEDS.append(item.nodeid)

    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line(f"FLOORS: {len(NEEDS)} tests need transformers (not run here)")
''')


def declared_floors() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    floors = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([^",;]+)"', deps))
    missing = [p for p in (*PURE_PYTHON, "torch") if p not in floors]
    if missing:
        raise SystemExit(f"pyproject.toml declares no floor for: {', '.join(missing)}")
    return floors


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION",
                    help="install this version instead of the declared floor (repeatable)")
    ap.add_argument("--torch", default="torch==2.13.0", help="torch requirement (default: %(default)s)")
    ap.add_argument("--venv", type=Path, help="venv folder (reused if it exists; default: a temp one)")
    args, pytest_args = ap.parse_known_args()  # the rest goes to pytest: test files, -k EXPR, ...

    floors = declared_floors()
    wanted = {name: f"{name}=={floors[name]}" for name in PURE_PYTHON}
    for pin in args.pin:
        name = re.split(r"[=<>!~]", pin, maxsplit=1)[0]
        if name not in wanted:
            raise SystemExit(f"--pin {pin}: not one of {', '.join(PURE_PYTHON)}")
        wanted[name] = pin

    with tempfile.TemporaryDirectory(prefix="floors-") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "tiny"
        run([sys.executable, "-m", "siglip_so400m.testing", str(ckpt), "--tiny"],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.DEVNULL)
        venv = args.venv or tmp / "venv"
        py = venv / "bin" / "python"
        if not py.exists():
            run([sys.executable, "-m", "venv", str(venv)])
        # One resolve: the floors exactly, the test tools at whatever fits beside them.
        run([str(py), "-m", "pip", "install", "-q", args.torch, *wanted.values(),
             *TEST_EXTRA_WITHOUT_TRANSFORMERS])
        run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)])
        run([str(py), "-m", "pip", "list", "--format=freeze"])
        (tmp / "floors_plugin.py").write_text(PLUGIN)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(SIGLIP_SO400M_TEST_TINY_CKPT=str(ckpt), PYTHONPATH=str(tmp), HF_HUB_OFFLINE="1")
        # From the repo root so tests/ and its conftest are found; the package comes from the venv.
        cmd = [str(py), "-m", "pytest", "-m", "not slow", "-q", "-p", "floors_plugin",
               "-p", "no:cacheprovider", *pytest_args]
        print("+", " ".join(cmd), flush=True)
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    print(f"\nfloors tried: {', '.join(wanted.values())}, {args.torch}")
    print("PASS" if code == 0 else f"FAIL (pytest exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
