"""sama-export's results, once every case has a record: records.jsonl (the latest record per case, in
case-list order), the benchmark's listing, scores.json (per case and per edit type), summary.json and
report.html. Each file is written whole, then renamed.
"""

from __future__ import annotations

import html
import json
import os

import numpy as np

from sama_jax import benchmarks_io, export_records
from sama_jax import scores as scores_lib


def fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _write_json(path: str, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"  # processes finalizing at once never share a temporary file
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def finalize(out_dir: str, benchmark: str, cases: list[benchmarks_io.Case]) -> dict | None:
    """When every case has a record: records.jsonl, the listing, scores.json, summary.json and
    report.html (each written whole, then renamed). Returns the run summary, or None while some
    case has no record. Any process may call it; all write the same files."""
    records = export_records.load_records(out_dir)
    if any(c.case_id not in records for c in cases):
        return None
    ordered = [records[c.case_id] for c in cases]
    done = {r["case_id"] for r in ordered if export_records.is_finished(r, out_dir)}
    tmp = os.path.join(out_dir, f"records.jsonl.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in ordered:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, os.path.join(out_dir, "records.jsonl"))
    listing = benchmarks_io.write_listing(benchmark, out_dir, cases, done)
    scored = [
        (r["edit_type"] or "none", r["scores"]) for r in ordered if r["case_id"] in done and r.get("scores")
    ]
    table = scores_lib.aggregate(scored) if scored else {}
    if scored:
        _write_json(
            os.path.join(out_dir, "scores.json"),
            dict(
                per_edit_type=table,
                per_case={
                    r["case_id"]: dict(edit_type=r["edit_type"], **r["scores"])
                    for r in ordered
                    if r["case_id"] in done and r.get("scores")
                },
                notes=f"PSNR in dB on 0-255; means count PSNR above {scores_lib.PSNR_CAP} (identical: inf) "
                f"as {scores_lib.PSNR_CAP}; scores are of the edit before H.264 encoding",
            ),
        )
    seconds = [r["timings"]["total"] for r in ordered if r["case_id"] in done]
    failures: dict[str, int] = {}
    for r in ordered:
        if r["case_id"] not in done:
            # A done record whose file is gone or rewritten since is a failure too, with its reason.
            reason = r.get("reason", "unknown") if r["status"] != "done" else "output_missing_or_changed"
            failures[reason] = failures.get(reason, 0) + 1
    summary = dict(
        benchmark=benchmark,
        cases=len(cases),
        done=len(done),
        failed=len(cases) - len(done),
        failure_reasons=failures,
        seconds_per_case=float(np.mean(seconds)) if seconds else None,
        listing=listing and os.path.basename(listing),
        scores="scores.json" if scored else None,
        report="report.html",
    )
    _write_json(os.path.join(out_dir, "summary.json"), summary)
    _write_report(os.path.join(out_dir, "report.html"), benchmark, ordered, done, table)
    return summary


REPORT_METRICS = (
    "psnr_in",
    "ssim_in",
    "psnr_out",
    "ssim_out",
    "temporal_ssim",
    "temporal_diff_rmse",
    "siglip_consistency",
)


def _write_report(path: str, benchmark: str, records: list[dict], done: set, table: dict) -> None:
    """A small static page: per-type means, then one row per case with its preview."""
    e = html.escape
    parts = [
        f"<!doctype html><meta charset=utf-8><title>sama-export {e(benchmark)}</title>",
        "<style>body{font:14px sans-serif}td,th{padding:2px 8px;text-align:left}img{max-width:100%}</style>",
        f"<h1>{e(benchmark)}: {len(done)} of {len(records)} cases edited</h1>",
    ]
    if table:
        metrics = [m for m in REPORT_METRICS if any(m in row for row in table.values())]
        parts.append(
            "<h2>Scores per edit type</h2><table><tr><th>edit type</th><th>cases</th>"
            + "".join(f"<th>{m}</th>" for m in metrics)
            + "</tr>"
        )
        for edit_type, row in table.items():
            parts.append(
                f"<tr><td>{e(edit_type)}</td><td>{row['cases']}</td>"
                + "".join(f"<td>{fmt(row.get(m))}</td>" for m in metrics)
                + "</tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Cases</h2><p>preview rows: source | ground truth (when known) | edit</p><table>")
    for r in records:
        status = "done" if r["case_id"] in done else f"{r['status']}: {r.get('error', 'output missing')}"
        s = r.get("scores") or {}
        score_text = " ".join(f"{m} {fmt(s.get(m))}" for m in REPORT_METRICS if m in s)
        image = f"<img src='{e(r['preview'])}'>" if r["case_id"] in done and r.get("preview") else ""
        parts.append(
            f"<tr><td><b>{e(r['case_id'])}</b> [{e(r['edit_type'])}]<br>{e(r['instruction'])}<br>"
            f"{e(status)}<br>{e(score_text)}</td><td>{image}</td></tr>"
        )
    parts.append("</table>")
    tmp = f"{path}.tmp{os.getpid()}"  # processes finalizing at once never share a temporary file
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)
