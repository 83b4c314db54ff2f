"""A kill in the middle of training, for the trainers' resume tests: the process dies (KeyboardInterrupt, which no
trainer catches) on a chosen call of a function the training loop calls once per step."""
import contextlib
from unittest import mock

import pytest


@contextlib.contextmanager
def killed_at_call(module, name: str, call: int):
    """`module.name` raises KeyboardInterrupt on its `call`-th call; the block must end in that kill."""
    calls = {"n": 0}
    real = getattr(module, name)

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)
    with mock.patch.object(module, name, dying), pytest.raises(KeyboardInterrupt):
        yield
