"""Benchmark results as the paper lays them out: tables (Markdown, CSV, JSON), PNG plots, an HTML report.

Rows are settings (methods); columns are the face recognisers (facexlib, insightface, dlib), then the
judge metrics (PF, AQ, MN, VQ) when they were measured. A column appears only if some row measured it,
and a cell only ever holds a measured mean; a cell a row did not measure is shown as "—" and explained
in the notes, never filled in.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import shutil
import urllib.parse
from pathlib import Path
from typing import Callable

import numpy as np

from .judge import METRICS
from .recognizers import RECOGNIZERS

NOT_MEASURED = "—"


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def aggregate(records: list[dict]) -> dict:
    """Per-setting means over videos, the columns that were measured, skipped recognisers, missing cases."""
    settings = list(dict.fromkeys(r["setting"] for r in records))
    measured = {name for r in records if r["evaluation"] for name in r["evaluation"]["recognizers"]}
    recognizers = [n for n in RECOGNIZERS if n in measured] + sorted(measured - set(RECOGNIZERS))
    judged = [m for m in METRICS if any(m in r["judge"] for r in records)]
    skipped: dict[str, str] = {}
    for r in records:
        if r["evaluation"]:
            skipped.update(r["evaluation"].get("skipped", {}))
    rows = []
    for s in settings:
        mine = [r for r in records if r["setting"] == s]
        evals = [r["evaluation"] for r in mine if r["evaluation"]]
        row = {"setting": s, "cases": len(mine), "videos": sum(r["video"] is not None for r in mine),
               "scored": len(evals),
               "face_found": _mean([float(np.mean(e["face_found"])) if e["face_found"] else 0.0 for e in evals])}
        for name in recognizers:
            stats = [e["recognizers"][name] for e in evals if name in e["recognizers"]]
            row[name] = {"mean": _mean(x["mean"] for x in stats), "min": _mean(x["min"] for x in stats),
                         "drift": _mean(x["drift"] for x in stats),
                         "videos": sum(x["mean"] is not None for x in stats), "scored": len(stats)}
        for m in judged:
            vals = [r["judge"][m]["score"] for r in mine if m in r["judge"]]
            row[m] = {"mean": _mean(vals), "videos": len(vals)}
        rows.append(row)
    generation = []
    for s in settings:
        sides = [r["generation"] for r in records if r["setting"] == s and r.get("generation")]
        if sides:
            peaks = [x.get("peak_memory_gb") for x in sides]
            generation.append({
                "setting": s, "videos": len(sides), "seconds": _mean(x.get("seconds") for x in sides),
                "peak_memory_gb": max(p for p in peaks if p is not None) if any(p is not None for p in peaks) else None,
                "devices": sorted({str(x.get("device", "")) for x in sides}),
                "steps": sorted({x.get("num_inference_steps") for x in sides if x.get("num_inference_steps")}),
                "size": sorted({f"{x.get('num_frames')}x{x.get('height')}x{x.get('width')}" for x in sides})})
    missing = [f"{r['setting']}/{r['case']}" + (" (no video)" if r["video"] is None else " (not scored)")
               for r in records if r["video"] is None or r["evaluation"] is None]
    judge_errors = {f"{r['setting']}/{r['case']}": r["judge_errors"] for r in records if r["judge_errors"]}
    return {"settings": settings, "recognizers": recognizers, "judge_metrics": judged, "rows": rows,
            "generation": generation,
            "skipped_recognizers": skipped, "missing": missing, "judge_errors": judge_errors}


def _fmt(v, digits: int = 3) -> str:
    return NOT_MEASURED if v is None else f"{v:.{digits}f}"


def _columns(agg: dict) -> list[str]:
    return agg["recognizers"] + agg["judge_metrics"]


def markdown_table(agg: dict, title: str = "") -> str:
    cols = _columns(agg)
    head = ["Setting"] + cols + ["face found", "videos scored"]
    lines = ([f"## {title}", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                     "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in agg["rows"]:
        cells = [row["setting"]] + [_fmt(row[c]["mean"]) for c in cols]
        cells += [_fmt(row["face_found"] * 100, 0) + "%" if row["face_found"] is not None else NOT_MEASURED,
                  f"{row['scored']}/{row['cases']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _notes(agg, markdown=True)]
    if agg["recognizers"]:
        lines += ["", "### Per recogniser: mean, min over frames and drift (mean over videos)", "",
                  "| Setting | " + " | ".join(f"{n} mean | {n} min | {n} drift" for n in agg["recognizers"]) + " |",
                  "|---|" + "---:|" * (3 * len(agg["recognizers"]))]
        for row in agg["rows"]:
            cells = [row["setting"]]
            for n in agg["recognizers"]:
                cells += [_fmt(row[n]["mean"]), _fmt(row[n]["min"]), _fmt(row[n]["drift"])]
            lines.append("| " + " | ".join(cells) + " |")
    if agg["generation"]:
        lines += ["", "### Generation (as recorded in each video's sidecar)", "",
                  "| Setting | videos | seconds per video | peak GPU memory (GB) | frames x height x width | steps "
                  "| device |", "|---|---:|---:|---:|---|---|---|"]
        for g in agg["generation"]:
            lines.append(f"| {g['setting']} | {g['videos']} | {_fmt(g['seconds'], 1)} | {_fmt(g['peak_memory_gb'], 2)} "
                         f"| {', '.join(g['size'])} | {', '.join(map(str, g['steps']))} | {', '.join(g['devices'])} |")
    return "\n".join(lines).rstrip() + "\n"


def _notes(agg: dict, markdown: bool = False) -> str:
    notes = ["Recogniser columns: mean cosine similarity between the reference photo and the largest face in "
             "each scored frame, averaged over frames with a face, then over videos. Judge columns (PF prompt "
             "following, AQ aesthetic quality, MN motion naturalness, VQ video quality): 0-1 scores of the "
             "judge model, averaged over videos. 'face found': share of scored frames with a detected face. "
             "dlib similarities sit higher for different people (about 0.8-0.9) than ArcFace ones (about 0): "
             "compare numbers within a column only."]
    if any(row[c]["mean"] is None for row in agg["rows"] for c in _columns(agg)):
        notes.append(f"{NOT_MEASURED}: not measured for that setting (no video with a face, or not judged).")
    for row in agg["rows"]:
        for n in agg["recognizers"]:
            if row[n]["scored"] < row["scored"]:
                notes.append(f"{row['setting']}: {n} scored {row[n]['scored']} of its {row['scored']} scored "
                             f"videos (the others were scored before its weights were present; --rescore)")
    for name, why in agg["skipped_recognizers"].items():
        notes.append(f"The {name} recogniser was skipped: {why}")
    if not agg["judge_metrics"]:
        notes.append("Judge metrics (PF, AQ, MN, VQ) were not measured: no judge endpoint was configured.")
    if agg["missing"]:
        notes.append(f"{len(agg['missing'])} case(s) not in the numbers: " + ", ".join(agg["missing"][:20])
                     + (" ..." if len(agg["missing"]) > 20 else ""))
    if agg["judge_errors"]:
        notes.append(f"Judge failed on {len(agg['judge_errors'])} video(s); see results.json.")
    return "\n".join(("- " if markdown else "") + n for n in notes)


def csv_table(agg: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = _columns(agg)
    extra = [f"{n}_{k}" for n in agg["recognizers"] for k in ("min", "drift", "videos")]
    w.writerow(["setting"] + cols + ["face_found", "videos_scored", "cases"] + extra)
    for row in agg["rows"]:
        out = [row["setting"]] + ["" if row[c]["mean"] is None else f"{row[c]['mean']:.6f}" for c in cols]
        out += ["" if row["face_found"] is None else f"{row['face_found']:.6f}", row["scored"], row["cases"]]
        for n in agg["recognizers"]:
            out += ["" if row[n]["min"] is None else f"{row[n]['min']:.6f}",
                    "" if row[n]["drift"] is None else f"{row[n]['drift']:.6f}", row[n]["videos"]]
        w.writerow(out)
    return buf.getvalue()


def cases_csv(records: list[dict], agg: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    names = agg["recognizers"]
    w.writerow(["setting", "subject", "prompt_id", "video", "face_found"] +
               [f"{n}_{k}" for n in names for k in ("mean", "min", "drift")] + agg["judge_metrics"])
    for r in records:
        e = r["evaluation"]
        row = [r["setting"], r["subject"], r["prompt_id"], r["video"] or "",
               "" if not e else f"{np.mean(e['face_found']):.6f}" if e["face_found"] else ""]
        for n in names:
            s = (e or {}).get("recognizers", {}).get(n, {})
            row += ["" if s.get(k) is None else f"{s[k]:.6f}" for k in ("mean", "min", "drift")]
        row += ["" if m not in r["judge"] else f"{r['judge'][m]['score']:.6f}" for m in agg["judge_metrics"]]
        w.writerow(row)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def _colors(plt, settings: list[str]) -> dict[str, str]:
    # One colour per setting in every plot, whether or not a plot has data for it.
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {s: cycle[k % len(cycle)] for k, s in enumerate(settings)}


def _note_unmeasured(ax, settings: list[str]) -> None:
    if settings:
        ax.text(0.01, 0.01, "not measured (no face found): " + ", ".join(settings), transform=ax.transAxes,
                fontsize="x-small", color="#a00", va="bottom")


def _grouped_bars(ax, groups: list[str], series: dict[str, list], colors: dict, value_labels: bool = False) -> None:
    """One bar per series in each group; missing values (None) leave a gap, and a series with none
    measured is named in a note instead of drawn."""
    shown = [name for name, values in series.items() if any(v is not None for v in values)]
    width = 0.8 / max(len(shown), 1)
    for k, name in enumerate(shown):
        xs = [i + k * width for i, v in enumerate(series[name]) if v is not None]
        ys = [v for v in series[name] if v is not None]
        bars = ax.bar(xs, ys, width, label=name, color=colors[name])
        if value_labels:
            ax.bar_label(bars, fmt="%.3f", fontsize="x-small")
    _note_unmeasured(ax, [name for name in series if name not in shown])
    ax.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(groups))])


def plot_per_subject(records: list[dict], agg: dict, path: Path) -> Path | None:
    """Grouped bars: mean similarity per subject, one bar per setting, one panel per recogniser."""
    names = agg["recognizers"]
    subjects = list(dict.fromkeys(r["subject"] for r in records))
    data = {(s, sub, n): _mean((r["evaluation"]["recognizers"].get(n, {}).get("mean")
                                for r in records if r["setting"] == s and r["subject"] == sub and r["evaluation"]))
            for s in agg["settings"] for sub in subjects for n in names}
    if not any(v is not None for v in data.values()):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(max(5, 1.2 * len(subjects) * len(agg["settings"]) / 2 + 3)
                                                      * len(names), 4), squeeze=False)
    colors = _colors(plt, agg["settings"])
    for ax, n in zip(axes[0], names):
        _grouped_bars(ax, subjects, {s: [data[(s, sub, n)] for sub in subjects] for s in agg["settings"]}, colors)
        ax.set_xticklabels(subjects, rotation=30, ha="right")
        ax.set_title(f"{n}: mean similarity per subject")
        ax.set_ylabel("cosine similarity to reference")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_over_frames(records: list[dict], agg: dict, path: Path) -> Path | None:
    """Similarity against normalised time: thin line per video, thick mean per setting; panel per recogniser."""
    names = agg["recognizers"]
    if not any(s is not None for r in records if r["evaluation"] for n in names
               for s in r["evaluation"]["recognizers"].get(n, {}).get("similarities", [])):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    grid = np.linspace(0, 1, 21)
    colors = _colors(plt, agg["settings"])
    for ax, n in zip(axes[0], names):
        unmeasured = []
        for s in agg["settings"]:
            color = colors[s]
            curves, drawn = [], False
            for r in records:
                e = r["evaluation"]
                if r["setting"] != s or not e or n not in e["recognizers"]:
                    continue
                pts = [(i / max(e["num_frames"] - 1, 1), v) for i, v in
                       zip(e["frame_indices"], e["recognizers"][n]["similarities"]) if v is not None]
                if not pts:
                    continue
                t, v = map(np.array, zip(*pts))
                drawn = True
                ax.plot(t, v, color=color, alpha=0.25, linewidth=0.8)
                if len(pts) >= 2:
                    curves.append(np.interp(grid, t, v))
            if curves:
                ax.plot(grid, np.mean(curves, axis=0), color=color, linewidth=2.2, label=f"{s} (mean)")
            if not drawn:
                unmeasured.append(s)
        _note_unmeasured(ax, unmeasured)
        ax.set_xlabel("time in video (0 = first frame, 1 = last)")
        ax.set_ylabel("cosine similarity to reference")
        ax.set_title(f"{n}: similarity over frames")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_settings(agg: dict, path: Path) -> Path | None:
    """Settings side by side on every measured column."""
    cols = _columns(agg)
    if not any(row[c]["mean"] is not None for row in agg["rows"] for c in cols):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(cols) * max(1, len(agg["rows"])) / 2 + 2), 4))
    colors = _colors(plt, agg["settings"])
    _grouped_bars(ax, cols, {row["setting"]: [row[c]["mean"] for c in cols] for row in agg["rows"]}, colors,
                  value_labels=True)
    ax.set_xticklabels(cols)
    ax.set_ylabel("score")
    ax.set_title("Settings compared (means over videos)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
.cases{display:flex;flex-wrap:wrap;gap:1em}
.case{border:1px solid #ccc;border-radius:6px;padding:.6em;width:560px}
.media{display:flex;gap:.8em;align-items:flex-start}.media figure{margin:0}
.media img,.media video{width:256px;max-height:270px;object-fit:contain;background:#eee}
.prompt{font-style:italic;margin:.3em 0}.missing{color:#a00}
#media-status{padding:.4em;border-radius:4px;background:#eef}#media-status.bad{background:#fdd}
.plots img{max-width:100%;display:block;margin:.5em 0}
"""

_JS = """
(function(){
  var media=[].slice.call(document.querySelectorAll('.case video, .case img'));
  var ok=0, bad=[], pending=media.length;
  function done(el, good){ if(el.dataset.state) return; el.dataset.state=good?'loaded':'failed';
    if(good) ok++; else bad.push(el.getAttribute('src')); if(--pending===0) show(); }
  function show(){ var s=document.getElementById('media-status');
    s.textContent = bad.length ? (bad.length+' of '+media.length+' media failed to load: '+bad.join(', '))
                               : ('all '+media.length+' media loaded');
    if(bad.length) s.className='bad';
    document.body.dataset.mediaLoaded=ok; document.body.dataset.mediaFailed=bad.length; }
  if(!media.length) show();
  media.forEach(function(el){
    if(el.tagName==='VIDEO'){
      if(el.readyState>=2) done(el,true);
      el.addEventListener('loadeddata',function(){done(el,true)});
      el.addEventListener('error',function(){done(el,false)});
      var src=el.querySelector('source'); if(src) src.addEventListener('error',function(){done(el,false)});
    } else {
      if(el.complete) done(el, el.naturalWidth>0);
      el.addEventListener('load',function(){done(el,true)});
      el.addEventListener('error',function(){done(el,false)});
    }
  });
})();
"""


def _rel(path, root: Path) -> str:
    return urllib.parse.quote(os.path.relpath(Path(path).resolve(), root.resolve()).replace(os.sep, "/"))


def _media(path: str, root: Path, alt: str) -> str:
    src = _rel(path, root)
    if Path(path).suffix.lower() == ".mp4":
        return (f'<video src="{src}" controls autoplay muted loop playsinline preload="auto" '
                f'title="{html.escape(alt)}"></video>')
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def write_reference_thumbnails(records: list[dict], out_dir: Path, max_side: int = 256) -> dict[str, Path]:
    """references/<subject>.jpg: a small copy of each subject's first photo, so the report stands alone."""
    from PIL import Image

    from ..face import load_image

    out = {}
    for r in records:
        if r["subject"] in out or not r["photos"]:
            continue
        dest = out_dir / "references" / f"{r['subject']}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(load_image(r["photos"][0]))
        img.thumbnail((max_side, max_side))
        img.save(dest, quality=90)
        out[r["subject"]] = dest
    return out


def html_report(records: list[dict], agg: dict, out_dir: Path, plots: dict[str, Path], refs: dict[str, Path],
                title: str) -> str:
    e = html.escape
    cols = _columns(agg)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
             "<div id='media-status'>loading media…</div>", "<h2>Results</h2><table><tr><th>Setting</th>"]
    parts += [f"<th>{e(c)}</th>" for c in cols] + ["<th>face found</th><th>videos scored</th></tr>"]
    for row in agg["rows"]:
        share = NOT_MEASURED if row["face_found"] is None else format(row["face_found"], ".0%")
        parts.append(f"<tr><td>{e(row['setting'])}</td>" + "".join(f"<td>{_fmt(row[c]['mean'])}</td>" for c in cols)
                     + f"<td>{share}</td><td>{row['scored']}/{row['cases']}</td></tr>")
    parts.append("</table><ul>" + "".join(f"<li>{e(n)}</li>" for n in _notes(agg).split("\n")) + "</ul>")
    if plots:
        parts.append("<h2>Plots</h2><div class='plots'>")
        parts += [f"<img src='{_rel(p, out_dir)}' alt='{e(k)}' class='plot'>" for k, p in plots.items()]
        parts.append("</div>")
    parts.append(f"<h2>Cases ({len(records)})</h2><div class='cases'>")
    for r in records:
        label = f"{r['setting']}/{r['case']}"
        parts.append(f"<div class='case' data-case='{e(label)}'><b>{e(r['setting'])}</b> · {e(r['subject'])} · "
                     f"{e(r['prompt_id'])}<div class='prompt'>{e(r['prompt'])}</div><div class='media'>")
        if r["subject"] in refs:
            parts.append(f"<figure><img src='{_rel(refs[r['subject']], out_dir)}' alt='reference "
                         f"{e(r['subject'])}'><figcaption>reference</figcaption></figure>")
        if r["video"]:
            parts.append(f"<figure>{_media(r['video'], out_dir, label)}<figcaption>video</figcaption></figure>")
        else:
            parts.append("<p class='missing'>no video yet</p>")
        parts.append("</div>")
        ev = r["evaluation"]
        if ev:
            share = float(np.mean(ev["face_found"])) if ev["face_found"] else 0.0
            parts.append(f"<p>face found in {share:.0%} of {len(ev['face_found'])} scored frames</p>"
                         "<table><tr><th>recogniser</th><th>mean</th><th>min</th><th>drift</th></tr>")
            for n, s in ev["recognizers"].items():
                parts.append(f"<tr><td>{e(n)}</td><td>{_fmt(s['mean'])}</td><td>{_fmt(s['min'])}</td>"
                             f"<td>{_fmt(s['drift'])}</td></tr>")
            parts.append("</table>")
        elif r["video"]:
            parts.append("<p class='missing'>not scored yet</p>")
        if r["judge"]:
            parts.append("<p>" + " · ".join(f"<span title='{e(v.get('reason', ''))}'>{e(m)} {v['score']:.2f}</span>"
                                            for m, v in r["judge"].items()) + "</p>")
        parts.append("</div>")
    parts.append(f"</div><script>{_JS}</script></body></html>")
    return "\n".join(parts)


def write_report(manifest, records: list[dict], out_dir, echo: Callable[[str], None] = print) -> dict[str, Path]:
    """results.md/.csv/.json, cases.csv, plots/*.png and report.html under out_dir; returns their paths."""
    from ..io.files import atomic_write

    out_dir = Path(out_dir)
    agg = aggregate(records)
    title = f"Lynx benchmark: {getattr(manifest, 'name', 'results')}"
    files: dict[str, Path] = {}

    def put(name: str, text: str):
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(text))
        files[name] = path

    put("results.md", markdown_table(agg, title))
    put("results.csv", csv_table(agg))
    put("cases.csv", cases_csv(records, agg))
    put("results.json", json.dumps({"name": getattr(manifest, "name", ""), **agg, "cases": records}, indent=2,
                                   default=str))
    plots_dir = out_dir / "plots"
    if plots_dir.exists():
        shutil.rmtree(plots_dir)  # a plot with nothing to show now must not linger from an earlier run
    plots_dir.mkdir(parents=True)
    plots = {}
    for key, fn in (("per_subject", lambda p: plot_per_subject(records, agg, p)),
                    ("similarity_over_frames", lambda p: plot_over_frames(records, agg, p)),
                    ("settings", lambda p: plot_settings(agg, p))):
        made = fn(plots_dir / f"{key}.png")
        if made is None:
            echo(f"plot {key}: nothing measured to plot, not drawn")
        else:
            plots[key] = made
            files[f"plots/{key}.png"] = made
    refs = write_reference_thumbnails(records, out_dir)
    put("report.html", html_report(records, agg, out_dir, plots, refs, title))
    echo(f"wrote {out_dir / 'results.md'}, results.csv, results.json, {len(plots)} plot(s), report.html")
    return files
