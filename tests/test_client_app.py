import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)

from fedprompt.config import compose_config
from fedprompt.federation import client_app
from fedprompt.federation.run_config import default_run_config
from fedprompt.site_rounds import backbone_for, build_learner, splits_and_plan

SHARED = Path(__file__).parents[1] / "../shared/data"


def _message(content: RecordDict, message_type: str) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="instruction",
        src_node_id=0,
        dst_node_id=11,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


@pytest.fixture
def context():
    run_config = default_run_config("quickstart") | {"overrides": "train.local_epochs=1"}
    node_config = {"partition-id": 1, "num-partitions": 3}
    return Context(
        run_id=1, node_id=11, node_config=node_config, state=RecordDict(), run_config=run_config
    )


@pytest.fixture
def global_state(context):
    cfg = compose_config("quickstart", ["train.local_epochs=1"])
    splits, _ = splits_and_plan(cfg)
    return build_learner(cfg, backbone_for(cfg), list(splits.classnames)).trainable_state()


def test_train_reply_carries_only_the_prompt_and_scalar_metrics(context, global_state):
    content = RecordDict(
        {"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1})}
    )
    reply = client_app.app(_message(content, MessageType.TRAIN), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.array_records) == {"arrays"}
    returned = reply.content["arrays"].to_torch_state_dict()
    assert set(returned) == set(global_state)
    for key, tensor in returned.items():
        assert tensor.shape == global_state[key].shape
    assert not all(np.array_equal(returned[k], global_state[k]) for k in returned)
    metrics = dict(reply.content["metrics"])
    assert metrics["site-index"] == 1 and metrics["num-examples"] > 0
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert set(reply.content.config_records) == set()


def test_evaluate_reply_scores_the_site_test_split(context, global_state):
    content = RecordDict(
        {"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1})}
    )
    reply = client_app.app(_message(content, MessageType.EVALUATE), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert not reply.content.array_records
    metrics = dict(reply.content["metrics"])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num-examples"] > 0


def test_wrong_number_of_nodes_is_reported(context, global_state):
    context.node_config["num-partitions"] = 2
    content = RecordDict(
        {"arrays": ArrayRecord(global_state), "config": ConfigRecord({"server-round": 1})}
    )
    with pytest.raises(ValueError, match="num-supernodes=3"):
        client_app.app(_message(content, MessageType.EVALUATE), context)
