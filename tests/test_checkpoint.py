"""The checkpoint every trainer shares: atomic writes, the run's fingerprint, weights-only loading, a damaged one moved
aside, and writing on the main process only."""
import logging
import math

import numpy as np
import pytest
import torch

import lpo.checkpoint
from lpo.checkpoint import Checkpoint, fingerprint


class FakeAccelerator:
    def __init__(self, is_main_process: bool):
        self.is_main_process, self.waits = is_main_process, 0

    def wait_for_everyone(self):
        self.waits += 1


def test_the_checkpoint_sits_beside_the_output(tmp_path):
    checkpoint = Checkpoint(tmp_path / "model", "f", "steps")
    checkpoint.save({"x": torch.ones(2)}, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]
    assert [p.name for p in (tmp_path / "model.ckpt").iterdir()] == ["state.pt"]


def test_a_round_trip_loads_weights_optimizer_rng_and_curves(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "curve": [[1, 0.5]], "best": None, "best_accuracy": -math.inf, "bf16": torch.ones(2, dtype=torch.bfloat16)}
    Checkpoint(tmp_path / "out", "f", "steps").save(state, 7)

    reader = Checkpoint(tmp_path / "out", "f", "steps")
    position, loaded = reader.load()
    assert position == 7 and reader.saved_at == 7
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
    assert torch.equal(loaded["torch_rng"], state["torch_rng"]) and torch.equal(loaded["bf16"], state["bf16"])
    assert loaded["curve"] == [[1, 0.5]] and loaded["best"] is None and loaded["best_accuracy"] == -math.inf
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_loading_takes_tensors_only(tmp_path, caplog):
    Checkpoint(tmp_path / "out", "f", "steps").save({"anything": FakeAccelerator(True)}, 1)
    with caplog.at_level(logging.WARNING, logger="lpo.checkpoint"):
        assert Checkpoint(tmp_path / "out", "f", "steps").load() is None  # refused, never unpickled
    assert "UnpicklingError" in caplog.text and "weights_only" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ckpt.corrupt-1"]


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "not a checkpoint"])
def test_a_damaged_checkpoint_is_moved_aside_with_a_warning_and_training_starts_afresh(tmp_path, caplog, damage):
    for n in (1, 2):  # each damaged one is kept beside the output, under its own name
        Checkpoint(tmp_path / "out", "f", "steps").save({"x": torch.ones(100)}, 3)
        state = tmp_path / "out.ckpt" / "state.pt"
        if damage == "truncated":
            state.write_bytes(state.read_bytes()[:300])
        elif damage == "random bytes":
            state.write_bytes(np.random.default_rng(n).bytes(state.stat().st_size))
        else:
            torch.save({"x": torch.ones(1)}, state)
        checkpoint = Checkpoint(tmp_path / "out", "f", "steps")
        with caplog.at_level(logging.WARNING, logger="lpo.checkpoint"):
            assert checkpoint.load() is None
        assert checkpoint.saved_at is None
        assert f"cannot read the training checkpoint at '{state}'" in caplog.text
        assert "restarts from scratch" in caplog.text
        assert f"moved to {tmp_path / f'out.ckpt.corrupt-{n}'}" in caplog.text
        assert "weights_only" not in caplog.text
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"out.ckpt.corrupt-{i}" for i in range(1, n + 1)]
        assert checkpoint.load() is None  # the rerun finds none
        caplog.clear()


def test_only_the_main_process_moves_a_damaged_checkpoint_aside(tmp_path):
    Checkpoint(tmp_path / "out", "f", "steps").save({"x": torch.ones(1)}, 3)
    (tmp_path / "out.ckpt" / "state.pt").write_bytes(b"damaged")
    assert Checkpoint(tmp_path / "out", "f", "steps", FakeAccelerator(False)).load() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ckpt"]
    assert Checkpoint(tmp_path / "out", "f", "steps", FakeAccelerator(True)).load() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ckpt.corrupt-1"]


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    checkpoint = Checkpoint(tmp_path / "out", "f", "rounds")
    assert checkpoint.load() is None
    assert checkpoint.describe() == "no checkpoint was written yet"


def test_a_checkpoint_of_other_settings_is_ignored_with_a_warning(tmp_path, caplog):
    Checkpoint(tmp_path / "out", "old run", "steps").save({"x": torch.ones(1)}, 4)
    checkpoint = Checkpoint(tmp_path / "out", "new run", "steps")
    with caplog.at_level(logging.WARNING, logger="lpo.checkpoint"):
        assert checkpoint.load() is None
    assert f"ignoring checkpoint {tmp_path / 'out.ckpt'}: it was written for other settings" in caplog.text
    assert checkpoint.saved_at is None


def test_a_write_killed_halfway_leaves_the_previous_checkpoint_and_no_debris(tmp_path, monkeypatch):
    checkpoint = Checkpoint(tmp_path / "out", "f", "steps")
    checkpoint.save({"x": torch.zeros(1)}, 1)
    real_save = torch.save

    def dies_halfway(obj, path):
        real_save(obj, path)
        with open(path, "r+b") as f:
            f.truncate(10)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(lpo.checkpoint.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"x": torch.ones(1)}, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ckpt"]
    position, state = Checkpoint(tmp_path / "out", "f", "steps").load()
    assert position == 1 and torch.equal(state["x"], torch.zeros(1))


def test_a_first_write_killed_halfway_leaves_nothing(tmp_path, monkeypatch):
    def dies(obj, path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(lpo.checkpoint.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        Checkpoint(tmp_path / "out", "f", "steps").save({"x": torch.ones(1)}, 1)
    assert list(tmp_path.iterdir()) == []


def test_only_the_main_process_writes_and_every_process_waits(tmp_path):
    other, main = FakeAccelerator(False), FakeAccelerator(True)
    on_other = Checkpoint(tmp_path / "out", "f", "rounds", other)
    on_other.save({"x": torch.ones(1)}, 2)
    assert list(tmp_path.iterdir()) == [] and other.waits == 1
    assert "after 2 rounds" in on_other.describe()  # it names the checkpoint the main process wrote

    Checkpoint(tmp_path / "out", "f", "rounds", main).save({"x": torch.ones(1)}, 2)
    assert (tmp_path / "out.ckpt" / "state.pt").exists() and main.waits == 1


def test_describe_names_the_last_checkpoint_and_remove_deletes_it(tmp_path):
    checkpoint = Checkpoint(tmp_path / "out", "f", "rounds")
    checkpoint.save({}, 5)
    assert checkpoint.describe() == (f"the last checkpoint is {tmp_path / 'out.ckpt'} (after 5 rounds), from which "
                                     f"a rerun resumes")
    checkpoint.remove()
    assert list(tmp_path.iterdir()) == []
    checkpoint.remove()  # nothing left to remove is fine


def test_the_fingerprint_changes_with_settings_seed_and_data():
    weights = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    run = [{"lr": 1e-3, "steps": [1, 2]}, 0, weights, np.asarray(["a", "b"]), "digest", b"config"]
    base = fingerprint(*run)
    assert base == fingerprint({"steps": [1, 2], "lr": 1e-3}, 0, weights.clone(), *run[3:])
    changes = {0: {"lr": 2e-3, "steps": [1, 2]}, 1: 1, 2: weights + 1, 3: np.asarray(["a", "c"]), 4: "other",
               5: b"other"}
    others = {fingerprint(*[changes[i] if i == changed else part for i, part in enumerate(run)])
              for changed in changes}
    assert len(others) == len(changes) and base not in others


def test_the_fingerprint_reads_bfloat16_and_non_contiguous_tensors():
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert fingerprint({}, 0, weights.t()) == fingerprint({}, 0, weights.t().contiguous())
    assert fingerprint({}, 0, weights.bfloat16()) != fingerprint({}, 0, weights.bfloat16() + 1)
