"""What every bench worker does around its measurement: time it, catch any failure for the
parent to print, record the process's own peak RSS, and write the result file."""

from __future__ import annotations

import json
import resource
import time
import traceback
from pathlib import Path
from typing import Callable


def run_and_report(spec: dict, result: dict, measure: Callable[[], None]) -> int:
    t0 = time.perf_counter()
    try:
        measure()
    except BaseException as exc:  # noqa: BLE001 - report anything, the parent prints it
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result_path"]).write_text(json.dumps(result, indent=1))
    return 1 if "error" in result else 0
