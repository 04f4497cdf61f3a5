"""Start-up cost of the worker: importing handler.py, and answering a bad job (no training library loaded).

    python bench/bench_handler.py [--json OUT]
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, sys, time
t0 = time.perf_counter()
import handler
t1 = time.perf_counter()
result = handler.handler({"id": "bench", "input": {"dataset_url": "https://x.supabase.co/d?token=t",
                                                   "hyperparameters": {"learning_rate": 5}}})
t2 = time.perf_counter()
assert "error" in result and "torch" not in sys.modules
print(json.dumps({"import_s": t1 - t0, "bad_job_ms": (t2 - t1) * 1000}))
"""


def main() -> int:
    runs = [json.loads(subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                                      check=True).stdout) for _ in range(5)]
    result = {"import_handler_seconds_median": round(statistics.median(r["import_s"] for r in runs), 3),
              "bad_job_answer_ms_median": round(statistics.median(r["bad_job_ms"] for r in runs), 2),
              "runs": 5, "date": time.strftime("%Y-%m-%d")}
    print(f"import handler.py: {result['import_handler_seconds_median']} s (median of 5); "
          f"a bad job answered in {result['bad_job_answer_ms_median']} ms")
    if len(sys.argv) > 2 and sys.argv[1] == "--json":
        Path(sys.argv[2]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
