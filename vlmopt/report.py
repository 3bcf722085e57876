"""The calibration report of ``vlmopt optimize``: report.json (everything), report.md, and a
self-contained report.html (plots embedded as PNG data URIs) rendered with jinja2."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import jinja2

_TEMPLATE = Path(__file__).resolve().parent / "templates" / "report.html.j2"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (flops, fidelity) points no other point beats on both (lower FLOPs, higher
    fidelity), sorted by FLOPs."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plots(r: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"ratio_{r['scope']}"
    out = {}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    pts = []
    n_all, n_search = r["n_calib"], r.get("n_search", r["n_calib"])
    where = f", first {n_search} samples" if n_search < n_all else ""
    for src in sorted({t["source"] for t in r["trials"]}):
        ts = [t for t in r["trials"] if t["source"] == src and t["metrics"]]
        xs = [t[key] for t in ts]
        ys = [t["metrics"]["fidelity"] for t in ts]
        pts += list(zip(xs, ys))
        ax.scatter(xs, ys, s=18, alpha=.6, label=f"trials ({src}{where})")
    front = pareto(pts)
    ax.plot([p[0] for p in front], [p[1] for p in front], "k-", lw=1, label="Pareto front")
    if r.get("finalists"):
        ax.scatter([f[key] for f in r["finalists"]], [f["all"]["fidelity"] for f in r["finalists"]],
                   marker="D", s=22, facecolors="none", edgecolors="k",
                   label=f"finalists (all {n_all} samples)")
    first = True
    for m in r["methods"]:
        if m.get("unreachable") or m["method"] == "original":
            continue
        ax.scatter([m[key]], [m["calib"]["fidelity"]], marker="*", s=120,
                   label=f"methods at the target (all {n_all} samples)" if first else None)
        first = False
        ax.annotate(m["method"], (m[key], m["calib"]["fidelity"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.axvline(r["target"], color="r", ls="--", lw=1, label="target")
    ax.set_xlabel(f"{r['scope']} prefill FLOPs ratio")
    ax.set_ylabel("calibration fidelity")
    ax.legend(fontsize=7, loc="lower right")
    out["pareto"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.2))
    counts = r["chosen"]["counts"]
    frozen = set(_frozen(r))
    colors = ["#d98c2b" if f"layer_{i}" in frozen else "#3572b0" for i in range(len(counts))]
    ax.bar(range(len(counts)), counts, color=colors)
    ax.axhline(r["n_visual"], color="gray", ls=":", lw=1)
    ax.set_xlabel("decoder layer (orange: visual tokens frozen, ShortV)")
    ax.set_ylabel("visual tokens")
    out["schedule"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(range(len(r["layer_contribution"])), r["layer_contribution"], color="#6a9f58")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("Layer Contribution (KL)")
    out["lc"] = _png(fig)
    plt.close(fig)
    return out


def _frozen(r: dict) -> list[str]:
    for name, fields in r["chosen"]["steps"]:
        if name == "freeze_visual":
            return list(fields["layers"])
    return []


def layer_rows(r: dict) -> list[dict]:
    f0, f1 = r["original_flops"]["per_node"], r["flops"]["per_node"]
    frozen = set(_frozen(r))
    w0 = r["original_flops"].get("weight_bytes_per_node", {})
    w1 = r["flops"].get("weight_bytes_per_node", {})
    comp = r.get("compression", {})
    rows = []
    for i, c in enumerate(r["chosen"]["counts"]):
        name = f"layer_{i}"
        cm = comp.get(name, {})
        qk = "dense" if not cm.get("q_rank") else f"{cm['q_rank']}/{cm['k_rank']}"
        bits = "/".join(str(b) for b in cm.get("bits", [])) or "fp32"
        rows.append({"name": name, "visual": c, "frozen": name in frozen,
                     "lc": r["layer_contribution"][i], "f0": f0[name] / 1e9, "f1": f1[name] / 1e9,
                     "qk": qk, "bits": bits, "w0": w0.get(name, 0) / 1e3,
                     "w1": w1.get(name, 0) / 1e3})
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def flops_basis(r: dict) -> str:
    """Where every FLOPs ratio of the report was counted, in the words ``vlmopt flops`` uses."""
    sizes = (r.get("plan", {}).get("target") or {}).get("image_sizes") or []
    over = (f", summed over the {sum(n for *_, n in sizes)} calibration images ({len(sizes)} "
            f"sizes)" if sizes else "")
    return (f"FLOPs are analytic prefill FLOPs at {r['n_text']} text tokens (the calibration "
            f"prompts' mean){over}: LLM = all but the vision tower and projector (a method's "
            f"scorer counts), total = all of it. `vlmopt flops {r['model']} --plan plan.json` "
            f"recounts there.")


def trials_line(r: dict) -> str:
    """How many trials the study holds, by outcome and by worker (a shared study's workers all
    rank the whole study)."""
    n = r.get("trial_counts") or {}
    text = (f"The study holds {n.get('evaluated', 0)} evaluated trials and "
            f"{n.get('rejected_over_target', 0)} rejected by the cost model before evaluation")
    if n.get("interrupted"):
        text += f"; {n['interrupted']} were interrupted by a kill and run again"
    workers = n.get("workers") or {}
    if len(workers) > 1:
        text += "; workers: " + ", ".join(f"{w} ran {k}" for w, k in sorted(workers.items()))
    return text + "."


def reranking(r: dict) -> list[str]:
    """The finalists table (markdown lines), when the search screened on fewer samples."""
    if not r.get("finalists"):
        return []
    lines = [f"Trials were measured on the first {r['n_search']} calibration samples; the "
             f"{len(r['finalists'])} best were re-ranked on all {r['n_calib']}, and the plan "
             "shipped is the lowest-KL one within one answer of the best fidelity there.", "",
             f"| finalist | LLM FLOPs | fidelity (first {r['n_search']}) | KL | fidelity "
             f"(all {r['n_calib']}) | KL |", "| --- | --- | --- | --- | --- | --- |"]
    for f in r["finalists"]:
        mark = " (chosen)" if f["steps"] == r["chosen"]["steps"] else ""
        lines.append(f"| {plan_label(f['steps'])}{mark} | {f['ratio_llm']:.3f} | "
                     f"{f['search']['fidelity']:.4f} | {f['search']['kl']:.4f} | "
                     f"{f['all']['fidelity']:.4f} | {f['all']['kl']:.4f} |")
    return lines + [""]


def plan_label(steps) -> str:
    """A short human reading of a plan's steps."""
    parts = []
    for name, f in steps:
        if name == "select_visual":
            how = {"received": " (received attention)"}.get(f.get("score"), "")
            parts.append(f"{f['method']} {f['keep']}{how}"
                         + (" incl. CLS" if f.get("cls") == "official" else ""))
        elif name == "drop_tokens":
            parts.append("drops at " + ",".join(k.split("_")[1] for k in f["keep"]))
        elif name == "freeze_visual":
            parts.append("ShortV " + ",".join(k.split("_")[1] for k in f["layers"]))
        else:
            parts.append(name)
    return " + ".join(parts) or "original"


def markdown(r: dict) -> str:
    lines = [f"# vlmopt report: {r['model']}", "",
             f"Target {r['target']} x the original's {r['scope']} prefill FLOPs; strategy "
             f"{r['strategy']}; calibration {r['calib']} ({r['n_calib']}); held-out "
             f"{r['eval']} ({r['n_eval']}).", "",
             f"Chosen plan: LLM FLOPs ratio {r['chosen']['ratio_llm']:.3f}, total "
             f"{r['chosen']['ratio_total']:.3f}, measured prefill latency ratio "
             f"{latency_line(r)}.", "", flops_basis(r), "", trials_line(r), "", *reranking(r),
             "| method | LLM FLOPs | total FLOPs | calib fidelity | held-out accuracy |",
             "| --- | --- | --- | --- | --- |"]
    for m in r["methods"]:
        if m.get("unreachable"):
            lines.append(f"| {m['method']} | cannot reach the target | | | |")
            continue
        acc = _fmt(m.get("eval", {}).get("accuracy")) if m.get("eval") else "-"
        lines.append(f"| {m['method']} | {m['ratio_llm']:.3f} | {m['ratio_total']:.3f} | "
                     f"{m['calib']['fidelity']:.3f} | {acc} |")
    lines += ["", "| layer | visual tokens | frozen | LC | Q/K rank | weight bits | weight kB "
              "(original -> optimized) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in layer_rows(r):
        lines.append(f"| {row['name']} | {row['visual']} | {'yes' if row['frozen'] else ''} | "
                     f"{row['lc']:.5f} | {row['qk']} | {row['bits']} | {row['w0']:.1f} -> "
                     f"{row['w1']:.1f} |")
    lines += kept_lines(r)
    if r.get("stage_seconds"):
        lines += ["", "Seconds per step (to the report): " + "; ".join(
            f"{k} {v:.1f}" for k, v in r["stage_seconds"].items())]
    return "\n".join(lines) + "\n"


def latency_line(r: dict) -> str:
    """The measured prefill latency ratios: PyTorch, and ONNX Runtime when there is an
    artifact."""
    text = f"{r['latency_ratio']:.3f} (PyTorch)"
    if r.get("latency_ratio_ort") is not None:
        text += f", {r['latency_ratio_ort']:.3f} (ONNX Runtime, the artifact)"
    return text


def kept_lines(r: dict) -> list[str]:
    """report.md's list of the kept-token drawings in OUT/kept/."""
    plans = (r.get("kept") or {}).get("plans") or {}
    if not plans:
        return []
    lines = ["", "Visual tokens kept at each stage (kept/):", ""]
    for p in plans.values():
        lines.append(f"- {p['title']}: " + ", ".join(f"kept/{f}" for f in p["files"]))
    return lines


def kept_images(r: dict, out: Path) -> list[dict]:
    """Per drawn calibration image: its prompt and each plan's PNG (base64) from OUT/kept/."""
    kept = r.get("kept") or {}
    plans = kept.get("plans") or {}
    rows = []
    for i, im in enumerate(kept.get("images", [])):
        rows.append({"prompt": im["prompt"], "image": Path(im["image"]).name,
                     "plans": [{"title": p["title"], "file": p["files"][i],
                                "png": base64.b64encode((out / "kept" / p["files"][i])
                                                        .read_bytes()).decode()}
                               for p in plans.values()]})
    return rows


def write(r: dict, out: Path) -> None:
    out = Path(out)
    (out / "report.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(r))
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    methods = {m["method"]: m for m in r["methods"]}
    ours = next(m for m in r["methods"] if m["method"].startswith("vlmopt"))
    html = env.from_string(_TEMPLATE.read_text()).render(
        r=r, plots=plots(r), layers=layer_rows(r), ours=ours, orig=methods["original"],
        fmt=_fmt, plan_json=json.dumps(r["plan"], indent=2), label=plan_label,
        flops_basis=flops_basis(r),
        trials_line=trials_line(r), kept=kept_images(r, out))
    (out / "report.html").write_text(html)
