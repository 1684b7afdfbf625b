"""The evaluation report: report.json (every number), PNG plots (matplotlib) and report.html around them.

Model outputs are untrusted text: everything that reaches the HTML goes through html.escape.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

POLICY_HEADLINES = ["reward", "win_rate_vs_sft", "gold", "gold_win_rate_vs_sft", "kl_per_token", "cross_entropy"]
POLICY_COLUMNS = ["cross_entropy", "perplexity", "reward", "win_rate_vs_sft", "kl_per_token", "kl_per_response",
                  "response_length", "distinct_1", "distinct_2", "ended_with_eos", "gold", "gold_win_rate_vs_sft"]
RM_COLUMNS = ["rm_accuracy", "rm_margin", "rm_length_correlation", "shorter_wins_accuracy"]
CURVES = [("reward", "ppo_log"), ("kl", "ppo_log"), ("entropy", "ppo_log"), ("value_loss", "ppo_log"),
          ("eval_reward", "ppo_eval"), ("eval_gold", "ppo_eval"), ("eval_kl", "ppo_eval")]


def write(result: dict, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    images = [p for p in (_headline_plot(result, plots), _calibration_plot(result, plots), _curves_plot(result, plots)) if p]
    with open(run_dir / "report.json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    (run_dir / "report.html").write_text(_html(result, [p.relative_to(run_dir) for p in images]))
    return run_dir


def _value(v) -> float | None:
    if isinstance(v, dict):
        return v.get("mean")
    return v if isinstance(v, (int, float)) else None


def _fmt(v) -> str:
    if isinstance(v, dict) and "mean" in v:
        lo, hi = v["ci95"]
        return f"{v['mean']:.3f} <small>[{lo:.3f}, {hi:.3f}]</small>"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return "–" if v is None else html.escape(str(v))


def _policies(result: dict):
    for run, entry in result["runs"].items():
        for stage, m in entry["checkpoints"].items():
            if m["kind"] == "policy":
                yield f"{run}/{stage}", m


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=85)
    plt.close(fig)
    return path


def _headline_plot(result: dict, plots: Path) -> Path | None:
    rows = list(_policies(result))
    metrics = [k for k in POLICY_HEADLINES if any(k in m for _, m in rows)]
    if not rows or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    names = [n for n, _ in rows]
    for ax, key in zip(axes[0], metrics):
        means = [m[key]["mean"] if key in m else math.nan for _, m in rows]
        errs = [[m[key]["mean"] - m[key]["ci95"][0] if key in m else 0 for _, m in rows],
                [m[key]["ci95"][1] - m[key]["mean"] if key in m else 0 for _, m in rows]]
        ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=10)
        ax.axhline(0, color="black", linewidth=0.5)
    fig.suptitle("Policies on held-out prompts (bars: mean, whiskers: 95% bootstrap CI)", fontsize=10)
    return _save(fig, plots / "headline.png")


def _calibration_plot(result: dict, plots: Path) -> Path | None:
    rms = [(f"{run}/rm", e["checkpoints"]["rm"]) for run, e in result["runs"].items() if "rm" in e["checkpoints"]]
    if not rms:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, m in rms:
        buckets = m["rm_calibration"]
        ax.plot([b["predicted"] for b in buckets], [b["accuracy"] for b in buckets], "o-", label=name)
    ax.plot([0.5, 1], [0.5, 1], "k--", linewidth=0.8, label="calibrated")
    ax.set_xlabel("sigmoid(mean |margin|) of the bucket")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Reward-model calibration by margin bucket", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, plots / "rm_calibration.png")


def _curves_plot(result: dict, plots: Path) -> Path | None:
    runs = {run: e for run, e in result["runs"].items() if e.get("ppo_log")}
    curves = [(key, source) for key, source in CURVES if any(key in r for e in runs.values() for r in e.get(source, []))]
    if not curves:
        return None
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(curves) / cols), cols, figsize=(13, 3 * math.ceil(len(curves) / cols)),
                             squeeze=False)
    for ax, (key, source) in zip(axes.flat, curves):
        for run, e in runs.items():
            points = [(r["step"], r[key]) for r in e.get(source, []) if key in r]
            if points:
                ax.plot(*zip(*points), marker="." if source == "ppo_eval" else None, label=run)
        ax.set_title(("held-out " if source == "ppo_eval" else "train ") + key, fontsize=10)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    return _save(fig, plots / "ppo_curves.png")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(result: dict, images: list[Path]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Alignment evaluation report</title>",
        "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}small{color:#666}img{max-width:100%}"
        "code,.out{font-family:monospace;white-space:pre-wrap}</style></head><body>",
        "<h1>Alignment evaluation report</h1>",
        f"<p>Store <code>{esc(result['store'])}</code>, written {esc(result['created'])}. "
        "Intervals are 95% bootstrap intervals over held-out items.</p>",
    ]
    for run, e in result["runs"].items():
        parts.append(f"<h2>Run <code>{esc(run)}</code> — model {esc(e['model'])}, data {esc(e['data'])}</h2>")
        policies = [(s, m) for s, m in e["checkpoints"].items() if m["kind"] == "policy"]
        if policies:
            keys = [k for k in POLICY_COLUMNS if any(k in m for _, m in policies)]
            parts.append("<h3>Policies</h3>" + _table(
                ["metric", *[s for s, _ in policies]],
                [[f"<code>{esc(k)}</code>", *[_fmt(m.get(k)) for _, m in policies]] for k in keys]))
        if "rm" in e["checkpoints"]:
            m = e["checkpoints"]["rm"]
            parts.append("<h3>Reward model</h3>" + _table(["checkpoint", *RM_COLUMNS, "pairs"],
                                                          [["rm", *[_fmt(m.get(c)) for c in RM_COLUMNS], str(m["pairs"])]]))
            parts.append(_table(["|margin| from", "to", "pairs", "accuracy", "sigmoid(mean |margin|)"], [
                [_fmt(b["abs_margin_min"]), _fmt(b["abs_margin_max"]), str(b["pairs"]), _fmt(b["accuracy"]),
                 _fmt(b["predicted"])] for b in m["rm_calibration"]]))
        stages = [s for s, m in e["checkpoints"].items() if m["kind"] == "policy"]
        if e["side_by_side"] and stages:
            rows = []
            for row in e["side_by_side"]:
                prompt = row["prompt"] if isinstance(row["prompt"], str) else "\n".join(
                    f"{m['role']}: {m['content']}" for m in row["prompt"])
                cells = [f"<span class='out'>{esc(prompt)}</span>"]
                for s in stages:
                    r = row.get(s)
                    score = "" if r is None else f"<br><small>RM {r['reward']:.2f}" + (
                        f", gold {r['gold']:.2f}" if "gold" in r else "") + "</small>"
                    cells.append("–" if r is None else f"<span class='out'>{esc(r['response'])}</span>{score}")
                rows.append(cells)
            parts.append("<h3>Side by side (greedy responses to held-out prompts)</h3>" + _table(["prompt", *stages], rows))
    parts.append("<h2>Plots</h2>")
    parts += [f"<p><img src='{esc(str(p))}' alt='{esc(p.stem)}'></p>" for p in images]
    parts.append("<h2>What the numbers mean</h2>" + _table(
        ["metric", "definition"], [[f"<code>{esc(k)}</code>", esc(v)] for k, v in result["definitions"].items()]))
    # Lets a headless browser check that every plot really loaded: <body data-images-loaded="N">.
    parts.append("<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded="
                 "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;});</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def text_summary(result: dict) -> str:
    lines = []
    for name, m in _policies(result):
        fields = [f"{k}={m[k]['mean']:.3f}" for k in ("reward", "win_rate_vs_sft", "gold", "kl_per_token", "cross_entropy")
                  if k in m]
        lines.append(f"  {name:24s} " + " ".join(fields))
    for run, e in result["runs"].items():
        if "rm" in e["checkpoints"]:
            m = e["checkpoints"]["rm"]
            lines.append(f"  {run + '/rm':24s} accuracy={m['rm_accuracy']['mean']:.3f} "
                         f"length_corr={m['rm_length_correlation']:.3f} shorter_wins={m['shorter_wins_accuracy']:.3f}")
    return "\n".join(lines)
