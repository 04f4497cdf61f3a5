"""Loader throughput: normalization MB/s beside a json.loads-only pass over the same file, same run.

    python bench/bench_loader.py [--mb 100] [--json OUT]

Generates a BrightRun v4 file of about --mb megabytes from the bundled sample (each pair repeated
with a unique id and a varied target, so nothing is dropped as a duplicate), then times
`dataset_loader.load_dataset` and a loop that only splits lines and runs `json.loads`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataset_loader import load_dataset  # noqa: E402

SAMPLE = ROOT / "data" / "brightrun-eq12-demo.jsonl"


def generate(path: Path, megabytes: float) -> int:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    header, pairs = lines[0], [json.loads(line) for line in lines[1:]]
    target, written, n = megabytes * 1024**2, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + "\n")
        while written < target:
            pair = dict(pairs[n % len(pairs)])
            pair["id"] = f"{pair['id']}-{n}"
            pair["target_response"] = f"{pair['target_response']} ({n})"
            line = json.dumps(pair, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            n += 1
    return n


def json_only(path: Path) -> int:
    count = 0
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                json.loads(raw)
                count += 1
    return count


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(megabytes: float, repeats: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        pairs = generate(path, megabytes)
        size_mb = path.stat().st_size / 1024**2
        json_s, load_s = float("inf"), float("inf")
        for _ in range(repeats):  # interleaved, so that machine noise hits both alike
            json_s = min(json_s, timed(lambda: json_only(path)))
            load_s = min(load_s, timed(lambda: load_dataset(path)))
        tracemalloc.start()
        conversations, report = load_dataset(path)
        peak_mb = tracemalloc.get_traced_memory()[1] / 1024**2
        tracemalloc.stop()
        assert report.examples == pairs, (report.examples, pairs)
    return {"file_mb": round(size_mb, 1), "pairs": pairs,
            "json_only_mb_per_s": round(size_mb / json_s, 1), "loader_mb_per_s": round(size_mb / load_s, 1),
            "loader_vs_json_only": round(json_s / load_s, 2), "best_of": repeats,
            "loader_peak_python_memory_mb": round(peak_mb, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = run(args.mb)
    print(f"file {result['file_mb']} MB, {result['pairs']} pairs: json.loads only {result['json_only_mb_per_s']} MB/s, "
          f"loader {result['loader_mb_per_s']} MB/s ({result['loader_vs_json_only']:.2f}x of json-only); "
          f"loader peak Python memory {result['loader_peak_python_memory_mb']} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
