"""The benchmark report's figures, one PNG each. A function returns None when its data is missing."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

from bench.costmodel import PAPER_BASES  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_axes(ax, **labels) -> None:
    ax.set(yscale="log", **labels)
    ax.set_xscale("log", base=2)
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _color(i: int) -> str:
    return f"C{i % 10}"


def tpot(result: dict, path: Path) -> Path | None:
    """TPOT against context, one panel per batch size, a line per pool size, the floor dashed."""
    rows = result.get("decode") or []
    batches = sorted({r["batch"] for r in rows})
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for i, pool in enumerate(sorted({r["pool"] for r in rows})):
            pts = sorted((r["context"], r["tpot_s"] * 1e3, r["floor_s"] * 1e3) for r in rows
                         if r["pool"] == pool and r["batch"] == b)
            if pts:
                n, t, f = zip(*pts)
                ax.plot(n, t, "o-", color=_color(i), label=f"pool {pool}")
                ax.plot(n, f, "--", color=_color(i), alpha=0.6, label=f"floor, pool {pool}")
        _log_axes(ax, xlabel="context (tokens)", ylabel="TPOT (ms)", title=f"decode, batch {b}")
    return _save(fig, path)


def ttft(result: dict, path: Path) -> Path | None:
    """TTFT against context per pool size, the floor dashed, transformers in black."""
    rows = result.get("prefill") or []
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, pool in enumerate(sorted({r["pool"] for r in rows})):
        n, t, f = zip(*sorted((r["context"], r["ttft_s"] * 1e3, r["floor_s"] * 1e3) for r in rows if r["pool"] == pool))
        ax.plot(n, t, "o-", color=_color(i), label=f"pool {pool}")
        ax.plot(n, f, "--", color=_color(i), alpha=0.6, label=f"floor, pool {pool}")
    hf = (result.get("hf") or {}).get("prefill") or []
    if hf:
        n, t = zip(*sorted((r["context"], r["ttft_s"] * 1e3) for r in hf))
        ax.plot(n, t, "s-", color="black", label="transformers")
    _log_axes(ax, xlabel="context (tokens)", ylabel="TTFT (ms)", title="prefill, one prompt")
    return _save(fig, path)


def breakdown_parts(r: dict) -> dict[str, float]:
    """Seconds of one decode step by part. Phases are means over steps while TPOT is their median,
    so `rest` (host work, sampling, the MLP and everything unnamed) is clipped at 0."""
    ph = r.get("phases") or {}
    comm = r.get("comm_sync_s") or 0.0
    parts = {"attention": ph.get("attention", 0.0), "waiting for members": max(ph.get("pool_wait", 0.0) - comm, 0.0),
             "comm + sync": comm, "merge": ph.get("merge", 0.0)}
    parts["rest"] = max(r["tpot_s"] - sum(parts.values()), 0.0)
    return parts


def breakdown(result: dict, path: Path) -> Path | None:
    """Stacked decode-step parts per pool size at the largest context, batch 8 (or the largest)."""
    rows = result.get("decode") or []
    if not rows:
        return None
    n = max(r["context"] for r in rows)
    at_n = {r["batch"] for r in rows if r["context"] == n}
    b = 8 if 8 in at_n else max(at_n)
    sel = sorted((r for r in rows if r["context"] == n and r["batch"] == b), key=lambda r: r["pool"])
    fig, ax = plt.subplots(figsize=(1.6 * len(sel) + 3, 4))
    bottom = [0.0] * len(sel)
    labels = [f"pool {r['pool']}" for r in sel]
    for i, name in enumerate(breakdown_parts(sel[0])):
        vals = [breakdown_parts(r)[name] * 1e3 for r in sel]
        ax.bar(labels, vals, bottom=bottom, color=_color(i), label=name)
        bottom = [x + v for x, v in zip(bottom, vals)]
    ax.set(ylabel="ms per decode step", title=f"decode step at {n} tokens x batch {b}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def projection(rows: list[dict], paper_ms: dict[int, tuple[float, float]], path: Path) -> Path | None:
    """Projected TPOT of the paper's arrangement per pool size, the paper's numbers as markers."""
    rows = [r for r in rows if r["bases"] == PAPER_BASES and r["context"] in paper_ms]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, pool in enumerate(sorted({r["pool"] for r in rows})):
        n, t = zip(*sorted((r["context"], r["tpot_s"] * 1e3) for r in rows if r["pool"] == pool))
        ax.plot(n, t, "o--", color=_color(i), label=f"projection, 8 bases + {pool}")
    n = sorted(paper_ms)
    ax.plot(n, [paper_ms[k][0] for k in n], "kx", label="paper, TP=8 PP=2")
    ax.plot(n, [paper_ms[k][1] for k in n], "k^", label="paper, 8 base + 24 pool")
    _log_axes(ax, xlabel="context (tokens)", ylabel="TPOT (ms), batch 1024",
              title="projection (not measured) vs the paper")
    return _save(fig, path)
