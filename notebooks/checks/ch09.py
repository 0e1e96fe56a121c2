"""Checks for chapter 9's exercises (comparison): the Wilson interval against minipeft.stats.wilson, the
separation rule and a decision rule against the chapter's own, on several inputs each."""

from __future__ import annotations

from minipeft.stats import wilson


def _separated(p_a: float, p_b: float, n: int):
    (a_lo, a_hi), (b_lo, b_hi) = wilson(p_a, n), wilson(p_b, n)
    return "above" if a_lo > b_hi else "below" if a_hi < b_lo else None


def _pick(rows: list[dict], n: int) -> str:
    trained = [r for r in rows if r["trainable"]]
    best = max(trained, key=lambda r: r["metric"])
    keep = [r for r in trained if _separated(r["metric"], best["metric"], n) != "below"]
    return min(keep, key=lambda r: r["file_bytes"])["method"]


def check_wilson_interval(fn) -> None:
    """Exercise 1: fn(p, n) -> (low, high)."""
    if fn(0.5, 96) is None:
        print("Exercise 1: not done yet — fill in wilson_interval.")
        return
    for p, n in [(0.5, 96), (0.0, 96), (1.0, 24), (0.125, 96), (0.9, 200), (0.3, 10)]:
        got, want = fn(p, n), wilson(p, n)
        if not (isinstance(got, tuple) and len(got) == 2):
            print(f"Exercise 1: return a pair (low, high); got {got!r}.")
            return
        if abs(got[0] - want[0]) > 1e-4 or abs(got[1] - want[1]) > 1e-4:
            hint = ("at p = 0 or 1 the interval must still have width: that is the z²/4n² term" if p in (0.0, 1.0)
                    else "centre (p + z²/2n) / (1 + z²/n), half-width z·√(p(1−p)/n + z²/4n²) / (1 + z²/n)")
            print(f"Exercise 1: at p={p}, n={n} the interval is ({want[0]:.4f}, {want[1]:.4f}), you gave "
                  f"({got[0]:.4f}, {got[1]:.4f}); {hint}.")
            return
    lo, hi = fn(0.5, 96)
    print(f"Exercise 1: correct — at n = 96 the widest interval (p = 0.5) is ±{(hi - lo) / 2:.3f}.")


def check_separation(fn) -> None:
    """Exercise 2: fn(p_a, p_b, n) -> 'above' | 'below' | None."""
    if fn(0.9, 0.1, 96) is None and fn(0.1, 0.9, 96) is None:
        print("Exercise 2: not done yet — fill in separated.")
        return
    cases = [(0.9, 0.1, 96), (0.1, 0.9, 96), (0.5, 0.45, 96), (0.6, 0.4, 96), (0.6, 0.4, 400), (0.75, 0.5, 96),
             (0.5, 0.5, 24), (0.0, 0.25, 96), (0.3, 0.0, 24)]  # fmt: skip
    for p_a, p_b, n in cases:
        got, want = fn(p_a, p_b, n), _separated(p_a, p_b, n)
        if got != want:
            lo_a, hi_a = wilson(p_a, n)
            lo_b, hi_b = wilson(p_b, n)
            print(f"Exercise 2: for {p_a} vs {p_b} on n={n} the intervals are [{lo_a:.3f}, {hi_a:.3f}] and "
                  f"[{lo_b:.3f}, {hi_b:.3f}], so the answer is {want!r}, not {got!r}: compare a's low end with b's "
                  f"high end (and the other way round), not the two means.")
            return
    print("Exercise 2: correct — a difference of 0.2 is shown at n = 400 but not at n = 96 when both sit near 0.5.")


def check_pick_method(fn, rows: list[dict] | None = None, n: int | None = None) -> None:
    """Exercise 3: fn(rows, n) -> method name; checked on made-up tables and, when given, the chapter's rows."""
    def row(method, trainable, file_bytes, metric):
        return {"method": method, "trainable": trainable, "file_bytes": file_bytes, "metric": metric}

    made_up = [
        ([row("zero-shot", 0, 0, 0.0), row("full", 100, 5000, 0.4), row("lora", 6, 300, 0.7),
          row("prompt", 1, 13, 0.65), row("prefix", 2, 50, 0.3)], 96),  # prompt ties with lora, is smallest
        ([row("zero-shot", 0, 0, 0.9), row("full", 100, 5000, 0.95), row("lora", 6, 300, 0.5),
          row("prompt", 1, 13, 0.2)], 96),  # the untrained row does not count; full is alone at the top
        ([row("full", 100, 5000, 0.6), row("lora", 6, 300, 0.55), row("prompt", 1, 13, 0.3)], 24),  # small n
    ]
    if fn(made_up[0][0], 96) is None:
        print("Exercise 3: not done yet — fill in pick_method.")
        return
    tables = made_up + ([(rows, n)] if rows is not None and n is not None else [])
    for table, size in tables:
        got, want = fn(table, size), _pick(table, size)
        if got != want:
            names = ", ".join(f"{r['method']} {r['metric']:.2f} ({r['file_bytes']} B)" for r in table)
            print(f"Exercise 3: on the table [{names}] with n={size} the rule picks {want!r}, you picked {got!r}. "
                  "Skip rows that train nothing, keep every method NOT separated below the best, then take the "
                  "smallest file.")
            return
    tail = f" On this run it picks {_pick(rows, n)!r}." if rows is not None and n is not None else ""
    print(f"Exercise 3: correct — the rule agrees on {len(tables)} tables.{tail}")
