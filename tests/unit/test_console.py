"""`emu run`'s console (emu.pipeline.console): what kfp.local and the tasks print goes to the run's
log file, without ANSI codes; the terminal gets one line per stage start and end, a few progress
lines, and the runner's own lines. The lines are fed the way a run produces them: written to
file descriptors 1 and 2 by this process and by child processes, and logged."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

from emu.pipeline.console import RunConsole

CYAN, GREEN, RESET = "\x1b[96m", "\x1b[92m", "\x1b[0m"


def kfp_task(task: str, steps: int = 0) -> str:
    """A task as kfp.local prints it: coloured start, streamed output (executor JSON, the
    trainer's progress every tenth of the steps), coloured end."""
    lines = [f"12:00:00.000 - INFO - Executing task {CYAN}'{task}'{RESET}", "12:00:00.001 - INFO - Streamed logs:", "",
             "    [KFP Executor 2026-01-01 12:00:00,000 INFO]: Got executor_input:", "    {", '        "inputs": {}', "    }"]
    for step in range(steps // 10, steps + 1, steps // 10 or 1) if steps else ():
        lines.append(f"    [KFP Executor 2026-01-01 12:00:01,000 INFO]: {task} step {step}/{steps} loss "
                     f"{2 - step / steps:.3g}; {step} s elapsed, ETA {steps - step} s")
    lines += [f"12:00:02.000 - INFO - Task {CYAN}'{task}'{RESET} finished with status {GREEN}SUCCESS{RESET}",
              "-" * 80]
    return "\n".join(lines) + "\n"


def run_console(tmp_path, **options) -> tuple[list[str], str, list[tuple[str, str]]]:
    terminal = io.StringIO()
    hits: list[tuple[str, str]] = []
    log = tmp_path / "logs" / "run.log"
    with RunConsole(log, terminal=terminal, on_cache_hit=lambda task, key: hits.append((task, key)),
                    **options) as console:
        console.echo("run r1: preset tiny")
        os.write(1, kfp_task("prepare").encode())
        # A task's own output comes from a child process writing to the inherited descriptors.
        subprocess.run([sys.executable, "-c", f"import sys; sys.stdout.write({kfp_task('stage1', 30)!r})"], check=True)
        print("a warning from this process", file=sys.stderr)
        logging.getLogger("kfp").info("Task stage2 cache hit (key=abcdef123456); skipping execution.")
        logging.getLogger("kfp").info("Task stage2 cache hit (key=abcdef123456); skipping execution.")
        console.sync()  # the runner reads the outcome only once every line so far is handled
        assert hits == [("stage2", "abcdef123456")], "recorded while the run goes on, once"
        console.echo("run r1: SUCCEEDED")
    return terminal.getvalue().splitlines(), log.read_text(encoding="utf-8"), hits


def test_terminal_gets_stages_progress_and_summary_log_gets_everything(tmp_path):
    shown, logged, hits = run_console(tmp_path)

    events = [line.split(None, 1)[1] if line[:2].isdigit() else line for line in shown]
    assert events == [
        "run r1: preset tiny",
        "prepare     started",
        "prepare     succeeded in 0 s",
        "stage1      started",
        "stage1      step 12/30 loss 1.6, ETA 18 s",   # the first report past a third ...
        "stage1      step 21/30 loss 1.3, ETA 9 s",    # ... and past two thirds
        "stage1      succeeded in 0 s (step 30/30 loss 1)",
        "stage2      cached (reused, not run again)",
        "run r1: SUCCEEDED"]
    assert "\x1b" not in logged
    for expected in ("Executing task 'stage1'", '"inputs": {}', "stage1 step 3/30 loss 1.9", "a warning from this process",
                     "INFO kfp: Task stage2 cache hit", "run r1: SUCCEEDED"):
        assert expected in logged
    # The descriptors are back: nothing written now reaches the run's log.
    os.write(2, b"after the run\n")
    assert "after the run" not in (tmp_path / "logs" / "run.log").read_text()


def test_verbose_prints_every_line(tmp_path):
    shown, logged, _ = run_console(tmp_path, verbose=True)
    assert f"12:00:00.000 - INFO - Executing task {CYAN}'stage1'{RESET}" in shown  # as it came, colours kept
    assert "    [KFP Executor 2026-01-01 12:00:01,000 INFO]: stage1 step 3/30 loss 1.9; 3 s elapsed, ETA 27 s" in shown
    assert "a warning from this process" in shown and shown[-1] == "run r1: SUCCEEDED"
    assert len(shown) == len(logged.splitlines())


def test_a_terminal_that_is_the_log_file_gets_each_line_once(tmp_path):
    """`emu run` started in the background (dashboard, scheduler) with its output sent to the
    run's log: the console lines are not written a second time."""
    log = tmp_path / "run.log"
    with open(log, "a", encoding="utf-8") as terminal:
        with RunConsole(log, terminal=terminal) as console:
            console.echo("header")
            os.write(1, kfp_task("prepare").encode())
    lines = log.read_text().splitlines()
    assert lines.count("header") == 1 and sum("Executing task 'prepare'" in line for line in lines) == 1
    assert not any(line.endswith("prepare     started") for line in lines)
