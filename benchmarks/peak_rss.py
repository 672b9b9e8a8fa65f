"""The peak RSS of one console command, run in a fresh process as a user runs it (Linux VmHWM)."""

import subprocess
import sys
import tempfile
from pathlib import Path

# Runs `main` of the named module and writes the process's peak RSS (VmHWM, kB). The peak is reset first: Linux
# keeps it across exec, so it would otherwise start at the size of the (forking) benchmark process.
PROBE = """
import importlib, sys
open("/proc/self/clear_refs", "w").write("5")
code = importlib.import_module(sys.argv[2]).main(sys.argv[3:])
peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
open(sys.argv[1], "w").write(peak)
sys.exit(code)
"""


def run_with_peak_rss(module: str, args: list[str], **run_options) -> tuple[int, float]:
    """(exit code, peak RSS in MiB) of `module.main(args)` in a fresh interpreter; `run_options` go to
    `subprocess.run` (env, stdout, ...)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "peak.txt"
        command = [sys.executable, "-c", PROBE, str(report), module, *map(str, args)]
        code = subprocess.run(command, **run_options).returncode
        return code, (int(report.read_text()) / 1024 if report.exists() else float("nan"))
