"""Each round's record: exactly the sites whose updates entered the aggregate, with their example
counts, and every site that was rejected, left out or missing, including sites that never
connected and nodes whose registered name is ambiguous."""

import json

import pytest
from sites_on_disk import write_site

from fedprompt.config import compose_config
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation
from fedprompt.federation.run_config import default_run_config


def _deployed(tmp_path, names, *extra, registered=None, without_test=()):
    overrides = [
        "federation.mode=deployment",
        f"federation.num_sites={len(names)}",
        "federation.rounds=2",
        "train.local_epochs=1",
        f"output_dir={tmp_path / 'run'}",
        *extra,
    ]
    configs = [
        write_site(tmp_path / f"site-{i}", name, seed=i, test=0 if name in without_test else 2)
        for i, name in enumerate(names)
    ]
    grid = InProcessGrid(
        [{"site-config": str(config)} for config in configs],
        default_run_config("quickstart") | {"overrides": " ".join(overrides)},
        names=registered or names,
    )
    run_federation(grid, compose_config("quickstart", overrides))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return grid, [json.loads(line) for line in lines]


def test_a_second_key_under_a_taken_name_never_enters_the_aggregate(tmp_path):
    # A rogue SuperNode whose key was registered as hospital-a too (node 104).
    names = ["hospital-a", "hospital-b", "hospital-c", "rogue"]
    registered = ["hospital-a", "hospital-b", "hospital-c", "hospital-a"]
    grid, lines = _deployed(
        tmp_path,
        names,
        "federation.min_sites=2",
        "federation.connect_timeout=0",
        registered=registered,
    )
    for line in lines:
        assert line["aggregated"] == {"hospital-b": 12, "hospital-c": 12}
        assert line["num_trained"] == 2
        assert sorted(line["rejected"]) == ["hospital-a#101", "hospital-a#104"]
        assert "held by 2 keys" in line["rejected"]["hospital-a#104"]
    # Neither twin was even asked to train: nothing of theirs was aggregated unrecorded.
    asked = {r.metadata.src_node_id for r in grid.replies if r.metadata.message_type == "train"}
    assert asked == {102, 103}


def test_a_registered_site_that_never_connected_is_missing_from_round_one(tmp_path):
    _, lines = _deployed(
        tmp_path,
        ["hospital-a", "hospital-b"],
        "federation.sites=[hospital-a,hospital-b,hospital-d]",
    )
    for line in lines:
        assert line["missing"] == {"hospital-d": "not connected when the round started"}
        assert sorted(line["aggregated"]) == ["hospital-a", "hospital-b"]


def test_a_site_without_test_images_trains_and_is_recorded_as_having_none(tmp_path):
    names = ["hospital-a", "hospital-b", "hospital-c"]
    _, lines = _deployed(tmp_path, names, without_test=["hospital-b"])
    for line in lines:
        assert line["aggregated"] == {name: 12 for name in names}
        assert line["rejected"] == {} and line["missing"] == {}
        assert line["no_test_images"] == ["hospital-b"]
        untested = line["sites"]["hospital-b"]
        assert untested["num_test"] == 0 and untested["accuracy"] is None
        assert untested["num_train"] == 12 and untested["errors"] == []
        tested = [line["sites"][name] for name in ("hospital-a", "hospital-c")]
        weighted = sum(s["accuracy"] * s["num_test"] for s in tested) / sum(
            s["num_test"] for s in tested
        )
        assert line["federated_accuracy"] == pytest.approx(weighted)
