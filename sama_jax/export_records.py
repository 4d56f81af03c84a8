"""sama-export's record store: records/process-I-of-N.jsonl in the output folder, one JSON line per
attempt at a case; the latest record of a case wins. A case is finished when its latest record says
done and its output file exists with the recorded size.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
from typing import Any

RECORDS_DIR = "records"


def record_path(out_dir: str, process_index: int, process_count: int) -> str:
    return os.path.join(out_dir, RECORDS_DIR, f"process-{process_index:05d}-of-{process_count:05d}.jsonl")


def load_records(out_dir: str) -> dict[str, dict]:
    """The latest record per case id over every process's record file. A torn last line (a process
    killed while appending) is ignored: that case simply has no record yet."""
    latest: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, RECORDS_DIR, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict) or "case_id" not in record:
                    continue
                old = latest.get(record["case_id"])
                if old is None or record.get("finished", "") >= old.get("finished", ""):
                    latest[record["case_id"]] = record
    return latest


def append_record(path: str, record: dict) -> None:
    """One JSON line, flushed and synced before returning: a record exists only for a whole output."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def is_finished(record: dict | None, out_dir: str) -> bool:
    if not record or record.get("status") != "done":
        return False
    path = os.path.join(out_dir, record["output"])
    return os.path.isfile(path) and os.path.getsize(path) == record.get("output_bytes")


def without_paths(identity: Any) -> Any:
    """A checkpoint identity without its paths: moving a checkpoint does not change it."""
    if isinstance(identity, dict):
        return {k: without_paths(v) for k, v in identity.items() if k != "path"}
    return identity


def check_same_run(records: dict[str, dict], settings: dict, identity: dict | None, out_dir: str) -> None:
    """Refuses to add edits made with other settings or checkpoints (identity None: not checked) to
    finished ones."""
    for record in records.values():
        if record.get("status") != "done":
            continue
        pairs = [("settings", record.get("settings"), settings)]
        if identity is not None:
            pairs.append(("checkpoints", without_paths(record.get("identity")), without_paths(identity)))
        for name, old, new in pairs:
            old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
            if old != new:
                keys = sorted(set(old or {}) | set(new or {}))
                diff = next((k for k in keys if (old or {}).get(k) != (new or {}).get(k)), "?")
                raise FileExistsError(
                    f"{out_dir} holds edits made with other {name} (case {record['case_id']}: {diff} "
                    f"{(old or {}).get(diff)!r}, now {(new or {}).get(diff)!r}); export into a new --out "
                    "(finished results are never replaced)"
                )


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
