"""A site's local tensors on its disk: one file per round, the newest no later than asked."""

import pytest
import torch

from fedprompt.data.image_set import DataError
from fedprompt.personalization.local_store import LocalStore


def test_the_newest_round_no_later_than_asked_is_read_back(tmp_path):
    store = LocalStore(tmp_path / "run")
    assert store.rounds() == [] and store.latest(5) is None  # nothing saved yet
    for server_round in (1, 2, 4):
        store.save(server_round, {"personal.ctx": torch.full((2, 3), float(server_round))})
    assert store.rounds() == [1, 2, 4]
    found_round, tensors = store.latest(3)  # a run resumed from its round-3 checkpoint
    assert found_round == 2 and torch.equal(tensors["personal.ctx"], torch.full((2, 3), 2.0))
    assert store.latest(4)[0] == 4 and store.latest(0) is None


def test_a_round_saved_again_is_replaced_and_no_temporary_file_stays(tmp_path):
    store = LocalStore(tmp_path)
    store.save(1, {"ctx": torch.zeros(2)})
    store.save(1, {"ctx": torch.ones(2)})
    assert torch.equal(store.latest(1)[1]["ctx"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-1.safetensors"]


def test_other_files_in_the_folder_are_not_rounds(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".round-3.safetensors.tmp").write_bytes(b"half")  # a crash mid-write
    store.save(2, {"ctx": torch.ones(1)})
    assert store.rounds() == [2] and store.latest(9)[0] == 2


def test_a_damaged_round_file_is_refused_in_one_sentence_naming_it(tmp_path):
    store = LocalStore(tmp_path)
    store.save(1, {"ctx": torch.ones(2)})
    store.save(2, {"ctx": torch.ones(2)})
    damaged = tmp_path / "round-2.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:20])  # cut short, or tampered with
    with pytest.raises(DataError, match=r"round 2, .*round-2\.safetensors, cannot be read"):
        store.latest(2)
    assert store.latest(1)[0] == 1  # the earlier round is still read
    damaged.unlink()  # what the sentence offers
    assert store.latest(2)[0] == 1
