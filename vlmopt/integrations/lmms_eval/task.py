"""vlmopt datasets as lmms-eval tasks: the doc functions that the task YAML names, and
:func:`write_task`, which turns a dataset (calibration format, e.g. ``builtin:synthvqa-test``)
into a task directory for ``lmms-eval --include_path``.

A task directory holds ``NAME.yaml`` (from ``task_template.yaml``) and ``NAME.jsonl``, one doc a
labelled record: ``image`` (an absolute path), ``prompt`` (with ``<image>``), ``answer``,
``type`` and ``where`` (the record's ``file:line``, for error messages).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)
TEMPLATE = Path(__file__).with_name("task_template.yaml")
DEFAULT_NAME = "vlmopt_synthvqa"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def first_word(text: str) -> str:
    """The answer as scored: its first whitespace-separated word, case folded."""
    words = str(text).strip().lower().split()
    return words[0] if words else ""


def doc_to_visual(doc: dict) -> list:
    """The doc's one image, decoded as ``vlmopt eval`` decodes it (RGB)."""
    from vlmopt.data.dataset import Record

    return [Record(Path(doc["image"]), doc["prompt"], doc["answer"], doc["type"],
                   doc["where"]).load_image()]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The record's prompt as it stands (it holds ``<image>`` where the image goes)."""
    return doc["prompt"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"accuracy": float(first_word(results[0]) == first_word(doc["answer"]))}


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_task(data: str | os.PathLike, out: str | os.PathLike, name: str = DEFAULT_NAME,
               limit: int | None = None) -> Path:
    """Write task ``name`` over the labelled records of ``data`` (the first ``limit``, in
    order) into directory ``out``; returns the YAML's path. Records without an answer are
    left out: ``vlmopt eval`` does not count them in its accuracy either."""
    from vlmopt.data.dataset import load_records

    if not _NAME.fullmatch(name):
        raise VlmoptError(f"--name {name!r}: a task name is a letter, then letters, digits "
                          "or '_'")
    out = Path(out)
    if not out.parent.is_dir():
        raise VlmoptError(f"--out {out}: parent directory {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise VlmoptError(f"--out {out}: exists and is not a directory")
    records = load_records(data, limit=limit)
    labelled = [r for r in records if r.answer is not None]
    if not labelled:
        raise VlmoptError(f"{data}: no record has an 'answer'; an lmms-eval task scores "
                          "against answers")
    if len(labelled) < len(records):
        log.warning("%s: %d of %d records have no answer and are left out",
                    data, len(records) - len(labelled), len(records))
    docs = "".join(json.dumps({"image": str(r.image), "prompt": r.prompt,
                               "answer": r.answer.strip(), "type": r.type or "all",
                               "where": r.where}) + "\n"
                   for r in labelled)
    out.mkdir(exist_ok=True)
    _atomic_write(out / f"{name}.jsonl", docs)  # NOTE: before the YAML that names it
    yaml_path = out / f"{name}.yaml"
    _atomic_write(yaml_path, TEMPLATE.read_text(encoding="utf-8").replace("@NAME@", name))
    log.info("wrote task %s (%d docs) to %s", name, len(labelled), out)
    return yaml_path
