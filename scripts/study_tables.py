"""The README's tables of a study folder: one row per setting, the question's verdict, and the val-chosen doses.

    python scripts/study_tables.py runs/study_guidance_benchmark --split test --target test_shifted

Reads DIR/summary.json and DIR/trade_off.json (written by `sib study`). Per setting: accuracy on every split,
EPG per method on `--split`, each "mean (paired difference to the baseline)", **bold** where the difference's
95% t-interval over seeds excludes zero; "EPG up / down" counts methods with a significant rise / fall; "answer"
is yes when EPG rises significantly for at least `--need` methods AND accuracy on `--target` rises
significantly AND accuracy on `--split` does not fall significantly. Then, per swept group, the dose chosen on
`val` by the rule fixed in the study files (highest mean val EPG among doses whose mean val accuracy is at least
the baseline's minus 0.01).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

EPG = "energy_pointing_game"


def sig(r: dict) -> int:
    """+1 / -1 when the paired difference's seed interval excludes zero above / below, else 0."""
    lo, hi = r.get("diff_ci95_low"), r.get("diff_ci95_high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return 0
    return 1 if lo > 0 else -1 if hi < 0 else 0


def cell(r: dict | None, baseline: bool) -> str:
    if r is None:
        return "-"
    if baseline:
        return f"{r['mean']:.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]"
    d = f"{r['diff']:+.3f}"
    return f"{r['mean']:.3f} ({'**' + d + '**' if sig(r) else d})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study")
    p.add_argument("--split", default="test", help="the split whose EPG the question reads")
    p.add_argument("--target", default="test", help="the split whose accuracy must rise")
    p.add_argument("--need", type=int, default=5, help="methods whose EPG must rise")
    args = p.parse_args()
    out = Path(args.study)
    rows = json.loads((out / "summary.json").read_text())
    study = json.loads((out / "study.json").read_text())
    base = study["baseline"]
    index = {(r["setting"], r["split"], r["method"], r["metric"]): r for r in rows}
    settings = [s["label"] for s in study["settings"]]
    splits = [s for s in dict.fromkeys(r["split"] for r in rows if r["split"] != "-") if s != "val"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["metric"] == EPG and r["split"] == args.split))
    head = ["setting", "seeds"] + [f"acc {s}" for s in splits] + [f"EPG {m}" for m in methods] + \
        ["EPG up / down", "answer", "grad ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for s in settings:
        is_base = s == base
        accs = {sp: index.get((s, sp, "-", "accuracy")) for sp in splits}
        epgs = [index.get((s, args.split, m, EPG)) for m in methods]
        n = max((r["n_seeds"] for r in [*accs.values(), *epgs] if r), default=0)
        up = sum(sig(r) > 0 for r in epgs if r)
        down = sum(sig(r) < 0 for r in epgs if r)
        target, acc = accs.get(args.target), accs.get(args.split)
        yes = (not is_base and up >= args.need and target is not None and sig(target) > 0
               and (acc is None or sig(acc) >= 0))
        ratio = index.get((s, "-", "-", "diag_grad_ratio"))
        line = [s, str(n)] + [cell(accs[sp], is_base) for sp in splits] + [cell(r, is_base) for r in epgs] + \
            ["-" if is_base else f"{up} / {down} of {len(methods)}", "-" if is_base else ("**yes**" if yes else "no"),
             f"{ratio['mean']:.2g}" if ratio and math.isfinite(ratio["mean"]) else "-"]
        print("| " + " | ".join(line) + " |")
    trade = json.loads((out / "trade_off.json").read_text()) if (out / "trade_off.json").exists() else []
    val = {r["setting"]: r for r in trade if r["split"] == "val"}
    groups: dict[str, list[str]] = {}
    for s in study["settings"]:
        if s.get("dose") is not None:
            groups.setdefault(s["group"], []).append(s["label"])
    if val and base in val:
        floor = val[base]["accuracy"] - 0.01
        print(f"\nval rule (baseline val accuracy {val[base]['accuracy']:.3f}, floor {floor:.3f}):")
        for group, labels in groups.items():
            ok = [lb for lb in labels if lb in val and val[lb]["accuracy"] >= floor]
            chosen = max(ok, key=lambda lb: val[lb]["mean_epg"]) if ok else None
            desc = ", ".join(f"{lb}: acc {val[lb]['accuracy']:.3f} EPG {val[lb]['mean_epg']:.3f}" for lb in labels
                             if lb in val)
            print(f"- {group}: {desc} -> chosen {chosen}")


if __name__ == "__main__":
    main()
