"""sama-ablate's report: per arm, the mean and std over seeds of what the runs measured, the paper's
ablation beside it, and a verdict per claim -> report.json, report.txt, curves.png, index.html.

What is measured, per arm and seed:
    val_s0 / val_s1   sama-train's validation loss at each stage's fixed steps: the flow-matching
                      part (val_loss_fm/mean), so arms with and without the semantic loss compare.
                      Stage 0's held-out clips carry the arm's pretext sources (MA) or none, so its
                      curves compare arms of the same MA setting only.
    loss_var          the variance of the per-step training loss (flow-matching part) over the last
                      half of stage 1
    held_out          stage 1's edits of the held-out cases: PSNR / SSIM inside the edited region
    fast              stage 1's edits of the fast-motion cases: temporal SSIM (the targets' own beside
                      it) and the RMSE of the frame-to-frame differences against the target's
    zero_shot         stage 0's edits of the held-out cases (zero-shot), against the untrained DiT's
A claim's verdict compares two arms' means: "reproduced" when the difference goes the paper's way by
more than the spread (sqrt(std_a^2 + std_b^2), sample stds over seeds), "not reproduced" when it
goes the other way by more than that, otherwise (or with one seed: no spread) "inconclusive".
"""

from __future__ import annotations

import html
import json
import math
import os

import numpy as np

# The paper's ablation (VIE-Bench overall, GPT-4o judge, 0-10); its rows are sama-ablate's arms.
PAPER = {"baseline": 6.312, "+SA": 6.696, "+MA": 6.711, "full": 7.095}
FAST_PREFIX = "fast_"  # case ids of the fast-motion split in sama-ablate's cases manifest
# (claim, how we test it, arm, other arm ("untrained": the untrained DiT), metric, higher is better)
CLAIMS = (
    (
        "semantic anchoring speeds convergence",
        "stage 1 validation loss, mean over its fixed steps: +SA below baseline",
        "+SA",
        "baseline",
        "val_s1_mean",
        False,
    ),
    (
        "semantic anchoring lowers the training-loss variance",
        "variance of stage 1's training loss over its last half: +SA below baseline",
        "+SA",
        "baseline",
        "loss_var",
        False,
    ),
    (
        "motion alignment improves temporal consistency under fast motion",
        "temporal-difference RMSE against the target, fast-motion cases: +MA below baseline",
        "+MA",
        "baseline",
        "fast_tdiff_rmse",
        False,
    ),
    (
        "stage 0 alone gives zero-shot editing",
        "PSNR inside the edited region, held-out cases: full's stage 0 above the untrained DiT",
        "full",
        "untrained",
        "zero_shot_psnr_in",
        True,
    ),
    (
        "+SA beats the baseline (paper: 6.696 vs 6.312)",
        "PSNR inside the edited region, held-out cases, stage 1",
        "+SA",
        "baseline",
        "psnr_in",
        True,
    ),
    (
        "+MA beats the baseline (paper: 6.711 vs 6.312)",
        "PSNR inside the edited region, held-out cases, stage 1",
        "+MA",
        "baseline",
        "psnr_in",
        True,
    ),
    (
        "full SAMA beats the baseline (paper: 7.095 vs 6.312)",
        "PSNR inside the edited region, held-out cases, stage 1",
        "full",
        "baseline",
        "psnr_in",
        True,
    ),
)
COLOURS = {"baseline": (90, 90, 90), "+SA": (31, 119, 180), "+MA": (44, 160, 44), "full": (214, 39, 40)}


def read_scalars(logdir: str, tags: tuple) -> dict:
    """{tag: {step: value}} of a sama-train run's TensorBoard events (a resumed run's later value of
    a step wins)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    events = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    out = {tag: {} for tag in tags}
    for tag in tags:
        if tag in events.Tags()["tensors"]:
            for event in events.Tensors(tag):
                out[tag][int(event.step)] = float(tensor_util.make_ndarray(event.tensor_proto))
    return out


def edit_scores(export_dir: str, fast_prefix: str) -> dict:
    """Means over the held-out cases and over the fast-motion cases of an export's scores.json."""
    from sama_jax import scores as scores_lib

    with open(os.path.join(export_dir, "scores.json")) as f:
        per_case = json.load(f)["per_case"]
    held = [("all", s) for case, s in per_case.items() if not case.startswith(fast_prefix)]
    fast = [("all", s) for case, s in per_case.items() if case.startswith(fast_prefix)]
    held_all = scores_lib.aggregate(held)["all"] if held else {}
    fast_all = scores_lib.aggregate(fast)["all"] if fast else {}
    return dict(
        psnr_in=held_all.get("psnr_in"),
        ssim_in=held_all.get("ssim_in"),
        fast_tssim=fast_all.get("temporal_ssim"),
        fast_tssim_target=fast_all.get("temporal_ssim_target"),
        fast_tdiff_rmse=fast_all.get("temporal_diff_rmse"),
    )


def run_metrics(ablation, arm: str, seed: int) -> dict:
    run = lambda *p: ablation.run_dir(arm, seed, *p)
    s0 = read_scalars(run("stage0"), ("val_loss_fm/mean",))
    s1 = read_scalars(run("stage1"), ("val_loss_fm/mean", "loss_fm"))
    half = ablation.settings["stage1_steps"] / 2
    late = [v for step, v in s1["loss_fm"].items() if step > half]
    stage1 = edit_scores(run("export_stage1"), FAST_PREFIX)
    stage0 = edit_scores(run("export_stage0"), FAST_PREFIX)
    val_s1 = s1["val_loss_fm/mean"]
    return dict(
        val_s0={str(k): v for k, v in sorted(s0["val_loss_fm/mean"].items())},
        val_s1={str(k): v for k, v in sorted(val_s1.items())},
        val_s1_mean=float(np.mean(list(val_s1.values()))) if val_s1 else None,
        loss_var=float(np.var(late)) if late else None,
        **stage1,
        zero_shot_psnr_in=stage0["psnr_in"],
        zero_shot_ssim_in=stage0["ssim_in"],
    )


def mean_std(values: list) -> dict:
    """Mean and sample std (ddof 1; 0 for one value) of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return dict(mean=None, std=None, n=0)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return dict(mean=float(np.mean(values)), std=std, n=len(values))


def summarise(per_seed: dict) -> dict:
    """{arm: {metric: mean_std}} over seeds, val curves step by step."""
    out = {}
    for arm, seeds in per_seed.items():
        runs = list(seeds.values())
        keys = sorted({k for r in runs for k, v in r.items() if not isinstance(v, dict)})
        out[arm] = {k: mean_std([r.get(k) for r in runs]) for k in keys}
        for curve in ("val_s0", "val_s1"):
            steps = sorted({int(s) for r in runs for s in r.get(curve, {})})
            out[arm][curve] = {
                str(s): mean_std([r[curve].get(str(s)) for r in runs if curve in r]) for s in steps
            }
    return out


def verdict(a: dict, b: dict, higher_is_better: bool) -> dict:
    if a["mean"] is None or b["mean"] is None:
        return dict(verdict="inconclusive", why="not measured", difference=None, spread=None)
    difference = (a["mean"] - b["mean"]) * (1 if higher_is_better else -1)
    spread = math.sqrt(a["std"] ** 2 + b["std"] ** 2)
    if min(a["n"], b["n"]) < 2:
        result, why = "inconclusive", "one seed: no spread to judge the difference by"
    elif difference > spread:
        result, why = "reproduced", "the difference goes the paper's way by more than the spread"
    elif difference < -spread:
        result, why = "not reproduced", "the difference goes against the paper by more than the spread"
    else:
        result, why = "inconclusive", "the difference is within the seeds' spread"
    return dict(verdict=result, why=why, difference=difference, spread=spread)


def judge(summary: dict) -> list:
    out = []
    for claim, test, arm, other, metric, higher in CLAIMS:
        result = verdict(summary[arm][metric], summary[other][metric], higher)
        out.append(dict(claim=claim, test=test, arm=arm, other=other, metric=metric, **result))
    return out


def collect(ablation) -> dict:
    seeds = range(ablation.settings["seeds"])
    per_seed = {arm: {str(s): run_metrics(ablation, arm, s) for s in seeds} for arm in PAPER}
    per_seed["untrained"] = {}
    for s in seeds:
        scores = edit_scores(ablation.path("untrained", f"seed{s}", "export"), FAST_PREFIX)
        zero_shot = dict(zero_shot_psnr_in=scores["psnr_in"], zero_shot_ssim_in=scores["ssim_in"])
        per_seed["untrained"][str(s)] = dict(scores, **zero_shot)
    summary = summarise(per_seed)
    times = {}
    for unit, _, _ in ablation.units(ablation.settings["seeds"]):
        record = ablation.done(unit) or {}
        kind = unit.split(".")[-1]
        times[kind] = round(times.get(kind, 0.0) + record.get("seconds", 0.0), 1)
    return dict(
        settings=ablation.settings,
        overrides=ablation.overrides,
        paper=PAPER,
        per_seed=per_seed,
        summary=summary,
        claims=judge(summary),
        seconds=times,
    )


# -- text ------------------------------------------------------------------------------------------
def _ms(stat: dict, digits: int = 2) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} +- {stat['std']:.{digits}f}"


def format_report(report: dict) -> str:
    s, summary = report["settings"], report["summary"]
    arms = list(PAPER)
    lines = [
        f"SAMA's ablation at toy scale: {len(arms)} arms x {s['seeds']} seed(s), stage 0 "
        f"{s['stage0_steps']} steps, stage 1 {s['stage1_steps']} steps, {s['edit_steps']}-step edits of "
        f"{s['cases']} held-out and {s['fast_cases']} fast-motion cases; mean +- std over seeds"
        + (
            f"; overrides: {' '.join(f'--config.{k}={v}' for k, v in report['overrides'])}"
            if report["overrides"]
            else ""
        ),
        "",
    ]
    head = (
        f"{'arm':<10}| {'paper VIE-Bench':>15} | {'PSNR in (dB)':>15} {'SSIM in':>15} | "
        f"{'fast tSSIM':>15} {'fast tdiff RMSE':>15} | {'stage 0 PSNR in':>15} {'stage 0 SSIM in':>15}"
    )
    lines += [
        "Edits, held-out cases (inside the edited region) and fast-motion cases (stage 1's model); "
        "stage 0 only = zero-shot",
        head,
        "-" * len(head),
    ]
    for arm in (*arms, "untrained"):
        m = summary[arm]
        paper = f"{PAPER[arm]:.3f}" if arm in PAPER else "-"
        lines.append(
            f"{arm:<10}| {paper:>15} | {_ms(m.get('psnr_in')):>15} {_ms(m.get('ssim_in'), 3):>15} | "
            f"{_ms(m.get('fast_tssim'), 3):>15} {_ms(m.get('fast_tdiff_rmse')):>15} | "
            f"{_ms(m.get('zero_shot_psnr_in')):>15} {_ms(m.get('zero_shot_ssim_in'), 3):>15}"
        )
    target = summary["baseline"].get("fast_tssim_target")
    lines.append(
        f"(fast tSSIM of the targets themselves: {_ms(target, 3)}; untrained: the DiT before any step, "
        "the zero point of both stages)"
    )
    for curve, title in (("val_s0", "stage 0"), ("val_s1", "stage 1")):
        steps = sorted({int(k) for arm in arms for k in summary[arm][curve]})
        head = f"{'arm':<10}| " + " ".join(f"{'@' + str(t):>16}" for t in steps)
        lines += ["", f"Validation loss (flow matching), {title}, at fixed steps", head, "-" * len(head)]
        for arm in arms:
            lines.append(
                f"{arm:<10}| " + " ".join(f"{_ms(summary[arm][curve].get(str(t)), 4):>16}" for t in steps)
            )
    lines += ["", "Variance of stage 1's training loss (flow matching) over its last half"]
    lines += [f"  {arm:<10} {_ms(summary[arm].get('loss_var'), 5)}" for arm in arms]
    lines += ["", "The paper's claims here:"]
    for c in report["claims"]:
        diff = "n/a" if c["difference"] is None else f"{c['difference']:+.4g} (spread {c['spread']:.4g})"
        lines.append(f"  [{c['verdict']}] {c['claim']}: {c['test']}; difference {diff}")
    lines.append(
        "seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items())
        + f"; total {sum(report['seconds'].values()):.0f}"
    )
    return "\n".join(lines)


# -- pictures --------------------------------------------------------------------------------------
def curves_png(summary: dict, path: str, width: int = 560, height: int = 380) -> None:
    """Validation loss against step, stage 0 and stage 1 side by side: per arm the mean over seeds
    and a band of one std."""
    from PIL import Image

    from sama_jax.data import video_io

    panels = [_panel(summary, curve, title, width, height) for curve, title in
              (("val_s0", "stage 0"), ("val_s1", "stage 1"))]  # fmt: skip
    canvas = Image.new("RGB", (2 * width, height), (255, 255, 255))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * width, 0))
    video_io.write_image(path, np.asarray(canvas))


def _panel(summary: dict, curve: str, title: str, width: int, height: int):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(13)
    left, right, top, bottom = 64, 16, 30, 44
    image = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    series = {}
    for arm in PAPER:
        points = sorted((int(s), v) for s, v in summary[arm][curve].items() if v["mean"] is not None)
        if points:
            series[arm] = points
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), f"validation loss (flow matching), {title}", fill=(0, 0, 0), font=font)
    if not series:
        draw.text((left, height // 2), "no validation points", fill=(0, 0, 0), font=font)
        return image.convert("RGB")
    steps = [s for pts in series.values() for s, _ in pts]
    lows = [v["mean"] - v["std"] for pts in series.values() for _, v in pts]
    highs = [v["mean"] + v["std"] for pts in series.values() for _, v in pts]
    x0, x1 = 0, max(steps)
    y0, y1 = min(lows), max(highs)
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda s: left + (s - x0) / max(x1 - x0, 1) * (width - left - right)
    sy = lambda v: top + (y1 - v) / (y1 - y0) * (height - top - bottom)
    # axes, ticks and labels
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill=(0, 0, 0))
    for v in np.linspace(y0 + pad, y1 - pad, 5):
        draw.line([(left - 4, sy(v)), (left, sy(v))], fill=(0, 0, 0))
        draw.text((4, sy(v) - 7), f"{v:.4f}", fill=(0, 0, 0), font=font)
    for s in sorted(set(steps)):
        draw.line([(sx(s), height - bottom), (sx(s), height - bottom + 4)], fill=(0, 0, 0))
        draw.text((sx(s) - 8, height - bottom + 6), str(s), fill=(0, 0, 0), font=font)
    draw.text(((width - left) // 2 + left - 10, height - 18), "step", fill=(0, 0, 0), font=font)
    # bands first (translucent), then the mean lines on top
    for arm, pts in series.items():
        band = Image.new("RGBA", image.size, (0, 0, 0, 0))
        upper = [(sx(s), sy(v["mean"] + v["std"])) for s, v in pts]
        lower = [(sx(s), sy(v["mean"] - v["std"])) for s, v in reversed(pts)]
        ImageDraw.Draw(band).polygon(upper + lower, fill=COLOURS[arm] + (55,))
        image = Image.alpha_composite(image, band)
    draw = ImageDraw.Draw(image)
    for i, (arm, pts) in enumerate(series.items()):
        xy = [(sx(s), sy(v["mean"])) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=COLOURS[arm], width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS[arm])
        lx, ly = width - right - 90, top + 4 + 16 * i
        draw.line([(lx, ly + 7), (lx + 18, ly + 7)], fill=COLOURS[arm], width=3)
        draw.text((lx + 24, ly), arm, fill=(0, 0, 0), font=font)
    return image.convert("RGB")


def write_html(ablation, report: dict, text: str, path: str, rows: int = 4) -> None:
    """The page: the claims, the tables, the curves, and a few cases of each split as videos
    (seed 0): source | ground truth | each arm's stage 1 | full's stage 0 | untrained."""
    from sama_jax.data import manifest as manifest_lib

    root = os.path.dirname(path)
    rel = lambda p: html.escape(os.path.relpath(p, root))
    cases = manifest_lib.read_manifest(ablation.path("cases.jsonl"))
    held = [c for c in cases if not c["id"].startswith(FAST_PREFIX)][:rows]
    fast = [c for c in cases if c["id"].startswith(FAST_PREFIX)][:rows]
    columns = [("source", None), ("ground truth", None)]
    columns += [(f"{arm}", ablation.run_dir(arm, 0, "export_stage1")) for arm in PAPER]
    columns += [("full, stage 0 only", ablation.run_dir("full", 0, "export_stage0"))]
    columns += [("untrained", ablation.path("untrained", "seed0", "export"))]
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)

    def table(title: str, chosen: list) -> str:
        body = []
        for case in chosen:
            videos = [case["source"], case["target"]] + [
                os.path.join(d, case["id"] + ".mp4") for _, d in columns[2:]
            ]
            cells = "".join(
                f'<td><video src="{rel(v)}" autoplay loop muted playsinline></video></td>' for v in videos
            )
            body.append(f'<tr><td class="case"><b>{html.escape(case["id"])}</b><br>'
                        f"{html.escape(case['text'])}</td>{cells}</tr>")  # fmt: skip
        return f"<h2>{title}</h2><table><tr><th>case</th>{head}</tr>{''.join(body)}</table>"

    colour = {"reproduced": "#1a7f37", "not reproduced": "#b42318", "inconclusive": "#8a6d00"}
    claims = "".join(
        f"<li><b style='color:{colour[c['verdict']]}'>{html.escape(c['verdict'])}</b>: "
        f"{html.escape(c['claim'])} <small>({html.escape(c['test'])})</small></li>"
        for c in report["claims"]
    )
    page = (
        "<!doctype html><meta charset=utf-8><title>sama-ablate</title>"
        "<style>body{font-family:sans-serif;margin:16px}video{width:96px;height:96px;"
        "image-rendering:pixelated}td,th{padding:2px 4px;text-align:center;font-size:13px}"
        "td.case{max-width:220px;text-align:left}pre{font-size:12px}</style>"
        "<h1>sama-ablate: SAMA's ablation at toy scale</h1>"
        "<p>Baseline, +semantic anchoring, +motion alignment and full SAMA, trained with the same data, "
        "steps, model and seeds on the synthetic world; the paper's VIE-Bench ablation beside ours.</p>"
        f"<h2>Claims</h2><ul>{claims}</ul>"
        "<h2>Validation loss (mean over seeds, band: one std)</h2><img src=curves.png>"
        f"<h2>Tables</h2><pre>{html.escape(text)}</pre>"
        + table("Held-out cases (seed 0)", held)
        + table("Fast-motion cases (seed 0)", fast)
    )
    _write(path, page)


def _write(path: str, text: str) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write(ablation) -> dict:
    report = collect(ablation)
    _write(ablation.path("report.json"), json.dumps(report, indent=1))
    text = format_report(report)
    _write(ablation.path("report.txt"), text + "\n")
    print(text)
    curves_png(report["summary"], ablation.path("curves.png"))
    write_html(ablation, report, text, ablation.path("index.html"))
    return report
