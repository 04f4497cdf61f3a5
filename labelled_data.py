"""The job's labelled data, prepared once: the validation split, every conversation labelled (chat_labels) in
processes over the worker's cores, packed, and kept in the job's checkpoint directory, so that a resumed job reads
it back instead of labelling again while it is still right.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import active_children, get_context
from multiprocessing.connection import wait
from pathlib import Path

import torch

from architecture import load_config, packing_support
from chat_labels import IGNORE, pack_examples, sequences_from_tensors, sequences_to_tensors, tokenize_conversation
from chat_templates import SkipExample, load_tokenizer
from dataset_loader import split_validation
from files import atomic_file, private_dir
from job import Hyperparameters, JobError

log = logging.getLogger(__name__)


@dataclass
class Data:
    """The labelled dataset as training reads it: sequences (packed examples, or one each) and what labelling found."""
    fingerprint: str
    train: list
    validation: list
    counts: dict  # examples, validation_examples, validation_conversations
    length_report: dict
    packing: bool
    packing_note: str
    warnings: list
    labelled: str = ""  # how: "<n> process(es), <s> s", or "reused from the job directory"


DATA_FILE = "labelled-data.pt"
# Raise it when a change here changes the ids or labels written for a conversation: labelled data a job kept under
# another version is labelled again.
LABELLING_VERSION = 1
# The files a tokenizer is read from (the names transformers uses): their contents key the kept labelled data too.
TOKENIZER_FILES = re.compile(r"tokeni[sz]er.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|"
                             r"chat_template.*|.*\.model|.*\.tiktoken")


def prepare_data(conversations: list[dict], base_path: Path, hp: Hyperparameters, trust_remote_code: bool = False,
                 keep_in: Path | None = None, fingerprint: str = "") -> Data:
    """Split off the validation conversations, label and pack both sides; with `keep_in` (the job's checkpoint
    directory) the result is kept there, and a resumed job reads it back while its fingerprint, LABELLING_VERSION and
    the tokenizer's files are the same and it holds only what labelling writes."""
    path = keep_in / DATA_FILE if keep_in is not None and fingerprint else None
    started = time.monotonic()
    tokenizer, chat_format = load_tokenizer(base_path, trust_remote_code)
    key = {"fingerprint": fingerprint, "labelling_version": LABELLING_VERSION, "tokenizer": tokenizer_digest(base_path)}
    if path is not None and path.is_file() and (kept := _kept_data(path, key, len(tokenizer))) is not None:
        return kept
    train_convs, val_convs, split_warning = split_validation(conversations, hp.val_fraction, hp.seed)
    processes = labelling_processes(len(conversations))
    train_examples, length_report = label_conversations(
        tokenizer, train_convs, hp.max_seq_length, chat_format.end_of_turn, processes=processes, base_model=base_path,
        trust_remote_code=trust_remote_code)
    val_examples, _ = label_conversations(tokenizer, val_convs, hp.max_seq_length, chat_format.end_of_turn)
    if not train_examples:
        quoted = "; ".join(p["message"] for p in length_report["problems"][:3])
        raise JobError(f"no example could be tokenized for training: {quoted}")
    packing, packing_note = packing_support(load_config(base_path)) if hp.packing else (False, "off (packing: false)")
    sequences = (lambda ex: pack_examples(ex, hp.max_seq_length)) if packing else (lambda ex: [[e] for e in ex])
    if val_convs and not val_examples:  # every held-out conversation was longer than max_seq_length allows
        split_warning = (f"no validation loss: the {len(val_convs)} held-out line(s) could not fit max_seq_length="
                         f"{hp.max_seq_length} even with their oldest turns removed; raise max_seq_length, or hold out "
                         "more conversations (hyperparameters.val_fraction)")
    counts = {"examples": len(train_examples), "validation_examples": len(val_examples),
              "validation_conversations": len({c.get("conversation_id", i) for i, c in enumerate(val_convs)})}
    data = Data(fingerprint, sequences(train_examples), sequences(val_examples), counts, length_report, packing,
                packing_note,
                [w for w in (split_warning, hp.packing and not packing and f"packing {packing_note}") if w],
                f"{processes} process(es), {time.monotonic() - started:.1f} s")
    if path is not None:
        _keep_data(path, data, key)
    return data


def tokenizer_digest(base_model: Path) -> str:
    """sha256 over the names and contents of the base model's tokenizer files (TOKENIZER_FILES)."""
    digest = hashlib.sha256()
    for path in sorted(base_model.iterdir()):
        if TOKENIZER_FILES.fullmatch(path.name) and path.is_file():
            content = path.read_bytes()
            digest.update(f"{path.name}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()


def _keep_data(path: Path, data: Data, key: dict) -> None:
    """Save `data` with its key; a cache: a failed write costs a resumed job the labelling, nothing else."""
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    try:
        private_dir(path.parent)
        with atomic_file(path) as f:
            torch.save({**fields, "key": key, "train": sequences_to_tensors(data.train),
                        "validation": sequences_to_tensors(data.validation)}, f)
    except Exception as exc:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
        log.warning("could not keep the labelled data in %s (%s); a resumed job labels it again", path, exc)


def _kept_data(path: Path, key: dict, vocabulary: int) -> Data | None:
    """The labelled data kept in `path` when it was saved under `key` and holds only what labelling writes; else None,
    with a warning (the job labels again)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        problem = ("it was labelled for another job input, labelling version or tokenizer"
                   if saved.pop("key", None) != key
                   else _labels_problem(saved["train"], vocabulary) or _labels_problem(saved["validation"], vocabulary))
        if problem is None:
            log.info("labelled data reused from %s", path)
            return Data(**{**saved, "train": sequences_from_tensors(saved["train"]),
                           "validation": sequences_from_tensors(saved["validation"]),
                           "labelled": "reused from the job directory"})
    except Exception as exc:  # noqa: BLE001 - unreadable, or not what sequences_to_tensors writes
        problem = f"it could not be read ({type(exc).__name__}: {exc})"
    log.warning("could not reuse the labelled data in %s: %s; labelling again", path, problem)
    return None


def _labels_problem(saved: dict, vocabulary: int) -> str | None:
    """What in saved sequences (sequences_to_tensors) labelling never writes, or None: lengths that do not add up, a
    token id outside the vocabulary (the embedding's IndexError in training), a label neither IGNORE nor its token."""
    ids, labels, lengths = saved["input_ids"], saved["labels"], saved["lengths"]
    examples = (len(lengths), int(saved["per_sequence"].sum()), len(saved["dropped_messages"]), len(saved["truncated"]))
    if not (len(ids) == len(labels) == int(lengths.sum()) and bool((lengths > 0).all()) and len(set(examples)) == 1):
        return "its lengths do not add up"
    outside = ids[(ids < 0) | (ids >= vocabulary)]
    if len(outside):
        return f"it holds token id {int(outside[0])}, outside the tokenizer's {vocabulary}"
    if not bool(((labels == IGNORE) | (labels == ids)).all()):
        return "it holds a label that is neither ignored nor its own token"
    return None


# ---------------------------------------------------------------------------- labelling, over the worker's cores

CONVERSATIONS_PER_PROCESS = 200  # below this a labelling process costs more to start (~2 s) than it saves
_worker_tokenizer = None  # in a labelling process: (tokenizer, end-of-turn text)


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by the container's CPU quota (cgroup v2 `cpu.max`,
    which a container on a large host has while its affinity still lists every core of the host)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def labelling_processes(conversations: int) -> int:
    """One per CONVERSATIONS_PER_PROCESS conversations, at most one per usable core."""
    return max(1, min(usable_cores(), conversations // CONVERSATIONS_PER_PROCESS))


def _start_labelling(base_model: Path, trust_remote_code: bool) -> None:
    """A labelling process's start: SIGTERM back to its default action (fork copies the job's handler, under which the
    process would outlive a terminate()), then the tokenizer, loaded once."""
    global _worker_tokenizer
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tokenizer, chat_format = load_tokenizer(base_model, trust_remote_code)
    _worker_tokenizer = tokenizer, chat_format.end_of_turn


def _label_chunk(first: int, conversations: list[dict], max_seq_length: int, tokenizer=None, eot_text: str = ""):
    """(examples, [(line, problem)]) for consecutive conversations numbered from `first`."""
    if tokenizer is None:
        tokenizer, eot_text = _worker_tokenizer
    examples, problems = [], []
    for i, conversation in enumerate(conversations, first):
        try:
            examples.append(tokenize_conversation(tokenizer, conversation, max_seq_length, eot_text))
        except SkipExample as exc:
            problems.append((i + 1, str(exc)))
    return examples, problems


def _label_in_processes(conversations: list[dict], max_seq_length: int, processes: int, base_model: Path,
                        trust_remote_code: bool) -> list[tuple]:
    """Each chunk's (examples, problems), in order, labelled in `processes` processes. Whatever ends the labelling
    early (SIGTERM's Stopped, a chunk's error, a process killed: a JobError saying how), every process it started is
    killed and reaped first."""
    size = math.ceil(len(conversations) / (4 * processes))  # a few chunks each: a slow one does not hold the rest
    # fork where there is one: a spawned process spends ~3 s importing transformers (and torch) before it labels
    # anything. The children only tokenize (no CUDA, no torch ops, no logging), which is what fork is safe for.
    context = get_context("fork" if sys.platform == "linux" else "spawn")
    others = set(active_children())
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_start_labelling,
                               initargs=(base_model, trust_remote_code))
    started = []
    try:
        futures = [pool.submit(_label_chunk, s, conversations[s:s + size], max_seq_length)
                   for s in range(0, len(conversations), size)]
        started = [p for p in active_children() if p not in others]  # every process has started by now
        chunks = [future.result() for future in futures]
        pool.shutdown()
        return chunks
    except BrokenProcessPool:  # a process died; the pool has just terminated the others
        raise JobError(_labelling_process_died(started, processes)) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        started += [p for p in active_children() if p not in others and p not in started]
        for process in started:
            process.kill()  # SIGKILL: one blocked writing its result to a pipe no one reads any more dies too
        for process in started:
            process.join()


def _labelling_process_died(started: list, processes: int) -> str:
    """Why labelling failed, from the exit codes of its processes (-N: killed by signal N), and what to do."""
    ended = wait([p.sentinel for p in started], timeout=0)  # a process closes it as it dies, before it can be reaped
    for process in started:
        if process.sentinel in ended:
            process.join()
    codes = [p.exitcode for p in started if p.exitcode]
    # once one dies the pool terminates the others (SIGTERM): the first death is the code that is not that, if any
    code = next((c for c in codes if c != -signal.SIGTERM), codes[0] if codes else None)
    if code == -signal.SIGKILL:
        return (f"labelling the conversations failed: a labelling process was killed by SIGKILL, most likely by the "
                f"out-of-memory killer ({_memory()}, for {processes} labelling processes and the worker): use fewer or "
                "shorter conversations, a lower max_seq_length, or a worker with more memory")
    names = {number.value: number.name for number in signal.Signals}
    how = ("ended abruptly" if code is None else f"exited with code {code}" if code > 0
           else f"was killed by {names.get(-code, f'signal {-code}')}")
    return (f"labelling the conversations failed: a labelling process {how} (the worker's log may say why): resubmit "
            "the job; should it fail again, use fewer or shorter conversations, or a worker with more memory")


def _memory() -> str:
    """The memory there is, in words: the container's limit (cgroup v2 `memory.max`), else the machine's."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().split()[0]
        if limit != "max":
            return f"the container has {int(limit) / 2**30:.1f} GiB of memory"
    except (OSError, ValueError, IndexError):
        pass
    return f"the machine has {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB of memory"


def label_conversations(tokenizer, conversations: list[dict], max_seq_length: int, eot_text: str, *,
                        processes: int = 1, base_model: Path | None = None, trust_remote_code: bool = False):
    """Tokenize and label every conversation, in order; returns (examples, length report). With `processes` > 1
    (and `base_model`, whose tokenizer each process loads once) the conversations are labelled in that many
    processes, in contiguous chunks, and come back in their order: the same examples as in one."""
    if processes > 1 and base_model is not None and len(conversations) > 1:
        chunks = _label_in_processes(conversations, max_seq_length, processes, base_model, trust_remote_code)
    else:
        chunks = [_label_chunk(0, conversations, max_seq_length, tokenizer, eot_text)]
    examples = [e for chunk_examples, _ in chunks for e in chunk_examples]
    problems = [p for _, chunk_problems in chunks for p in chunk_problems]
    report = {
        "examples": len(examples),
        "shortened": sum(1 for e in examples if e.dropped_messages),
        "truncated": sum(1 for e in examples if e.truncated),
        "dropped": len(problems),
        "problems": [{"example": i, "message": f"example {i}: {message}"} for i, message in problems[:100]],
    }
    return examples, report

