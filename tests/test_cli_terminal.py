"""What a person sees in the terminal: one progress display, no library noise, one final line
that names the next command; the same argument names on every command; help that wraps.

The sweep runs are real (a local Ray cluster, `tiny-llama`) in a subprocess, once into a
pipe (a log file, CI) and once on a pseudo-terminal, because what leaks (Ray's auth notice,
worker colour codes, transformers' loading bars) only shows in a real process."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from synthetic import make_sweep
from typer.testing import CliRunner

from rloop_ray import __version__
from rloop_ray.cli import app

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NOISE = ("Token authentication", "Loading weights", "(ModelWorker", "Started a local Ray",
         "it/s]")
GRID = """\
name: term
models: [tiny-llama]
prompts: {{bank: {bank}, conditions: [A, C], n_pairs: 2}}
interventions: {{layers: ["50%:100%"], alpha: [1.0]}}
controls: [natural, shuffle]
generation: {{max_new_tokens: 4}}
measure: {{window: 4}}
"""
CLI = [sys.executable, "-c", "from rloop_ray.cli import app; app()"]

runner = CliRunner()


def _grid(tmp_path: Path) -> Path:
    path = tmp_path / "term.yaml"
    path.write_text(GRID.format(bank=REPO / "prompts"))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "COLUMNS")}
    env.update(extra)
    return env


def _final_lines(text: str) -> list[str]:
    """What stays on screen: ANSI codes removed, carriage-return redraws collapsed."""
    lines = []
    for raw in ANSI.sub("", text).split("\n"):
        shown = raw.split("\r")
        lines.append(next((s for s in reversed(shown) if s.strip()), "").rstrip())
    return [ln for ln in lines if ln.strip()]


@pytest.mark.ray
def test_sweep_into_a_log_file_is_clean_and_ends_with_the_next_command(tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run([*CLI, "sweep", str(_grid(tmp_path)), "--results-dir", str(results)],
                          capture_output=True, text=True, env=_env(), timeout=300, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert not ANSI.search(out), repr(out[:500])
    for noise in NOISE:
        assert noise not in out, noise
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines[-1] == f"next: rloop-ray stats {results / 'term'}"
    assert sum("rloop-ray stats" in ln for ln in out.splitlines()) == 1
    assert sum(ln.startswith("complete:") for ln in out.splitlines()) == 1
    header = lines[0]
    assert header.startswith("sweep term: 6 cells in 4 units on tiny-llama")
    # the driver's log says the same counts as the header
    assert "6 cells planned in 4 units" in proc.stderr
    for phase in ("loading tiny-llama", "running tiny-llama", "writing"):
        assert f"INFO rloop_ray.driver: {phase}" in proc.stderr


@pytest.mark.ray
def test_sweep_on_a_terminal_shows_one_display_and_no_noise(tmp_path):
    results = tmp_path / "results"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([*CLI, "sweep", str(_grid(tmp_path)), "--results-dir",
                             str(results)], stdin=slave, stdout=slave, stderr=slave,
                            env=_env(TERM="xterm-256color"), cwd=REPO, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    raw = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, raw[-2000:]
    for noise in NOISE:
        assert noise not in raw, noise
    screen = _final_lines(raw)
    assert screen[-1] == f"next: rloop-ray stats {results / 'term'}", screen
    assert sum("rloop-ray stats" in ln for ln in screen) == 1
    assert screen[-2].startswith("complete: 6 cells ok")
    assert screen[0].startswith("sweep term: 6 cells in 4 units")
    # one display, redrawn in place: its phases appear in the stream, its last state stays
    text = ANSI.sub("", raw)
    for phase in ("starting Ray", "loading tiny-llama", "running tiny-llama"):
        assert phase in text, phase
    assert re.search(r"done .*6/6 cells", screen[-3]), screen[-3]
    assert "INFO" not in text  # progress is the display, not log lines


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"rloop-ray {__version__}"


def _help(*command: str) -> str:
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize(("command", "usage"), [
    (("sweep",), "{GRID.yaml}"),
    (("validate",), "{GRID.yaml}"),
    (("status",), "{SWEEP_DIR}"),
    (("repair",), "{SWEEP_DIR}"),
    (("stats",), "{SWEEP_DIR}"),
    (("rate", "export"), "{SWEEP_DIR}"),
    (("rate", "import"), "{SWEEP_DIR} {SHEET.csv}"),
])
def test_arguments_have_the_same_names_on_every_command(command, usage):
    text = _help(*command)
    line = next(ln for ln in text.splitlines() if "Usage:" in ln)
    assert line.strip().endswith(usage), line


def _option_row(text: str, long: str) -> str:
    return next(ln for ln in text.splitlines() if f" {long}" in ln and ln.startswith("│"))


@pytest.mark.parametrize("command", ["sweep", "validate", "measure"])
def test_dash_m_is_the_model_everywhere(command):
    row = _option_row(_help(command), "--model")
    assert " -m " in row, row


def test_stats_has_no_short_metric_option():
    text = _help("stats")
    assert " -m " not in text
    assert "--metric" in text


def test_help_rewraps_docstrings_instead_of_keeping_their_line_breaks():
    text = " ".join(_help("sweep").split("\n"))
    assert "nothing starts and nothing is written unless the grid is valid on every model" in \
        re.sub(r"\s+", " ", text)
    raw = _help("sweep")
    assert not any(ln.rstrip().endswith("nothing is written") for ln in raw.splitlines())


def test_status_is_a_table(tmp_path):
    sw = make_sweep(tmp_path, "st", models=("llama-tiny", "mistral-tiny"), n_prompts=4,
                    controls=(), fail_every=7)
    res = runner.invoke(app, ["status", str(sw.path)])
    assert res.exit_code == 0, res.output
    lines = [ln.split() for ln in res.output.splitlines() if ln.strip()]
    header = next(ln for ln in lines if ln[:1] == ["model"])
    assert header == ["model", "planned", "done", "failed", "remaining"]
    rows = {ln[0]: ln[1:] for ln in lines if ln[0] in ("llama-tiny", "mistral-tiny", "total")}
    failed = int((sw.written["status"] == "failed").sum())
    assert int(rows["total"][2]) == failed
    assert rows["total"][0] == str(sw.n_total)
