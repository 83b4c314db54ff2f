"""Atomic outputs come out with the modes open() and mkdir() give under the umask, whatever wrote them."""
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from lpo.checkpoint import Checkpoint
from lpo.io import atomic_path

# umask: (file, directory, executable file)
MODES = {0o022: (0o644, 0o755, 0o755), 0o027: (0o640, 0o750, 0o750)}


@pytest.fixture(params=sorted(MODES), ids=lambda umask: f"umask{umask:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_a_file_written_private_gets_the_umasks_mode(tmp_path, umask):
    with atomic_path(tmp_path / "weights.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, tmp)  # safetensors writes 0o600
    assert mode(tmp_path / "weights.safetensors") == MODES[umask][0]


def test_a_directory_and_everything_in_it_get_the_umasks_modes(tmp_path, umask):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"")
    outside.chmod(0o600)
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "config.json").chmod(0o604)
    with atomic_path(tmp_path / "out") as tmp:
        shutil.copytree(source, tmp)  # copies keep their sources' modes
        (tmp / "unet").mkdir(mode=0o700)
        save_file({"w": torch.zeros(2)}, tmp / "unet" / "weights.safetensors")
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
        (tmp / "link").symlink_to(outside)
    out = tmp_path / "out"
    file, folder, executable = MODES[umask]
    assert mode(out) == mode(out / "unet") == folder
    assert mode(out / "config.json") == mode(out / "unet" / "weights.safetensors") == file
    assert mode(out / "run.sh") == executable
    assert mode(outside) == 0o600, "a link's target lies outside the output"


def test_a_checkpoint_gets_the_umasks_modes(tmp_path, umask):
    checkpoint = Checkpoint(tmp_path / "model", "f", "steps")
    checkpoint.save({"x": torch.ones(2)}, 1)
    assert mode(checkpoint.dir) == MODES[umask][1] and mode(checkpoint.dir / "state.pt") == MODES[umask][0]
