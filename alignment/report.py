"""The evaluation report: report.json (every number) and report.html, one self-contained page (figures inline as
base64 PNG, also kept in plots/) that leads with what a reader needs first:

 1. each method against SFT: paired differences with 95% intervals, KL to SFT, wall time, what it trained on;
 2. warnings, in words, where the numbers call for one;
 3. gold (where defined) and reward-model score against KL to SFT: the over-optimisation frontier;
 4. held-out curves by step, PPO's and GRPO's training curves;  5. SFT, reward-model and DPO training curves;
 6. every policy's greedy response to prompts spread over the instruction kinds;
 7. the reward model (one accuracy, agreeing with its manifest or saying why not);
 8. every metric of every policy;  9. lineage, config and run times;  10. what each metric means.

The page is rendered by jinja2 with autoescaping: model outputs are untrusted text.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import jinja2

from alignment import health, pipeline, plots, rewards, task

METHODS = ("base", *pipeline.STAGE3)  # compared with SFT in the headline, in this order
TRAINED_ON = {**{stage: ("episodes", "episodes") for stage in pipeline.RL}, "dpo": ("pairs_seen", "pairs")}
POLICY_COLUMNS = ["cross_entropy", "perplexity", "reward", "win_rate_vs_sft", "kl_per_token", "kl_per_response",
                  "response_length", "distinct_1", "distinct_2", "ended_with_eos", "gold", "gold_win_rate_vs_sft"]
LOWER_BETTER = {"cross_entropy", "perplexity", "kl_per_token", "kl_per_response"}  # no mark: length, distinct, eos
HIGHER_BETTER = {"reward", "win_rate_vs_sft", "gold", "gold_win_rate_vs_sft", "rm_accuracy", "rm_margin"}
RM_COLUMNS = ["rm_accuracy", "rm_margin", "rm_length_correlation", "shorter_wins_accuracy"]
GOLD_FALL = 0.05  # a fall in a curve's gold (means over its n prompts, no interval) worth a warning


def label(run: str, stage: str, runs: int) -> str:
    return f"{run}/{stage}" if runs > 1 else stage


def _methods(result: dict):
    """(run, stage, entry) of every measured policy compared with SFT, in METHODS order within a run."""
    for run, entry in result["runs"].items():
        for stage in METHODS:
            if stage in entry["checkpoints"]:
                yield run, stage, entry["checkpoints"][stage]


# ---- what the report says ------------------------------------------------------------------------------


def headline(result: dict) -> list[dict]:
    """One row per run's SFT reference (its own scores) and per method (its differences to that SFT)."""
    rows, n_runs = [], len(result["runs"])
    for run, entry in result["runs"].items():
        methods = [(s, m) for s, m in entry["checkpoints"].items() if s in METHODS]
        lineage = {c["stage"]: c for c in entry.get("lineage", [])}
        any_vs = next((m["vs_sft"] for s, m in entry["checkpoints"].items() if "vs_sft" in m), None)
        if any_vs is None:
            continue
        rows.append({"method": label(run, "sft", n_runs) + " (reference)", "reference": True, "stage": "sft",
                     "prompts": any_vs["prompts"], "duration_s": (lineage.get("sft") or {}).get("duration_s"),
                     **{f"{key}_{mode}": any_vs[mode][key]["sft"] for mode in ("greedy", "sampled")
                        for key in ("gold", "reward") if key in any_vs[mode]}})
        for stage, m in methods:
            vs, rec = m["vs_sft"], m.get("recorded", {})
            field, unit = TRAINED_ON.get(stage, (None, None))
            seen = rec.get(field) if field else None
            rows.append({"method": label(run, stage, n_runs), "reference": False, "stage": stage,
                         "collapsed": bool(collapse_signs(entry, stage)),
                         "judge_trained": any(s.endswith(rewards.JUDGE_FUNCTIONS) for s in rec.get("rewards") or []),
                         "terms": term_lines(m.get("terms") or {}),
                         "prompts": vs["prompts"], "samples": vs["samples"], "kl": vs["kl"],
                         "duration_s": rec.get("duration_s"), "trained_on": f"{seen:,} {unit}" if seen else None,
                         **{f"{key}_{mode}": vs[mode][key]["difference"] for mode in ("greedy", "sampled")
                            for key in ("gold", "reward") if key in vs[mode]}})
    return rows


def term_lines(terms: dict) -> list[str]:
    """The reward functions a policy was also rewarded by, each against SFT (stages/eval.py's reward_terms), in
    words: 'length_penalty: greedy +5.33 [+4.95, +5.69], sampled ...'."""
    out = []
    for name in terms.get("greedy", {}):
        parts = []
        for mode in ("greedy", "sampled"):
            t = terms.get(mode, {}).get(name) or {}
            if t.get("prompts"):
                d = t["difference"]
                parts.append(f"{mode} {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
        error = (terms.get("greedy", {}).get(name) or {}).get("error")
        said = f"not measured ({error})" if error else "applies to no held-out prompt"
        out.append(f"{name} − SFT: " + (", ".join(parts) if parts else said))
    return out


def collapse_signs(entry: dict, stage: str) -> list[str]:
    """The signs that stage's greedy answers collapsed against its run's SFT policy's (health.collapse)."""
    answers, sft = entry["checkpoints"][stage].get("answers"), entry["checkpoints"].get("sft", {}).get("answers")
    return health.collapse(answers["greedy"], sft["greedy"]) if answers and sft and stage != "sft" else []


def answers_table(entry: dict) -> list[dict]:
    """Per policy of a run, its greedy answers as a set (health.measures), its length against SFT's and the
    signs of collapse."""
    sft = (entry["checkpoints"].get("sft", {}).get("answers") or {}).get("greedy")
    rows = []
    for stage, m in entry["checkpoints"].items():
        if m["kind"] != "policy" or not m.get("answers"):
            continue
        a = m["answers"]["greedy"]
        rows.append({"stage": stage, **a, "length_vs_sft": a["mean_length"] / sft["mean_length"]
                     if sft and sft["mean_length"] else None, "signs": collapse_signs(entry, stage)})
    return rows


def rm_agreement(rm: dict) -> tuple[bool, str]:
    """Whether the report's reward-model accuracy is the one its stage recorded (same split, prefs_eval), in words."""
    mine, n = rm["rm_accuracy"]["mean"], rm["pairs"]
    recorded, now = rm.get("stage_recorded") or {}, rm.get("now") or {}
    theirs = recorded.get("accuracy")
    if theirs is None:
        return False, (f"Reward-model accuracy {mine:.3f} on {n} held-out pairs; the rm stage's manifest records none "
                       "(written before it did): this is the only one.")
    if abs(mine - theirs) < 1e-9 and recorded.get("pairs") == n:
        return True, (f"Reward-model accuracy {mine:.3f} on {n} held-out pairs (prefs_eval): the same number the rm "
                      "stage recorded in its manifest after training.")
    reasons = []
    if recorded.get("pairs") != n:
        reasons.append(f"the stage scored {recorded.get('pairs')} pairs (limit={recorded.get('limit')}), this report "
                       f"{n} (limit={now.get('limit')})")
    if recorded.get("fingerprint") and now.get("fingerprint") and recorded["fingerprint"] != now["fingerprint"]:
        reasons.append("the preference data changed since the stage ran (its fingerprint differs)")
    if not reasons and now.get("dtype") not in (None, "float32"):
        reasons.append(f"the stage scored the fp32 weights it trained, this report the checkpoint as saved in "
                       f"{now['dtype']}: rounding flips pairs whose margin is near zero")
    if not reasons:
        reasons.append("no difference of pairs, data or precision explains it: rerun `make rm`, then `make eval`")
    flips = round(abs(mine - theirs) * n)
    flipped = f" ({flips} pair{'s' * (flips != 1)} apart)" if recorded.get("pairs") == n else ""
    return False, (f"Two reward-model accuracies: {mine:.3f} in this report on {n} held-out pairs, {theirs:.3f} in the "
                   f"rm stage's manifest on {recorded.get('pairs')}{flipped}, both on prefs_eval: "
                   + "; ".join(reasons) + ".")


def _counts(kinds: dict) -> str:
    return ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items()))


def _interval(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def warnings(result: dict) -> list[str]:
    """What the numbers say a reader must not miss, one sentence or two each."""
    out, n_runs = [], len(result["runs"])
    settings = result["settings"]["eval"]
    for run, entry in result["runs"].items():
        name = lambda stage, run=run: label(run, stage, n_runs)
        judge = "The reward model" if n_runs == 1 else f"The reward model {run}/rm"
        checkpoints = entry["checkpoints"]
        for c in entry.get("lineage", []):
            if c.get("stale"):
                out.append(f"{c['id']} is stale: {c['stale']}. Its numbers describe it as it is, not what its current "
                           f"parents would give: rerun `make {c['stage']}`.")
        if base := checkpoints.get("base"):
            out += _judge_prefers_base(judge, base["vs_sft"])
        for stage in (s for s in METHODS[1:] if s in checkpoints):
            vs, rec = checkpoints[stage]["vs_sft"], checkpoints[stage].get("recorded", {})
            if collapse_signs(entry, stage):
                out.append(health.collapse_line(name(stage), checkpoints[stage]["answers"]["greedy"],
                                                checkpoints["sft"]["answers"]["greedy"],
                                                (vs["greedy"].get("reward") or {}).get("difference", {}).get("mean")))
            if judged := [s for s in rec.get("rewards") or [] if s.endswith(rewards.JUDGE_FUNCTIONS)]:
                out.append(f"{name(stage)} was rewarded by the gold judge itself ({', '.join(judged)}): its gold "
                           "gains measure what it was trained on, not an independent improvement.")
            if guarded := rec.get("guard"):
                out.append(f"{name(stage)} is the policy of step {guarded['published_step']}: its stage's guard "
                           f"(guard_collapse) stopped training when the held-out point of step "
                           f"{guarded['collapsed_at_step']} showed a collapse ({'; '.join(guarded['signs'])}).")
            out += _over_optimisation(name(stage), vs, rec.get("eval_curve", []), rec.get("curve_prompts"))
            out += _over_budget(name(stage), vs["kl"], rec.get("eval_curve", []), settings["kl_budget"])
            if rec.get("skipped_non_finite"):
                out.append(f"{name(stage)}'s training skipped {rec['skipped_non_finite']} updates with non-finite "
                           "values: its log says at which steps.")
            if rec.get("reward_model") and rec["reward_model"] != f"{run}/rm":
                out.append(f"{name(stage)} was trained against the reward model {rec['reward_model']}; this report "
                           + (f"judges it by {run}/rm." if "rm" in checkpoints else
                              f"has no reward model of {run}'s to judge it by."))
        kinds = entry.get("prompt_kinds") or {}
        if kinds and len(kinds) < len(task.OPERATIONS):
            out.append(f"The {entry['prompts']} held-out prompts hold only {_counts(kinds)} of the task's "
                       f"{len(task.OPERATIONS)} operations (limit={result['settings'].get('limit')} keeps the first "
                       "prompts of a sorted file): every number here describes those alone.")
        if not entry.get("gold") and any(s in checkpoints for s in METHODS[1:]):
            out.append(
                f"No gold judge for {run}'s data: proxy reward rising while true quality falls cannot be seen in "
                "these numbers; read the side-by-side responses, and take reward gains as "
                + ("the reward model's opinion." if "rm" in checkpoints else "the reward functions' opinion.")
            )
        cut = [f"{name(s)} {1 - m['ended_with_eos']['mean']:.0%}" for s, m in checkpoints.items()
               if m["kind"] == "policy" and m["ended_with_eos"]["mean"] < 0.5]
        if cut:
            out.append(f"Most sampled responses reach eval.max_new_tokens={settings['max_new_tokens']} without ending ("
                       + ", ".join(cut) + "): their scores judge cut-off text.")
        if rm := checkpoints.get("rm"):
            acc = rm["rm_accuracy"]
            if acc["ci95"][0] <= 0.5:
                out.append(f"{judge} is not clearly better than chance: held-out accuracy {_num(acc)} on "
                           f"{rm['pairs']} pairs.")
            if acc["mean"] <= rm["shorter_wins_accuracy"]:
                out.append(f"{judge} ({acc['mean']:.3f}) does no better than the rule 'the shorter response wins' "
                           f"({rm['shorter_wins_accuracy']:.3f}) on the same pairs.")
            agree, words = rm_agreement(rm)
            if not agree:
                out.append(words)
    return out


def _judge_prefers_base(judge: str, vs: dict) -> list[str]:
    """The reward model scores the untrained base above SFT (greedy or sampled): it will pull policies back."""
    modes = [m for m in ("greedy", "sampled") if "reward" in vs[m] and vs[m]["reward"]["difference"]["mean"] > 0]
    if not modes:
        return []
    sure = all(vs[m]["reward"]["difference"]["ci95"][0] > 0 for m in modes)
    text = (f"{judge} prefers the untrained base model to SFT: base minus SFT reward "
            + ", ".join(f"{_interval(vs[m]['reward']['difference'])} {m}" for m in modes)
            + (" (above zero)" if sure else " (an interval includes zero: possibly chance)"))
    if "gold" in vs[modes[0]]:
        text += f"; by the gold judge the base is {_interval(vs[modes[0]]['gold']['difference'])} {modes[0]}"
    return [text + ". A judge that ranks the base above SFT pulls the policies trained against it back towards the "
            "base: see its accuracy and length correlation (section 7)."]


def _over_optimisation(name: str, vs: dict, curve: list[dict], prompts) -> list[str]:
    """Proxy up, gold down: in the final comparison with SFT (greedy, sampled), and along the method's held-out
    curve (gold fell from its peak while the reward-model score rose past the peak's)."""
    out, found = [], []
    for mode in ("greedy", "sampled"):
        r, g = (vs[mode].get("reward") or {}).get("difference"), (vs[mode].get("gold") or {}).get("difference")
        if r and g and r["mean"] > 0 and g["mean"] < 0:
            found.append((mode, r, g, r["ci95"][0] > 0 and g["ci95"][1] < 0))
    if found:
        out.append(f"Over-optimisation: {name} scores higher than SFT by the reward model but lower by the gold judge ("
                   + "; ".join(f"{mode}: reward {_interval(r)}, gold {_interval(g)}" for mode, r, g, _ in found) + ")"
                   + ("; every interval excludes zero: it exploits the reward model." if all(f[3] for f in found)
                      else "; an interval includes zero, so this may be chance: watch it."))
    golds = [p for p in curve if "eval_gold" in p and "eval_reward" in p]
    if golds:
        peak, last = max(golds, key=lambda p: p["eval_gold"]), golds[-1]
        if peak["eval_gold"] - last["eval_gold"] > GOLD_FALL and last["eval_reward"] > peak["eval_reward"]:
            out.append(
                f"Over-optimisation during {name}'s training: after step {peak['step']} (gold "
                f"{peak['eval_gold']:.3f}, reward {peak['eval_reward']:.3f}, KL {peak.get('eval_kl', math.nan):.2f})"
                f" the reward-model score rose to {last['eval_reward']:.3f} by step {last['step']} while gold "
                f"fell to {last['eval_gold']:.3f} (means over {prompts} prompts; falls under {GOLD_FALL} are "
                f"not flagged). The checkpoint at step {peak['step']} was the better one by gold."
            )
    return out


def _over_budget(name: str, kl: dict, curve: list[dict], budget: float) -> list[str]:
    """KL to SFT beyond eval.kl_budget: at the end (this report's measurement), or on the way (the curve)."""
    if not budget:
        return []
    passed = next((p for p in curve if p.get("eval_kl", 0) > budget), None)
    during = (
        f"during training it passed the budget at step {passed['step']} (KL {passed['eval_kl']:.2f})" if passed else ""
    )
    if kl["mean"] > budget:
        return [f"{name} is {_num(kl, 2)} nats per response from SFT, over the KL budget of {budget:g} "
                f"(eval.kl_budget)" + (f"; {during}." if during else ".")]
    return [f"{name} ends within the KL budget of {budget:g} nats ({kl['mean']:.2f}), but {during}."] if during else []


# ---- figures -------------------------------------------------------------------------------------------


def rm_scored(rows: list[dict]) -> bool:
    """Whether a reward model scored the headline's policies (a run rewarded by functions alone has none)."""
    return any("reward_greedy" in row for row in rows)


def figures(result: dict, rows: list[dict]) -> dict[str, bytes]:
    """name -> PNG of every figure there is something to draw for."""
    n_runs, budget = len(result["runs"]), result["settings"]["eval"]["kl_budget"]
    gold = any(e.get("gold") for e in result["runs"].values())
    methods = [r for r in rows if not r["reference"]]
    panels = [
        (k, t, plots.HIGHER)
        for k, t in (
            ("gold_greedy", "gold − SFT, greedy"),
            ("gold_sampled", "gold − SFT, sampled"),
            ("reward_greedy", "RM reward − SFT, greedy"),
            ("reward_sampled", "RM reward − SFT, sampled"),
        )
    ]
    panels.append(("kl", "KL to SFT, nats/response (sampled)", plots.LOWER + " (a cost)"))
    out = {"headline": plots.headline(methods, panels)}

    curves = {}
    for run, entry in result["runs"].items():
        for stage, m in entry["checkpoints"].items():
            if stage not in METHODS[1:] and stage != "sft":
                continue
            vs, rec = m["vs_sft"], m.get("recorded", {})
            final = {"kl": vs["kl"]["mean"] if stage != "sft" else 0.0, "prompts": vs["prompts"],
                     **{k: vs["sampled"][k]["policy"] for k in ("gold", "reward") if k in vs["sampled"]}}
            curves[label(run, stage, n_runs)] = {"points": rec.get("eval_curve", []), "final": final,
                                                 "prompts": rec.get("curve_prompts")}
    y_keys = ([("gold", "gold score")] if gold else []) + ([("reward", "reward-model score")] if rm_scored(rows) else [])
    out["frontier"] = plots.frontier(curves, y_keys, budget)

    held_out = [(t, b, "step", {f"{label(run, s, n_runs)} (n = {m['recorded'].get('curve_prompts')})":
                                [(p["step"], p[key]) for p in m["recorded"]["eval_curve"] if key in p]
                                for run, s, m in _methods(result) if "recorded" in m})
                for key, t, b in (("eval_gold", "held-out gold", plots.HIGHER),
                                  ("eval_reward", "held-out reward-model score", plots.HIGHER),
                                  ("eval_kl", "held-out KL to SFT (nats/response)", plots.LOWER + " (a cost)"))]
    out["held_out_curves"] = plots.by_step(held_out, "Each method's held-out evaluations during training "
                                                     "(n prompts per point in the legend)", cols=3)
    def lines(stage: str, key: str, items) -> dict:
        """run/stage -> [(step, value)] of the stage's per-step log, labelled with what a point rests on."""
        found = {}
        for run, e in result["runs"].items():
            records = e.get("training_logs", {}).get(stage, {}).get("records", [])
            points = [(x["step"], x[key]) for x in records if key in x and "step" in x]
            if points:
                found[f"{label(run, stage, n_runs)} ({items(e, records)})"] = points
        return found

    batches = lambda stage: lambda e, _: f"batches of {_setting(e, stage, 'batch_size')}"
    terms = sorted({k for e in result["runs"].values() for stage in pipeline.RL
                    for x in e.get("training_logs", {}).get(stage, {}).get("records", []) for k in x
                    if k.startswith("reward/")})  # each reward term's own values, where several were mixed
    loops = [
        (t, b, "step", {k: v for stage in pipeline.RL for k, v in lines(stage, key, batches(stage)).items()})
        for key, t, b in (
            ("reward", "train reward (raw: the RM's score or the one term's; the terms' mix where several)",
             plots.HIGHER),
            *((term, f"train reward term {term.removeprefix('reward/')} (raw)", "") for term in terms),
            ("kl", "train KL, nats/response", ""),
            ("entropy", "policy entropy", ""),
            ("value_loss", "PPO value loss", plots.LOWER),
        )
    ]
    out["rl_training"] = plots.by_step(loops, "RL training (PPO, GRPO, RLOO, REINFORCE++), per step (the stages' "
                                              "own logs)")
    trainers = [(t, b, "optimizer step", lines(stage, key, batches(stage) if not key.startswith("eval_") else
                                                   lambda e, records: _evaluated(records)))
                for stage, key, t, b in (("sft", "loss", "SFT train loss", plots.LOWER),
                                         ("sft", "eval_loss", "SFT held-out loss (sft_eval)", plots.LOWER),
                                         ("rm", "loss", "RM train loss", plots.LOWER),
                                         ("rm", "accuracy", "RM train accuracy", plots.HIGHER),
                                         ("rm", "eval_accuracy", "RM validation accuracy", plots.HIGHER),
                                         ("dpo", "loss", "DPO train loss", plots.LOWER),
                                         ("dpo", "rewards/accuracies", "DPO implicit-reward accuracy", plots.HIGHER))]
    out["training_curves"] = plots.by_step(trainers, "SFT, reward-model and DPO training (the trainers' log histories)",
                                           cols=4)
    out["rm_calibration"] = plots.calibration({label(run, "rm", n_runs): e["checkpoints"]["rm"]
                                               for run, e in result["runs"].items() if "rm" in e["checkpoints"]})
    return {k: v for k, v in out.items() if v}


def _setting(entry: dict, stage: str, key: str):
    c = next((c for c in entry.get("lineage", []) if c["stage"] == stage), None)
    return ((c or {}).get("config") or {}).get(stage, {}).get(key)


def _evaluated(records: list[dict]) -> str:
    """How many items a held-out point of a trainer's curve rests on: the trainer logs runtime x items per second."""
    e = next((r for r in records if "eval_runtime" in r and "eval_samples_per_second" in r), None)
    return f"n = {round(e['eval_runtime'] * e['eval_samples_per_second'])}" if e else "n unknown"


# ---- the page ------------------------------------------------------------------------------------------


def _num(v, digits: int = 3) -> str:
    if isinstance(v, dict) and "mean" in v:
        return f"{v['mean']:.{digits}f} [{v['ci95'][0]:.{digits}f}, {v['ci95'][1]:.{digits}f}]"
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _signed(v) -> str:
    if isinstance(v, dict) and "mean" in v:
        return _interval(v)
    return _num(v)


def _verdict(v) -> str:
    """CSS class of a paired difference: its interval above zero, below zero, or across it."""
    if not isinstance(v, dict) or "ci95" not in v:
        return ""
    return "up" if v["ci95"][0] > 0 else "down" if v["ci95"][1] < 0 else ""


def _mark(key: str) -> str:
    return " ↑" if key in HIGHER_BETTER else " ↓" if key in LOWER_BETTER else ""


_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_ENV.filters.update(num=_num, signed=_signed, verdict=_verdict, mark=_mark, counts=_counts,
                    json=lambda v: json.dumps(v, indent=1, default=str),
                    prompt=lambda p: p if isinstance(p, str) else "\n".join(f"{m['role']}: {m['content']}" for m in p))

PAGE = _ENV.from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>Alignment evaluation report</title>
<style>body{font-family:sans-serif;max-width:1350px;margin:2em auto;padding:0 1em;line-height:1.35}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 7px;text-align:left;
vertical-align:top}th{background:#f3f3f3}small,.note{color:#555}img{max-width:100%}.up{background:#e3f4e3}
.down{background:#fbe3e3}.ref td{background:#f7f7f7}code,.out{font-family:monospace;white-space:pre-wrap}
.warn li{margin:.4em 0}pre{font-size:12px;max-height:30em;overflow:auto;background:#fafafa;padding:.5em}</style>
</head><body>
<h1>Alignment evaluation report</h1>
<p>Store <code>{{ r.store }}</code>, written {{ r.created }} in {{ r.duration_s }} s.
{% for run, e in r.runs.items() %}Run <code>{{ run }}</code> (model {{ e.model }}, data {{ e.data }}): {{ e.prompts }} held-out
prompts, {{ e.pairs }} preference pairs, {{ e.demonstrations }} demonstrations, {{ "a gold judge" if e.gold else "no gold judge" }}.
{% endfor %}Responses: at most {{ s.max_new_tokens }} new tokens, temperature {{ s.temperature }}, {{ s.samples }} sampled
per prompt; KL budget {{ s.kl_budget }} nats per response (<code>eval.kl_budget</code>). Intervals are 95% bootstrap
intervals over held-out items; ↑ higher is better, ↓ lower is better.</p>

<h2 id="headline">1. Each method against SFT</h2>
<p>Every policy minus its run's SFT policy on the same held-out prompts (paired: the interval is over prompts).
Green: the interval lies above zero; red: below. KL to SFT is what the method spent to get there (a cost).</p>
<table><thead><tr><th>method</th>{% if gold %}<th>gold − SFT, greedy ↑</th><th>gold − SFT, sampled ↑</th>{% endif %}
{% if judged %}<th>RM reward − SFT, greedy ↑</th><th>RM reward − SFT, sampled ↑</th>{% endif %}<th>KL to SFT, nats/response ↓</th>
<th>stage wall time, s ↓</th><th>trained on</th><th>n prompts</th></tr></thead><tbody>
{% for row in headline %}
<tr{% if row.reference %} class="ref"{% endif %}><td><b>{{ row.method }}</b>{% if row.get("collapsed") %}
<br><small class="down">its answers collapsed: see section 2 and the table below</small>{% endif %}
{% if row.get("judge_trained") %}<br><small class="down">rewarded by the gold judge: its gold gain is no independent
measure</small>{% endif %}{% for line in row.get("terms") or [] %}<br><small>reward term {{ line }}</small>{% endfor %}
</td>
{% for key in keys %}
{% if row.reference %}<td>{{ row.get(key) | num }} <small>(its own score)</small></td>
{% else %}<td class="{{ row.get(key) | verdict }}">{{ row.get(key) | signed }}</td>{% endif %}
{% endfor %}
<td>{{ "0 (the reference)" if row.reference else row.kl | num(2) }}</td><td>{{ row.duration_s | num(1) }}</td>
<td>{{ row.get("trained_on") | num }}</td><td>{{ row.prompts }}</td></tr>
{% endfor %}
</tbody></table>
{% if "headline" in images %}<p><img src="{{ images.headline }}" alt="headline"></p>{% endif %}
{% for run, e in r.runs.items() if answers[run] %}
<p>Run <code>{{ run }}</code>: every policy's greedy answers to the {{ e.prompts }} held-out prompts as a set, which
needs no judge: a policy that games its reward model with one answer to every prompt shows here even where there is
no gold judge. Collapse: under half SFT's distinct share, or one answer to at least 10% of the prompts and 3x SFT's
most frequent share; answers under half SFT's length are then one more sign (alignment/health.py).</p>
<table><thead><tr><th>policy</th><th>distinct answers ↑</th><th>most frequent answer</th><th>distinct-1 / -2 over
all</th><th>mean words</th><th>length / SFT's</th><th>words from the prompt</th><th>collapse</th></tr></thead><tbody>
{% for a in answers[run] %}<tr><td>{{ a.stage }}</td><td>{{ a.distinct_responses | num }}</td>
<td>{{ a.top_response_share | num }} <small class="out">{{ a.top_response[:60] }}</small></td>
<td>{{ a.distinct_1_all | num }} / {{ a.distinct_2_all | num }}</td><td>{{ a.mean_length | num(1) }}</td>
<td>{{ a.length_vs_sft | num(2) }}</td><td>{{ a.prompt_overlap | num }}</td>
<td class="{{ 'down' if a.signs }}">{{ a.signs | join("; ") if a.signs else "no" }}</td></tr>{% endfor %}
</tbody></table>{% endfor %}

<h2 id="warnings">2. Warnings</h2>
{% if warnings %}<ul class="warn">{% for w in warnings %}<li>{{ w }}</li>{% endfor %}</ul>
{% else %}<p>None: no check below found anything to say (stale lineage, a reward model preferring the base, answers
collapsed, reward up while gold falls, KL over budget, responses cut off, a reward model near chance or below
"shorter wins", two reward-model accuracies).</p>{% endif %}

<h2 id="frontier">3. {{ "Gold" if gold else "Reward-model score" if judged else "Score" }} against KL to SFT</h2>
<p>One curve per method from the held-out points its stage measured every <code>eval_every</code> steps; stars: this
report's final measurement. Gao et al. (2022): as a policy moves away from its reference the proxy (reward-model)
score keeps rising while the true score peaks and falls{% if not gold and judged %}; this data has no gold judge, so only
the proxy is drawn{% elif not gold %}; this run has neither a gold judge nor a reward model: nothing to draw{% endif %}.</p>
{% if "frontier" in images %}<p><img src="{{ images.frontier }}" alt="frontier"></p>{% else %}<p class="note">No method
recorded held-out points.</p>{% endif %}

<h2 id="curves">4. Curves by step</h2>
{% for name in ("held_out_curves", "rl_training") if name in images %}<p><img src="{{ images[name] }}" alt="{{ name }}"></p>{% endfor %}

<h2 id="training">5. SFT, reward-model and DPO training</h2>
{% for run, e in r.runs.items() %}{% for stage, log in e.get("training_logs", {}).items() %}<p class="note">{{ run }}/{{ stage }}: {{ log.records | length }}
log records, from {{ log.source }}.</p>{% endfor %}{% endfor %}
{% if "training_curves" in images %}<p><img src="{{ images.training_curves }}" alt="training_curves"></p>{% endif %}

<h2 id="samples">6. Side by side</h2>
{% for run, e in r.runs.items() if e.side_by_side %}
{% set stages = policies[run] %}
<p>Run <code>{{ run }}</code>: greedy responses to {{ e.side_by_side | length }} held-out prompts spread over
{{ ("the instruction kinds among them: " ~ (e.prompt_kinds | counts)) if e.get("prompt_kinds") else "the held-out prompts at random" }}
(seed {{ r.settings.seed }}){% if judged or e.gold %}, with the {{ "reward-model score" if judged }}{{ " and the " if e.gold and judged }}{{ "gold score" if e.gold }} of each{% endif %}.</p>
<table><thead><tr><th>prompt</th>{% for s in stages %}<th>{{ s }}</th>{% endfor %}</tr></thead><tbody>
{% for row in e.side_by_side %}<tr><td><span class="out">{{ row.prompt | prompt }}</span></td>
{% for s in stages %}{% set x = row.get(s) %}<td>{% if x %}<span class="out">{{ x.response or "(empty)" }}</span><br><small>
{%- if "reward" in x %}RM {{ x.reward | num(2) }}{% endif %}{% if "reward" in x and "gold" in x %}, {% endif %}
{%- if "gold" in x %}gold {{ x.gold | num(2) }}{% endif %}</small>{% else %}–{% endif %}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% endfor %}

<h2 id="reward-model">7. Reward model</h2>
{% for run, e in r.runs.items() if "rm" in e.checkpoints %}{% set m = e.checkpoints.rm %}
<p><b>{{ run }}/rm</b>: {{ agreement[run] }}</p>
<table><thead><tr>{% for c in rm_columns %}<th>{{ c }}{{ c | mark }}</th>{% endfor %}<th>pairs</th></tr></thead>
<tbody><tr>{% for c in rm_columns %}<td>{{ m[c] | num }}</td>{% endfor %}<td>{{ m.pairs }}</td></tr></tbody></table>
<table><thead><tr><th>|margin| from</th><th>to</th><th>pairs</th><th>accuracy ↑</th><th>sigmoid(mean |margin|)</th></tr></thead><tbody>
{% for b in m.rm_calibration %}<tr><td>{{ b.abs_margin_min | num }}</td><td>{{ b.abs_margin_max | num }}</td><td>{{ b.pairs }}</td>
<td>{{ b.accuracy | num }}</td><td>{{ b.predicted | num }}</td></tr>{% endfor %}</tbody></table>
{% endfor %}
{% if "rm_calibration" in images %}<p><img src="{{ images.rm_calibration }}" alt="rm_calibration"></p>{% endif %}

<h2 id="metrics">8. Every metric of every policy</h2>
{% for run, e in r.runs.items() %}{% set stages = policies[run] %}{% if stages %}
<p>Run <code>{{ run }}</code>: sampled responses to {{ e.prompts }} held-out prompts; cross-entropy on {{ e.demonstrations }} held-out demonstrations.</p>
<table><thead><tr><th>metric</th>{% for s in stages %}<th>{{ s }}</th>{% endfor %}</tr></thead><tbody>
{% for k in columns[run] %}<tr><td><code>{{ k }}</code>{{ k | mark }}</td>
{% for s in stages %}<td>{{ e.checkpoints[s].get(k) | num }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>{% endif %}{% endfor %}

<h2 id="lineage">9. Lineage, config and run times</h2>
{% for run, e in r.runs.items() %}
<p>Run <code>{{ run }}</code>; base model <code>{{ e.base }}</code> (what SFT started from).</p>
<table><thead><tr><th>checkpoint</th><th>uid</th><th>parents (uid recorded)</th><th>lineage</th><th>created</th>
<th>stage wall time, s</th><th>data</th><th>config</th></tr></thead><tbody>
{% for c in e.lineage %}<tr><td><code>{{ c.id }}</code>{{ " (LoRA adapter)" if c.adapter }}</td><td><code>{{ c.uid }}</code></td>
<td>{% for p in c.parents %}<code>{{ p.id }}</code> ({{ p.uid or "not recorded" }})<br>{% else %}–{% endfor %}</td>
<td class="{{ 'down' if c.stale }}">{{ ("stale: " ~ c.stale) if c.stale else "fresh" }}</td><td>{{ c.created }}</td>
<td>{{ c.duration_s | num(1) }}</td><td>{{ (c.data or {}).get("profile") }} <small>{{ ((c.data or {}).get("fingerprint") or "")[:12] }}</small></td>
<td><details><summary>config</summary><pre>{{ c.config | json }}</pre></details></td></tr>{% endfor %}
</tbody></table>
{% endfor %}
<p>This report's settings:</p><details><summary>eval config</summary><pre>{{ r.settings | json }}</pre></details>

<h2 id="definitions">10. What the numbers mean</h2>
<table><thead><tr><th>metric</th><th>definition</th></tr></thead><tbody>
{% for k, v in r.definitions.items() %}<tr><td><code>{{ k }}</code></td><td>{{ v }}</td></tr>{% endfor %}
</tbody></table>
<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded=
[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;});</script>
</body></html>
""")


def write(result: dict, run_dir: Path) -> Path:
    """Adds the headline rows and warnings to result, writes report.json, the figures (plots/*.png) and
    report.html, which holds the figures itself: the page is one file that travels alone."""
    run_dir = Path(run_dir)
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    for old in (run_dir / "plots").glob("*.png"):  # an earlier report's figure must not pass for this one's
        old.unlink()
    result["headline"], result["warnings"] = headline(result), warnings(result)
    images = figures(result, result["headline"])
    for name, data in images.items():
        (run_dir / "plots" / f"{name}.png").write_bytes(data)
    with open(run_dir / "report.json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    gold = any(e.get("gold") for e in result["runs"].values())
    judged = rm_scored(result["headline"])
    page = PAGE.render(
        r=result,
        s=result["settings"]["eval"],
        headline=result["headline"],
        warnings=result["warnings"],
        gold=gold,
        judged=judged,
        keys=[f"{k}_{m}" for k, on in (("gold", gold), ("reward", judged)) if on for m in ("greedy", "sampled")],
        images={k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in images.items()},
        policies={
            run: [s for s, m in e["checkpoints"].items() if m["kind"] == "policy"] for run, e in result["runs"].items()
        },
        agreement={
            run: rm_agreement(e["checkpoints"]["rm"])[1]
            for run, e in result["runs"].items()
            if "rm" in e["checkpoints"]
        },
        columns={
            run: [k for k in POLICY_COLUMNS if any(k in m for m in e["checkpoints"].values() if m["kind"] == "policy")]
            for run, e in result["runs"].items()
        },
        rm_columns=RM_COLUMNS,
        answers={run: answers_table(e) for run, e in result["runs"].items()},
    )
    (run_dir / "report.html").write_text(page)
    return run_dir


def text_summary(result: dict) -> str:
    """The headline and the warnings, for the terminal."""
    lines = []
    for row in result.get("headline") or headline(result):
        scores = " ".join(f"{k}={_signed(row[k]) if not row['reference'] else _num(row[k])}"
                          for k in ("gold_greedy", "gold_sampled", "reward_greedy", "reward_sampled") if k in row)
        kl = "" if row["reference"] else f" kl={row['kl']['mean']:.2f}"
        lines.append(f"  {row['method']:24s} {scores}{kl}")
        lines += [f"  {'':24s} reward term {line}" for line in row.get("terms") or []]
    for run, e in result["runs"].items():
        if "rm" in e["checkpoints"]:
            m = e["checkpoints"]["rm"]
            lines.append(f"  {run + '/rm':24s} accuracy={m['rm_accuracy']['mean']:.3f} on {m['pairs']} pairs "
                         f"length_corr={m['rm_length_correlation']:.3f} shorter_wins={m['shorter_wins_accuracy']:.3f}")
    lines += [f"  warning: {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)


def format_comparison(summary: dict, method: str = "ppo") -> str:
    """compare_policies' summary as the lines a stage ends with; method names the trained policy."""
    lines = [
        (f"{method.upper()} vs SFT on {summary['eval_prompts']} held-out prompts "
        "(95% paired bootstrap CI of the difference)")
    ]
    for mode in ("greedy", "sampled"):
        s = summary[mode]
        for key in ("gold", "reward"):
            if key in s:
                d = s[key]["difference"]
                lines.append(
                    f"  {mode:8s} {key:7s} sft {s[key]['sft']:+.3f} -> {method} {s[key]['policy']:+.3f}   "
                    f"diff {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                )
        for name, t in (s.get("terms") or {}).items():  # the reward functions it was also rewarded by
            if not t["prompts"]:
                lines.append(f"  {mode:8s} {name}: applies to no held-out prompt")
                continue
            d = t["difference"]
            lines.append(f"  {mode:8s} {name} sft {t['sft']:+.3f} -> {method} {t['policy']:+.3f}   diff "
                         f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] on {t['prompts']} prompts")
        lines.append(
            f"  {mode:8s} KL({method}||sft) {s['kl']:.3f} nats/response   length sft {s['response_length']['sft']:.1f}"
            f" -> {method} {s['response_length']['policy']:.1f}"
        )
    for ex in summary["greedy"]["examples"]:
        prompt = ex["prompt"] if isinstance(ex["prompt"], str) else ex["prompt"][-1]["content"]  # last user turn
        lines.append(f"  e.g. {prompt!r}: sft {ex['sft']!r} -> {method} {ex['policy']!r}")
    return "\n".join(lines)
