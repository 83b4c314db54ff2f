"""The training loop the pixel reward model and the SPM share: seeded pair batches, AdamW with linear warm-up,
validation and best-weights selection, and checkpoints (lpo.checkpoint) from which a killed run resumes with the
weights of an uninterrupted one."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from diffusers.optimization import get_linear_schedule_with_warmup
from torch import nn
from tqdm import tqdm

from lpo.checkpoint import Checkpoint, check_finite_loss, fingerprint
from lpo.preference_data import PreferencePairs

LOSS_EVERY = 50


class PairBatches:
    """Endless batches of indices from successive seeded permutations of range(n). `rng` and `order` (what is left
    of the current permutation) are its whole state, so that a checkpoint can hold it."""

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator):
        if n < 1:  # would never fill a batch
            raise ValueError("no training pairs")
        self.n, self.batch_size, self.rng = n, batch_size, rng
        self.order = np.zeros(0, dtype=np.int64)

    def __next__(self) -> np.ndarray:
        while len(self.order) < self.batch_size:
            self.order = np.concatenate([self.order, self.rng.permutation(self.n)])
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return batch


RNG = torch.Generator | np.random.Generator


def fit(model: nn.Module, batch_loss: Callable[[np.ndarray], torch.Tensor], validate: Callable[[], dict],
        n_pairs: int, config, seed: int, desc: str, checkpoint: Checkpoint | None = None,
        generators: tuple[RNG, ...] = ()) -> dict:
    """The reward-model training loop shared by the pixel model and the SPM.

    `batch_loss(rows)` is the loss of training pairs `rows`; `validate()` returns metrics with an "accuracy".
    The model is validated before training and every `config.validate_every` steps and at the end; it ends with
    the weights of its best validation accuracy (the earliest on a tie). With a `checkpoint`, the training state is
    saved every `config.checkpoint_every` steps, with the state of `generators` (those batch_loss draws from), and
    a run finding one resumes from it.
    """
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, min(config.warmup_steps, config.steps), config.steps)
    batches = PairBatches(n_pairs, config.batch_size, np.random.default_rng([seed, 0]))
    rngs = (batches.rng, *generators)

    def evaluate(step):
        model.eval()
        with torch.no_grad():
            metrics = {"step": step, **validate()}
        model.train()
        return metrics

    saved = None if checkpoint is None else checkpoint.load()
    if saved is None:
        resumed_from, curve, losses, loss_curve = 0, [evaluate(0)], [], []
        best, best_state = curve[0], copy.deepcopy(model.state_dict())
    else:
        resumed_from, state = saved
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        for rng, rng_state in zip(rngs, state["rngs"], strict=True):
            _set_rng_state(rng, rng_state)
        batches.order = state["order"].numpy()
        curve, losses, loss_curve, best, best_state = (state[k] for k in ("curve", "losses", "loss_curve", "best",
                                                                          "best_state"))
    for step in tqdm(range(resumed_from + 1, config.steps + 1), desc=desc, mininterval=2.0, initial=resumed_from,
                     total=config.steps):
        loss = batch_loss(next(batches))
        value = loss.item()
        check_finite_loss(value, f"{desc} (step {step} of {config.steps})", checkpoint, losses[-1] if losses else None,
                          {"this model's learning_rate": config.learning_rate})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(value)
        if step % LOSS_EVERY == 0 or step == config.steps:
            loss_curve.append([step, float(np.mean(losses[-LOSS_EVERY:]))])
        if step % config.validate_every == 0 or step == config.steps:
            curve.append(evaluate(step))
            if curve[-1]["accuracy"] > best["accuracy"]:
                best, best_state = curve[-1], copy.deepcopy(model.state_dict())
        if checkpoint is not None and step % config.checkpoint_every == 0 and step < config.steps:
            # Only the losses a later loss-curve point averages are kept.
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "torch_rng": torch.get_rng_state(),
                             "rngs": [_rng_state(rng) for rng in rngs], "order": torch.tensor(batches.order),
                             "curve": curve, "losses": losses[-LOSS_EVERY:], "loss_curve": loss_curve,
                             "best": best, "best_state": best_state}, step)
    model.load_state_dict(best_state)
    model.eval()
    return {"steps": config.steps, "resumed_from_step": resumed_from, "train_pairs": n_pairs,
            "best_step": best["step"], "best_validation_accuracy": best["accuracy"], "best_validation": best,
            "validation_curve": curve, "loss_curve": loss_curve,
            "final_loss": loss_curve[-1][1] if loss_curve else math.nan, "train_seconds": time.perf_counter() - start}


def _rng_state(rng: RNG):
    return rng.get_state() if isinstance(rng, torch.Generator) else rng.bit_generator.state


def _set_rng_state(rng: RNG, state) -> None:
    if isinstance(rng, torch.Generator):
        rng.set_state(state)
    else:
        rng.bit_generator.state = state


def training_checkpoint(out: str | os.PathLike | None, config, seed: int, train: PreferencePairs,
                        validation: PreferencePairs, *inputs) -> Checkpoint | None:
    """`<out>.ckpt/` of a run of `config` with `seed` on these pairs from `inputs` (starting weights and whatever
    else shapes the run, as `fingerprint` takes them); None, no checkpointing, without `out`."""
    if out is None:
        return None
    settings = {**dataclasses.asdict(config), "checkpoint_every": None}  # how often to save changes no weight
    return Checkpoint(out, fingerprint(settings, seed, train.digest(), validation.digest(), *inputs), "steps")


def weight_parts(*modules: nn.Module) -> list[torch.Tensor]:
    """The modules' weights, as `fingerprint` takes them."""
    return [tensor for module in modules for tensor in module.state_dict().values()]


def decided_pairs(pairs: PreferencePairs, what: str) -> int:
    """Number of pairs with a winner; validation needs at least one."""
    n = int(np.sum(pairs.label_0 != 0.5))
    if n == 0:
        raise ValueError(f"{what} ({pairs.split}) has no decided pair (all {len(pairs)} are ties): pair accuracy "
                         f"is undefined")
    return n
