"""Secure aggregation through Flower's SecAgg+: the sum is FedAvg's, and no site's tensors reach
the server's code.

Runs go through ``run_federation`` with every site's ClientApp (Flower's ``secaggplus_mod``
included) answering in this process, so the server-side code sees exactly what the sites send.
"""

import json

import numpy as np
import pytest
import torch
import yaml
from flwr.app import MessageType
from flwr.common import bytes_to_ndarray
from sites_on_disk import corrupt_one_image, write_site

from fedprompt.cli import main
from fedprompt.config import ConfigError, compose_config
from fedprompt.config_schema import check_config
from fedprompt.federation.client_app import app as client_app
from fedprompt.federation.inprocess_grid import InProcessGrid
from fedprompt.federation.orchestration import run_federation, secagg_settings
from fedprompt.federation.run_config import default_run_config
from fedprompt.federation.run_monitor import RunFailed

SITES = 3


def _run(tmp_path, name, *extra, nodes=None, names=(), apps=None):
    overrides = [
        "federation.rounds=1",
        f"federation.num_sites={SITES}",
        "train.local_epochs=1",
        f"output_dir={tmp_path / name}",
        *extra,
    ]
    cfg = compose_config("quickstart", overrides)
    nodes = nodes or [{"partition-id": i, "num-partitions": SITES} for i in range(SITES)]
    run_config = default_run_config("quickstart") | {"overrides": " ".join(overrides)}
    grid = InProcessGrid(nodes, run_config, names=names, apps=apps)
    summary = run_federation(grid, cfg)
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(tmp_path / name / "global_state.pt")
    return grid, summary, lines, state, cfg


def _payloads(reply):
    """Every tensor and every bytes value a reply carries, as raw bytes."""
    found = [
        array.data for record in reply.content.array_records.values() for array in record.values()
    ]
    for record in reply.content.config_records.values():
        for value in record.values():
            found += [
                v for v in (value if isinstance(value, list) else [value]) if isinstance(v, bytes)
            ]
    return found


def _site_updates(grid):
    """Each site's own trained tensors, from the replies of a run without secure aggregation."""
    updates = []
    for reply in grid.replies:
        if reply.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            updates += [array.numpy() for array in reply.content["arrays"].values()]
    return updates


@pytest.fixture(scope="module")
def plain_and_secure(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("secagg")
    plain = _run(tmp_path, "plain")
    secure = _run(tmp_path, "secure", "federation.secure_aggregation=true")
    return plain, secure


def test_secure_aggregation_equals_fedavg_within_the_quantisation_error(plain_and_secure):
    (_, _, plain_lines, plain_state, _), (_, summary, lines, state, cfg) = plain_and_secure
    settings = secagg_settings(cfg)
    # Each site rounds its scaled tensors to one quantization step; the sum of SITES such errors
    # is divided by the summed weights (each at most 1: count / max_weight).
    counts = lines[0]["aggregated"]
    weights = sum(n / settings.max_weight for n in counts.values())
    step = 2 * settings.clipping_range / settings.quantization_range
    tolerance = SITES * step / weights + 1e-6
    for key in plain_state:
        difference = (state[key] - plain_state[key]).abs().max().item()
        assert 0 < difference <= tolerance, (key, difference, tolerance)
    assert summary["secure_aggregation"] is True
    # The record names the same senders and counts as plain FedAvg's.
    assert counts == plain_lines[0]["aggregated"] and len(counts) == SITES
    assert lines[0]["num_trained"] == SITES and lines[0]["missing"] == {}
    # The protocol's four exchanges cost more bytes than one upload of each prompt.
    assert lines[0]["bytes_up"] > plain_lines[0]["bytes_up"]


def test_no_reply_the_server_receives_holds_a_single_sites_tensors(plain_and_secure):
    (plain_grid, *_), (secure_grid, *_) = plain_and_secure
    updates = _site_updates(plain_grid)
    assert len(updates) == SITES
    # The check can fail: without SecAgg+ every site's tensors are in the replies.
    plain_payloads = [
        p for reply in plain_grid.replies if not reply.has_error() for p in _payloads(reply)
    ]
    assert all(any(u.tobytes() in p for p in plain_payloads) for u in updates)

    received = [reply for reply in secure_grid.replies if not reply.has_error()]
    assert len(received) == 4 * SITES + SITES  # four SecAgg+ stages, then evaluation
    payloads = [p for reply in received for p in _payloads(reply)]
    for update in updates:
        for dtype in (np.float32, np.float64):
            assert not any(update.astype(dtype).tobytes() in p for p in payloads)
    # The masked vectors decode to uniform-looking integers, nowhere near any site's prompt.
    masked = []
    for reply in received:
        for record in reply.content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes) and item.startswith(b"\x93NUMPY"):
                        masked.append(bytes_to_ndarray(item).astype(np.float64).ravel())
    assert masked
    for vector in masked:
        for update in updates:
            flat = update.astype(np.float64).ravel()
            if vector.size >= flat.size:
                assert not np.allclose(vector[: flat.size], flat, atol=1e-2)
    # No train reply carries tensors at all: Flower's mod clears them after masking.
    assert all(
        not array_record
        for reply in received
        if reply.metadata.message_type == MessageType.TRAIN
        for array_record in reply.content.array_records.values()
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=fedmedian"], "strategy=fedmedian needs each site's update"),
        (["strategy=trimmed_mean"], "strategy=trimmed_mean needs each site's update"),
        (["privacy=site_level"], "privacy=site_level clips each site's update"),
        (["federation.num_sites=1"], "federation.num_sites=1: SecAgg\\+ sums at least two"),
        (
            ["federation.mode=deployment", "federation.min_sites=1"],
            "federation.min_sites=1: SecAgg\\+ sums",
        ),
        (["federation.secagg.reconstruction_threshold=1.5"], "not usable by Flower's SecAgg"),
        (["federation.secagg.clipping_range=0"], "federation.secagg.clipping_range=0 is not"),
    ],
)
def test_settings_secure_aggregation_cannot_honour_are_refused(overrides, message):
    cfg = compose_config("quickstart", ["federation.secure_aggregation=true", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
        secagg_settings(cfg)


def test_max_weight_defaults_to_the_largest_site_in_simulation():
    cfg = compose_config(
        "quickstart", ["federation.secure_aggregation=true", "federation.num_sites=3"]
    )
    assert secagg_settings(cfg).max_weight == 40  # the quickstart's 120 training images, 3 sites
    cfg = compose_config(
        "quickstart", ["federation.secure_aggregation=true", "federation.secagg.max_weight=64"]
    )
    assert secagg_settings(cfg).max_weight == 64
    assert secagg_settings(compose_config("quickstart", [])) is None


def test_sites_refuse_prompts_outside_the_clipping_range_and_nothing_is_aggregated(tmp_path):
    with pytest.raises(RunFailed, match="Round 1 aggregated no site's update"):
        _run(
            tmp_path,
            "clipped",
            "federation.secure_aggregation=true",
            "federation.secagg.clipping_range=0.001",
        )
    (line,) = [json.loads(x) for x in (tmp_path / "clipped/metrics.jsonl").read_text().splitlines()]
    assert line["aggregated"] == {} and line["num_trained"] == 0
    assert sorted(line["missing"]) == ["site-0", "site-1", "site-2"]
    assert all("clipping range" in reason for reason in line["missing"].values())


def test_a_site_that_cannot_train_drops_out_and_the_others_are_summed(tmp_path):
    names = ["hospital-a", "hospital-b", "hospital-c", "hospital-y"]
    configs = [write_site(tmp_path / "sites", name, seed=i) for i, name in enumerate(names)]
    corrupt_one_image(configs[3])
    _, _, lines, _, _ = _run(
        tmp_path,
        "deployed",
        "federation.mode=deployment",
        "federation.num_sites=4",
        "federation.min_sites=2",
        "federation.secure_aggregation=true",
        nodes=[{"site-config": str(config)} for config in configs],
        names=names,
    )
    (line,) = lines
    assert line["aggregated"] == {"hospital-a": 12, "hospital-b": 12, "hospital-c": 12}
    assert list(line["missing"]) == ["hospital-y"]
    assert "CorruptImageError" in line["missing"]["hospital-y"]


@pytest.mark.slow
def test_secure_aggregation_composes_with_dp_sgd(tmp_path):
    _, summary, lines, _, _ = _run(
        tmp_path,
        "dp",
        "federation.secure_aggregation=true",
        "privacy=dpsgd",
        "privacy.epsilon=8",
    )
    (line,) = lines
    assert len(line["aggregated"]) == SITES
    # Each site's own accountant still reports what it spent; the noise is in its masked vector.
    assert all(site["dp_epsilon"] > 0 for site in line["sites"].values())
    assert set(summary["privacy"]) == {"site-0", "site-1", "site-2"}


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_train_request(tmp_path):
    names = ["hospital-a", "hospital-b", "hospital-c"]
    configs = [write_site(tmp_path / "sites", name, seed=i) for i, name in enumerate(names)]
    strict = yaml.safe_load(configs[0].read_text())
    configs[0].write_text(yaml.safe_dump(strict | {"require_secure_aggregation": True}))
    nodes = [{"site-config": str(config)} for config in configs]
    deployed = ["federation.mode=deployment", "federation.min_sites=2"]

    grid, _, lines, _, _ = _run(tmp_path, "plain", *deployed, nodes=nodes, names=names)
    (line,) = lines
    assert sorted(line["aggregated"]) == ["hospital-b", "hospital-c"]
    assert "only under secure aggregation" in line["missing"]["hospital-a"]
    sent = [r for r in grid.replies if r.metadata.src_node_id == 101 and not r.has_error()]
    assert all(r.metadata.message_type == MessageType.EVALUATE for r in sent)

    _, _, lines, _, _ = _run(
        tmp_path,
        "secure",
        *deployed,
        "federation.secure_aggregation=true",
        nodes=nodes,
        names=names,
    )
    assert sorted(lines[0]["aggregated"]) == names


@pytest.mark.parametrize("stage", ["setup", "share_keys"])
def test_a_site_that_drops_out_before_sharing_its_keys_does_not_halt_the_sum(tmp_path, stage):
    """Flower 1.41's workflow halts the round here; a hospital offline at the round's start must
    not stop the others' secure sum."""

    def drops_out(message, context):
        configs = message.content.config_records.get("secaggplus_configs", {})
        if configs.get("stage") == stage:
            raise ConnectionError("the hospital went offline")
        return client_app(message, context)

    overrides = ["federation.num_sites=4", "federation.secure_aggregation=true"]
    nodes = [{"partition-id": i, "num-partitions": 4} for i in range(4)]
    _, summary, lines, _, _ = _run(tmp_path, stage, *overrides, nodes=nodes, apps={3: drops_out})
    (line,) = lines
    assert sorted(line["aggregated"]) == ["site-0", "site-1", "site-2"]
    assert list(line["missing"]) == ["site-3"] and "went offline" in line["missing"]["site-3"]
    assert summary["status"] == "completed"


def test_secagg_parameters_flower_refuses_stop_the_cli_before_flower_starts(tmp_path, capsys):
    out = tmp_path / "run"
    command = ["simulate", "quickstart", "federation.secure_aggregation=true", f"output_dir={out}"]
    assert main([*command, "federation.secagg.num_shares=2"]) == 2
    assert "not usable by Flower's SecAgg+" in capsys.readouterr().err and not out.exists()
