"""What the benchmark scripts share: one line naming the machine, and writing a script's section of RESULTS.md."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def machine(*extra: str) -> str:
    """``"<n> CPUs (<model>), Linux <release>, torch <version> (<n> threads), <extra>, load average <x> at start"``:
    what a reader needs to weigh a timing taken on a shared machine."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return ", ".join([f"{os.cpu_count()} CPUs ({model})", f"{platform.system()} {platform.release()}",
                      f"torch {torch.__version__} ({torch.get_num_threads()} threads)", *extra,
                      f"load average {load:.2f} at start"])


def write_section(results_md: Path, section: str, body: str, script: str) -> None:
    """Write ``body`` as the generated part of ``section`` (a ``## `` heading line) of ``results_md``, or append
    the section. The generated part ends with a marker line naming ``script``: notes written below it by hand,
    and every other section, stay as they are when the benchmark runs again."""
    end = f"<!-- end of {script} output; notes below are kept when it runs again -->"
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    generated = f"{section}\n\n{body.rstrip()}\n\n{end}\n"
    ours = re.compile(rf"^{re.escape(section)}\n.*?(?:^{re.escape(end)}\n|(?=^## )|\Z)", re.S | re.M)
    if ours.search(text):
        text = ours.sub(lambda _: generated, text, count=1)
    else:
        text = text.rstrip() + "\n\n\n" + generated
    results_md.write_text(text)
