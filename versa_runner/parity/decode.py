"""Base and pruned decode throughput side by side (`versa-run summarize-decode A.json B.json`).

Reads two `decode_bench` JSONs (`artifacts/decode_bench/<name>.json`), pairs their results by
batch size, and writes a markdown table (tokens/s of each, pruned / base ratio) plus one plot.
Throughput is a sanity check, not a verdict (seeds/000 step 4); different engines, prompt lengths
or new-token counts make the ratio meaningless, so such a pair is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from versa_runner.errors import ConfigError, UsageError, VersaRunError
from versa_runner.fsutil import atomic_write_text

MUST_MATCH = ("engine", "prompt_len_tokens", "max_new_tokens")
PLOT_DPI = 110

__all__ = ["load_decode_json", "main", "summarize_decode"]


def load_decode_json(path: str | Path, *, param: str) -> dict[str, Any]:
    """One decode_bench JSON, checked for the fields the comparison needs."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{param} {path}: file not found", hint="Pass a decode_bench JSON.")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{param} {path}: not readable JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise ConfigError(f"{param} {path}: not a decode_bench JSON (needs a 'results' list)",
                          hint="Pass artifacts/decode_bench/<name>.json.")  # fmt: skip
    return doc


def _rows(base: dict[str, Any], pruned: dict[str, Any]) -> list[dict[str, Any]]:
    by_size = {int(r["batch_size"]): r for r in pruned["results"]}
    rows = []
    for r in base["results"]:
        size = int(r["batch_size"])
        if size not in by_size:
            continue
        b, p = float(r["tok_s_total"]), float(by_size[size]["tok_s_total"])
        rows.append({"batch_size": size, "base_tok_s": b, "pruned_tok_s": p,
                     "ratio": p / b if b > 0 else float("nan")})  # fmt: skip
    return rows


def summarize_decode(
    base_json: str | Path, pruned_json: str | Path, out_md: str | Path
) -> dict[str, Any]:
    """Write the side-by-side markdown (and its plot); returns rows, headline and paths."""
    base = load_decode_json(base_json, param="base")
    pruned = load_decode_json(pruned_json, param="pruned")
    differ = [f"{k}: base={base.get(k)!r} pruned={pruned.get(k)!r}" for k in MUST_MATCH
              if base.get(k) != pruned.get(k)]  # fmt: skip
    if differ:
        raise ConfigError("the two decode runs are not comparable: " + "; ".join(differ),
                          hint="Bench both models with the same engine, --prompt-len and "
                          "--max-new-tokens.")  # fmt: skip
    rows = _rows(base, pruned)
    if not rows:
        raise ConfigError("the two decode runs share no batch size",
                          hint="Bench both with the same --batch-sizes.")  # fmt: skip
    out = Path(out_md)
    plot = _plot(rows, base, pruned, out)
    lines = [
        f"# Decode throughput: {pruned.get('name')} vs {base.get('name')}",
        "",
        f"- base: `{base.get('model_path')}` ({base_json})",
        f"- pruned: `{pruned.get('model_path')}` ({pruned_json})",
        f"- engine {base.get('engine')}, prompt {base.get('prompt_len_tokens')} tokens, "
        f"{base.get('max_new_tokens')} new tokens, median of {base.get('repeats')} passes",
        "",
        "| batch size | base tok/s | pruned tok/s | pruned / base |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['batch_size']} | {r['base_tok_s']:.1f} | {r['pruned_tok_s']:.1f} | "
              f"{r['ratio']:.3f} |" for r in rows]  # fmt: skip
    lines += ["", "Throughput is a sanity check; the parity gate decides whether a prune is good."]
    if plot:
        lines += ["", f"![decode tokens/s]({plot.name})"]
    atomic_write_text(out, "\n".join(lines) + "\n")
    ratios = ", ".join(f"bs{r['batch_size']} {r['ratio']:.2f}x" for r in rows)
    return {"rows": rows, "out_md": str(out), "plots": [str(plot)] if plot else [],
            "headline": f"decode pruned/base: {ratios} ({out})"}  # fmt: skip


def _plot(
    rows: list[dict[str, Any]], base: dict[str, Any], pruned: dict[str, Any], out: Path
) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on hosts or CI
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = [r["batch_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.plot(sizes, [r["base_tok_s"] for r in rows], marker="o", label=f"base ({base.get('name')})")
    ax.plot(
        sizes, [r["pruned_tok_s"] for r in rows], marker="s", label=f"pruned ({pruned.get('name')})"
    )
    ax.set(
        xscale="log", xlabel="batch size", ylabel="generated tokens/s", title="decode throughput"
    )
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.legend()
    path = out.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`versa-run summarize-decode BASE.json PRUNED.json [--out-md F]`: 0 written, 2 refused."""
    parser = argparse.ArgumentParser(
        prog="versa-run summarize-decode",
        description="Base and pruned decode_bench results side by side: tok/s and ratio per batch size, one plot.",
        epilog="examples:\n  versa-run summarize-decode artifacts/decode_bench/base.json "
        "artifacts/decode_bench/pruned.json --out-md reports/decode_base_vs_pruned.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base_json", help="decode_bench JSON of the base model")
    parser.add_argument("pruned_json", help="decode_bench JSON of the pruned model")
    parser.add_argument(
        "--out-md", default="reports/decode_base_vs_pruned.md", help="markdown to write"
    )
    args = parser.parse_args(argv)
    try:
        result = summarize_decode(args.base_json, args.pruned_json, args.out_md)
    except VersaRunError as exc:
        sys.stderr.write(f"error: {exc}\n" + (f"hint: {exc.hint}\n" if exc.hint else ""))
        return int(exc.exit_code)
    sys.stdout.write("| batch size | base tok/s | pruned tok/s | pruned / base |\n")
    for r in result["rows"]:
        sys.stdout.write(
            f"| {r['batch_size']} | {r['base_tok_s']:.1f} | {r['pruned_tok_s']:.1f} | {r['ratio']:.3f} |\n"
        )
    sys.stdout.write(
        f"[+] Wrote {result['out_md']}"
        + (f" and {result['plots'][0]}" if result["plots"] else "")
        + "\n"
    )
    return 0
