"""Labelling throughput before the first step: labelled tokens/s in 1 process and in N, on the same data, in one run.

    python bench/bench_label.py [--conversations 2000] [--processes 1 2] [--json OUT]

The data is the bundled BrightRun sample, its conversations repeated with a counter in each answer (so every one
is tokenized afresh) up to --conversations. The tokenizer is a real one: Qwen2.5's, on the tiny Qwen2 model built
locally. Each configuration runs `labelled_data.label_conversations` exactly as the trainer does (a spawned pool of
processes, each loading the tokenizer once: their start is counted) and the examples must be identical to one
process's, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chat_templates import load_tokenizer  # noqa: E402
from dataset_loader import load_dataset  # noqa: E402
from labelled_data import label_conversations  # noqa: E402

SAMPLE = ROOT / "data" / "brightrun-eq12-demo.jsonl"


def conversations(n: int) -> list[dict]:
    sample, _ = load_dataset(SAMPLE)
    out = []
    for i in range(n):
        c = json.loads(json.dumps(sample[i % len(sample)]))
        c["messages"][-1]["content"] += f" ({i})"
        out.append(c)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from tiny_model import build_tiny_model  # torch: here, not where the labelling processes import this file

    data = conversations(args.conversations)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model("qwen2", Path(tmp) / "tiny-qwen2")
        tokenizer, chat_format = load_tokenizer(model)
        rows, reference = [], None
        for processes in args.processes:
            t0 = time.perf_counter()
            examples, report = label_conversations(tokenizer, data, args.max_seq_length, chat_format.end_of_turn,
                                                   processes=processes, base_model=model)
            seconds = time.perf_counter() - t0
            labelled = [(list(e.input_ids), list(e.labels)) for e in examples]
            if reference is None:
                reference = labelled
            elif labelled != reference:
                raise SystemExit(f"{processes} processes labelled differently from {args.processes[0]}")
            tokens = sum(len(e.input_ids) for e in examples)
            rows.append({"processes": processes, "conversations": len(data), "examples": len(examples),
                         "tokens": tokens, "seconds": round(seconds, 3),
                         "labelled_tokens_per_second": round(tokens / seconds),
                         "ms_per_conversation": round(1000 * seconds / len(data), 2)})
            print(f"{processes} process(es): {len(data)} conversations, {tokens} tokens in {seconds:.2f} s = "
                  f"{tokens / seconds:,.0f} labelled tokens/s ({1000 * seconds / len(data):.2f} ms a conversation)")
    base = rows[0]["labelled_tokens_per_second"]
    for row in rows:
        row["speedup"] = round(row["labelled_tokens_per_second"] / base, 2)
    result = {"benchmark": "labelling", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
              "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
