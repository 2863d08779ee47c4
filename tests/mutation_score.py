"""Mutation score per module, after ``mutmut run`` (``make mutation``).

Reads ``mutmut results --all true``, groups the mutants by the module they mutate, and prints
killed / survived per module. A survivor is acceptable only when ``tests/README.md`` lists it as
equivalent, with its reason, in a table row that starts with the mutant's name in backquotes. The
exit status is 1 when a survivor is not listed, or when a module kills fewer than 90% of its
mutants, so ``make mutation`` fails until each new survivor is killed by a test or explained.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

GOAL = 0.90
README = Path(__file__).with_name("README.md")
# mutmut names a mutant <module>.x_<function>__mutmut_<n>
# or <module>.xǁ<Class>ǁ<method>__mutmut_<n>.
MODULE = re.compile(r"^(?P<module>[\w.]+?)\.x[_ǁ]")
LISTED = re.compile(r"^\|\s*`(?P<name>[^`]+__mutmut_\d+)`\s*\|")
DETECTED = {"killed", "timeout", "segfault"}


def mutmut_results() -> dict[str, str]:
    """Every mutant's name and status, as mutmut reports them."""
    output = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    statuses = {}
    for line in output.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" in name:
            statuses[name] = status.strip()
    return statuses


def listed_equivalents(readme: Path | None = None) -> set[str]:
    """The mutants ``tests/README.md`` (or ``readme``) lists as equivalent."""
    readme = readme or README
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    return {m["name"] for line in text.splitlines() if (m := LISTED.match(line.strip()))}


def main() -> int:
    statuses = mutmut_results()
    if not statuses:
        print("mutation_score: mutmut reports no mutants; run `mutmut run` first.", file=sys.stderr)
        return 1
    equivalent = listed_equivalents()
    per_module: dict[str, Counter[str]] = defaultdict(Counter)
    unexplained = []
    for name, status in sorted(statuses.items()):
        match = MODULE.match(name)
        module = match["module"] if match else name
        counts = per_module[module]
        counts["mutants"] += 1
        if status in DETECTED:
            counts["killed"] += 1
        elif name in equivalent:
            counts["equivalent"] += 1
        else:
            counts["unexplained"] += 1
            unexplained.append(f"{name}: {status}")
    below_goal = []
    print(f"{'module':48} {'mutants':>7} {'killed':>7} {'equiv.':>7} {'other':>7} {'score':>7}")
    for module, counts in sorted(per_module.items()):
        score = counts["killed"] / counts["mutants"]
        print(
            f"{module:48} {counts['mutants']:7} {counts['killed']:7} {counts['equivalent']:7} "
            f"{counts['unexplained']:7} {score:7.1%}"
        )
        if score < GOAL:
            below_goal.append(module)
    total = sum(c["mutants"] for c in per_module.values())
    killed = sum(c["killed"] for c in per_module.values())
    print(f"{'all':48} {total:7} {killed:7} {'':7} {len(unexplained):7} {killed / total:7.1%}")
    unchecked = [line for line in unexplained if line.endswith(": not checked")]
    if unchecked:
        print(f"{len(unchecked)} mutants not checked yet: let `mutmut run` finish.")
    for line in unexplained:
        if line not in unchecked:
            print(f"not killed and not listed in tests/README.md: {line}")
    if below_goal:
        print(f"below the {GOAL:.0%} goal: {', '.join(below_goal)}")
    return 1 if unexplained or below_goal else 0


if __name__ == "__main__":
    sys.exit(main())
