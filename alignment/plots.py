"""The report's figures (matplotlib, PNG bytes), each saying which way is better and how many items it rests on.

Every function takes plain lists and dicts from report.json and returns the PNG, or None when it has nothing to
draw; alignment/report.py embeds them in the page.
"""

from __future__ import annotations

import io
import math
import re

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

HIGHER, LOWER = "higher is better", "lower is better"
# one color per stage in every figure (a method is the same color in the frontier, the curves and the bars);
# the runs of a report with several are told apart by line style
COLORS = {"sft": "tab:gray", "base": "tab:brown", "rm": "tab:purple", "ppo": "tab:blue", "dpo": "tab:orange",
          "grpo": "tab:green", "rloo": "tab:red", "reinforce": "tab:cyan"}
LINE_STYLES = ("-", "--", ":", "-.")


def styles(labels) -> dict[str, dict]:
    """label -> {"color", "linestyle"}: the color of the stage the label names ('ppo', 'run/dpo (n = 64)'), the
    line style of the label's place among those naming the same stage."""
    out, seen = {}, {}
    for i, text in enumerate(labels):
        stage = next((s for s in COLORS if re.search(rf"(^|/){s}\b", text)), None)
        n = seen[stage] = seen.get(stage, -1) + 1
        out[text] = {"color": COLORS[stage] if stage else f"C{i}", "linestyle": LINE_STYLES[n % len(LINE_STYLES)]}
    return out


def png(fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def headline(rows: list[dict], panels: list[tuple[str, str, str]]) -> bytes | None:
    """Each method's paired difference to SFT per panel (bars: mean, whiskers: 95% CI). rows: {"method",
    "prompts", key: {"mean", "ci95"}}; panels: (key, title, which way is better)."""
    panels = [p for p in panels if any(p[0] in r for r in rows)]
    if not rows or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.6), squeeze=False)
    names = [r["method"] for r in rows]
    for ax, (key, title, better) in zip(axes[0], panels):
        values = [r.get(key) for r in rows]
        means = [v["mean"] if v else math.nan for v in values]
        # a percentile interval may miss the mean by a rounding error (a difference of exactly zero): no negative
        # whisker
        errs = [[max(0.0, v["mean"] - v["ci95"][0]) if v else 0 for v in values],
                [max(0.0, v["ci95"][1] - v["mean"]) if v else 0 for v in values]]
        ax.bar(range(len(rows)), means, yerr=errs, capsize=4, alpha=0.8,
               color=[style["color"] for style in styles(names).values()])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{title}\n({better})", fontsize=9)
        ax.axhline(0, color="black", linewidth=0.6)
    n = sorted({r["prompts"] for r in rows})
    fig.suptitle(f"Each method minus SFT on the same held-out prompts (n = {'/'.join(map(str, n))} prompts); "
                 "bars: mean, whiskers: 95% paired bootstrap CI", fontsize=9)
    return png(fig)


def frontier(curves: dict[str, dict], y_keys: list[tuple[str, str]], kl_budget: float) -> bytes | None:
    """Score against KL to SFT, one curve per method from its eval_every points: where gold falls as KL grows
    while the proxy reward still rises, the policy over-optimises (Gao et al., 2022). curves: method ->
    {"points": [{"eval_kl", "eval_gold", "eval_reward", "step"}], "final": {"kl", "gold", "reward"} or None,
    "prompts": n per point}; y_keys: (key, axis label) per panel."""
    drawn = {m: c for m, c in curves.items() if any("eval_kl" in p for p in c["points"]) or c.get("final")}
    if not drawn or not y_keys:  # (no score to draw: no gold judge and no reward model)
        return None
    fig, axes = plt.subplots(1, len(y_keys), figsize=(6 * len(y_keys), 4.4), squeeze=False)
    finals = sorted({c["final"]["prompts"] for c in drawn.values() if c.get("final")})
    style = styles(drawn)
    for ax, (key, label) in zip(axes[0], y_keys):
        for method, c in drawn.items():
            color = style[method]["color"]
            points = [(p["eval_kl"], p[f"eval_{key}"]) for p in c["points"] if "eval_kl" in p and f"eval_{key}" in p]
            if points:
                ax.plot(*zip(*points), marker="o", **style[method], markersize=3,
                        label=f"{method} (n = {c.get('prompts') or '?'} prompts a point)")
                ax.annotate(f"step {c['points'][-1]['step']}", points[-1], fontsize=7, color=color,
                            xytext=(3, 3), textcoords="offset points")
            final = c.get("final") or {}
            if key in final:
                ax.plot([final["kl"]], [final[key]], "*", color=color, markersize=12,
                        label=None if points else method)
        reach = max([p["eval_kl"] for c in drawn.values() for p in c["points"] if "eval_kl" in p]
                    + [c["final"]["kl"] for c in drawn.values() if c.get("final")], default=0.0)
        if kl_budget and kl_budget <= 1.25 * reach:
            ax.axvline(kl_budget, color="red", linestyle="--", linewidth=0.8, label=f"KL budget {kl_budget:g}")
        elif kl_budget:  # drawn, it would squeeze the curves against the left edge
            ax.plot([], [], "r--", linewidth=0.8, label=f"KL budget {kl_budget:g}, beyond this axis")
        ax.set_xlabel("KL to SFT, nats per sampled response (lower is cheaper)")
        ax.set_ylabel(f"{label} ({HIGHER})")
        ax.set_title(f"{label} vs KL to SFT; stars: this report's final measurement\n"
                     f"(n = {'/'.join(map(str, finals))} prompts), lines: the stage's own held-out points", fontsize=9)
        ax.legend(fontsize=7)
    return png(fig)


def by_step(series: list[tuple[str, str, str, dict[str, list[tuple[float, float]]]]], title: str,
            cols: int = 4) -> bytes | None:
    """Panels of curves by step. series: (panel title, which way is better or "", x label, {line label: [(x, y)]})."""
    series = [s for s in series if any(s[3].values())]
    if not series:
        return None
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, min(cols, len(series)), figsize=(3.4 * min(cols, len(series)), 3.1 * rows),
                             squeeze=False)
    for ax, (name, better, xlabel, lines) in zip(axes.flat, series):
        style = styles(lines)
        for label, points in lines.items():
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label, **style[label])
        ax.set_title(name + (f"\n({better})" if better else ""), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return png(fig)


def calibration(models: dict[str, dict]) -> bytes | None:
    """Held-out accuracy by |margin| bucket against sigmoid(mean |margin|). models: name -> RM entry."""
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    style = styles(models)
    for name, m in models.items():
        buckets = m["rm_calibration"]
        ax.plot([b["predicted"] for b in buckets], [b["accuracy"] for b in buckets], marker="o", **style[name],
                label=f"{name} (n = {m['pairs']} pairs)")
    ax.plot([0.5, 1], [0.5, 1], "k--", linewidth=0.8, label="calibrated")
    ax.set_xlabel("sigmoid(mean |margin|) of the bucket")
    ax.set_ylabel(f"held-out accuracy ({HIGHER})")
    ax.set_title("Reward-model calibration by margin bucket\n(closer to the diagonal is better)", fontsize=10)
    ax.legend(fontsize=8)
    return png(fig)
