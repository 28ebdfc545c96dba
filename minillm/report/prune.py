"""The prune report: summary, per-layer kept widths, score distributions, memory/params over the run.

Reads only the :class:`~minillm.api.PruneResult` (plan, scores, timeline, metadata), so it works for dry
runs and exports alike. ``report.html`` embeds its plots; the same PNGs land beside it as
``report.widths.png``, ``report.scores.png`` and ``report.timeline.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minillm.memory import human_bytes
from minillm.report import figures, html


def layer_rows(result: Any) -> list[dict[str, int]]:
    """Kept and original widths of every layer (original widths come from the scores' lengths)."""
    rows = []
    for layer in result.plan.layers:
        scores = result.score.scores.get(layer.index)
        before = (
            (len(scores.heads), len(scores.kv_heads), len(scores.channels)) if scores is not None else None
        )
        kept = (len(layer.heads), len(layer.kv_heads), len(layer.channels))
        heads_before, kv_before, channels_before = before or kept
        rows.append(
            {
                "layer": layer.index,
                "heads": kept[0],
                "heads_before": heads_before,
                "kv_heads": kept[1],
                "kv_heads_before": kv_before,
                "channels": kept[2],
                "channels_before": channels_before,
            }
        )
    return rows


def score_lists(result: Any) -> dict[int, dict[str, list[float]]]:
    return {
        i: {"heads": s.heads.tolist(), "kv_heads": s.kv_heads.tolist(), "channels": s.channels.tolist()}
        for i, s in result.score.scores.items()
    }


def _summary(result: Any) -> list[tuple[str, Any]]:
    plan, meta = result.plan, result.metadata
    recipe = meta.get("recipe", {})
    rows: list[tuple[str, Any]] = [
        ("model", recipe.get("model") or meta.get("base_model") or "in-memory model"),
        ("criterion", plan.extra.get("criterion", "-")),
        ("allocation / head mode", f"{plan.allocation} / {plan.head_mode}"),
        ("parameters", f"{plan.params_before:,} → {plan.params_after:,}"),
        (
            "ratio",
            f"target {plan.target_ratio:.2%}, achieved {plan.achieved_ratio:.2%}"
            + (" (dry run: plan only)" if result.out is None and not meta else ""),
        ),
        ("forward / backward passes", f"{result.score.forward_passes} / {result.score.backward_passes}"),
        ("scoring time", f"{result.scoring.seconds:.1f} s"),
        ("total time", f"{result.total_seconds:.1f} s"),
        (
            "peak memory (scoring)",
            f"RSS {human_bytes(result.scoring.peak_rss_bytes)}, "
            f"CUDA {human_bytes(result.scoring.cuda_peak_bytes)}",
        ),
    ]
    if result.out is not None:
        rows.append(("saved to", str(result.out)))
    return rows


def _collapsed(rows: list[dict[str, int]]) -> list[tuple[str, str, str, str]]:
    """Consecutive layers with equal widths share one table row (``4-29``)."""
    out: list[tuple[str, str, str, str]] = []
    keys = ("heads", "kv_heads", "channels")
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or any(
            rows[i][k] != rows[start][k] or rows[i][f"{k}_before"] != rows[start][f"{k}_before"] for k in keys
        ):
            first, last = rows[start]["layer"], rows[i - 1]["layer"]
            cells = [f"{rows[start][k]} / {rows[start][f'{k}_before']}" for k in keys]
            out.append((str(first) if first == last else f"{first}-{last}", *cells))
            start = i
    return out


def search_section(record: dict[str, Any]) -> str:
    """The ``--search`` candidate table (best first; unranked candidates have no loss)."""
    rows = [("-" if r["rank"] is None else r["rank"], r["layers"], f"{r['heads']}/{r['kv_heads']}",
             r["hidden"], r["mlp"], r["params"], f"{r['ratio']:.2%}", r["loss"], r["seconds"])
            for r in record["candidates"]]
    intro = (f"<p>{record['enumerated']} uniform architectures within ±{record['tolerance']:.0%} of the "
             f"target; {record['ranked']} ranked by mean loss on the {html.esc(record['held_out'])} after "
             f"compensation on {html.esc(record.get('fit', 'the first ' + str(record['fit_windows'])))} "
             f"(disjoint); search time "
             f"{record['seconds']:.0f} s. "
             f"Chosen: <code>{html.esc(record['best'])}</code>.</p>")
    return intro + html.table(["rank", "layers", "heads/kv", "hidden", "MLP", "parameters", "ratio removed",
                               "held-out loss", "seconds"], rows)


def write_prune_report(result: Any, path: str | Path) -> list[Path]:
    from minillm.report import require_matplotlib

    require_matplotlib()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    rows = layer_rows(result)
    pngs = {"widths": figures.widths_figure(rows)}
    scores = score_lists(result)
    if scores:
        pngs["scores"] = figures.scores_figure(scores)
    samples = result.timeline.to_dict()["samples"] if result.timeline is not None else []
    if len(samples) > 1:
        pngs["timeline"] = figures.timeline_figure(samples)
    sections = [
        ("Summary", html.table(None, _summary(result), css="kv")),
        (
            "Kept heads and channels per layer",
            html.figure(
                pngs["widths"], "Blue: kept; grey: removed. Bars show every decoder layer.", "per-layer chart"
            )
            + html.table(
                ["layers", "query heads kept/of", "kv heads kept/of", "MLP channels kept/of"],
                _collapsed(rows),
            ),
        ),
    ]
    if result.plan.extra.get("search"):
        sections.append(("Architecture search", search_section(result.plan.extra["search"])))
    if "scores" in pngs:
        sections.append(
            (
                "Score distributions",
                html.figure(
                    pngs["scores"],
                    "Per scored layer: box plot of MLP-channel scores, one dot per query head.",
                    "score distributions",
                ),
            )
        )
    if "timeline" in pngs:
        stage_rows = [
            (
                s["stage"],
                f"{s['seconds']:.1f} s",
                human_bytes(s["rss_bytes"]),
                "-" if s["params"] is None else f"{s['params']:,}",
            )
            for s in samples
            if s["params"] is not None
        ]
        sections.append(
            (
                "Memory and parameters over time",
                html.figure(
                    pngs["timeline"],
                    "Resident memory at every stage and scoring step; parameter count at each stage.",
                    "memory timeline",
                )
                + html.table(["stage", "at", "RSS", "parameters"], stage_rows),
            )
        )
    recipe = result.metadata.get("recipe")
    if recipe:
        import json

        sections.append(
            (
                "Recipe",
                "<p>Reproduce with <code>minillm prune --recipe &lt;export&gt;/minillm.json"
                "</code>.</p><pre>" + html.esc(json.dumps(recipe, indent=1)) + "</pre>",
            )
        )
    title = f"minillm prune: {result.plan.extra.get('criterion', '')} at {result.plan.target_ratio:.0%}"
    subtitle = f"{result.plan.params_before:,} → {result.plan.params_after:,} parameters"
    target.write_text(html.page(title, subtitle, sections))
    written = [target]
    for name, png in pngs.items():
        file = target.with_name(f"{target.stem}.{name}.png")
        file.write_bytes(png)
        written.append(file)
    return written
