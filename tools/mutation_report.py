"""The markdown report of tools/mutate.py (its rows are also saved as JSON beside it)."""
from pathlib import Path


def write_report(path: Path, results, started: str, args, notes: dict) -> None:
    """Write the markdown report to ``path``: counts, the catch rate with and without the
    equivalent survivors, a row per mutant, and each survivor's why, note and diff.
    results: tools/mutate.py's rows; started: the run's start (UTC); args: its command
    line; notes: mutant id -> note shown with a survivor."""
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    applied = [r for r in results if r["outcome"] != "error"]
    caught = sum(r["outcome"] == "caught" for r in applied)
    equivalent = [r for r in applied if r["outcome"] == "survived" and r.get("equivalent")]
    rate = caught / len(applied) if applied else 0.0
    rate_eq = caught / (len(applied) - len(equivalent)) if len(applied) > len(equivalent) else 0.0
    lines = [
        "# Mutation report",
        "",
        f"Run started {started} (UTC) with `{' '.join(['python tools/mutate.py'] + args)}`; "
        f"{len(results)} mutants, "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".",
        "",
        f"**Caught: {caught} of {len(applied)} applied mutants ({100 * rate:.0f}%)**; "
        f"{len(equivalent)} survivors are listed as equivalent (no behaviour change), so "
        f"{caught} of {len(applied) - len(equivalent)} non-equivalent mutants "
        f"({100 * rate_eq:.0f}%). Timeouts count as not caught.",
        "",
        f"Test time, summed over the mutants: {sum(r['secs'] for r in results) / 60:.0f} min "
        f"(each row's seconds were measured in the run that produced it)."
        + (" With --update, rows not re-run come from the previous report's .json."
           if "--update" in args else ""),
        "",
        "| mutant | file | outcome | s | evidence |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        ev = r["evidence"].replace("|", "\\|")[:120]
        lines.append(f"| {r['id']} | {r['file']} | {r['outcome']} | {r['secs']:.0f} | {ev} |")
    survivors = [r for r in results if r["outcome"] == "survived"]
    if survivors:
        lines += ["", "## Survivors", ""]
        for r in survivors:
            lines += [f"### {r['id']}", "", r["why"], ""]
            if r.get("equivalent"):
                lines += [f"Equivalent: {r['equivalent']}", ""]
            if notes.get(r["id"]):
                lines += [f"Note: {notes[r['id']]}", ""]
            lines += ["```diff", r["diff"].rstrip(), "```", ""]
    path.write_text("\n".join(lines) + "\n")
