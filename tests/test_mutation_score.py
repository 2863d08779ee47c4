"""The gate of ``make mutation``: a survivor passes only when tests/README.md explains it."""

import mutation_score
import pytest

KILLED = "fedprompt.privacy.ledger.x_spend__mutmut_{}"
METHOD = "fedprompt.data.partition.xǁSitePartitionǁfrom_report__mutmut_{}"


@pytest.fixture
def readme(tmp_path, monkeypatch):
    path = tmp_path / "README.md"
    path.write_text(
        "| mutant | why |\n|---|---|\n"
        f"| `{METHOD.format(3)}` | equal by construction |\n"
        "`fedprompt.privacy.ledger.x_spend__mutmut_99` in prose is not a listing\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(mutation_score, "README", path)
    return path


def _statuses(monkeypatch, statuses):
    monkeypatch.setattr(mutation_score, "mutmut_results", lambda: statuses)


def test_only_table_rows_list_a_mutant_as_equivalent(readme):
    assert mutation_score.listed_equivalents(readme) == {METHOD.format(3)}


def test_a_listed_survivor_passes_and_modules_are_scored_apart(readme, monkeypatch, capsys):
    statuses = {KILLED.format(i): "killed" for i in range(10)}
    statuses |= {METHOD.format(i): "killed" for i in range(9)} | {METHOD.format(9): "timeout"}
    statuses[METHOD.format(3)] = "survived"
    _statuses(monkeypatch, statuses)
    assert mutation_score.main() == 0
    table = capsys.readouterr().out
    assert "fedprompt.privacy.ledger" in table and "fedprompt.data.partition" in table
    assert "90.0%" in table and "100.0%" in table


def test_an_unlisted_survivor_fails_the_gate_and_is_named(readme, monkeypatch, capsys):
    statuses = {KILLED.format(i): "killed" for i in range(20)}
    statuses[KILLED.format(99)] = "survived"
    _statuses(monkeypatch, statuses)
    assert mutation_score.main() == 1
    assert (
        f"not listed in tests/README.md: {KILLED.format(99)}: survived" in capsys.readouterr().out
    )


def test_a_module_below_the_goal_fails_even_when_every_survivor_is_listed(readme, monkeypatch):
    statuses = {METHOD.format(i): "killed" for i in range(5)} | {METHOD.format(3): "survived"}
    _statuses(monkeypatch, statuses)
    assert mutation_score.main() == 1


def test_no_results_is_an_error_not_a_score(monkeypatch):
    _statuses(monkeypatch, {})
    assert mutation_score.main() == 1
