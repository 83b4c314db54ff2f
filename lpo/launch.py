"""How a trainer runs: the processes the DAG starts it as, and each process's part of a global batch.

Every trainer rule starts `python -m lpo.launch --rule R --gpus G --processes N --threads T -- <lpo arguments>`:
one process per GPU when the rule's resources ask for G > 0 GPUs, else N CPU processes (gloo) with the GPUs
hidden, so that a job never uses a GPU the scheduler did not give it. Several processes run under torchrun; one
runs `python -m lpo` directly.

A trainer's config gives its *global* batch (pairs or tuples per optimizer step). Each process takes an equal share
of it and splits the share into micro-batches of `per_device_batch_size`, accumulating their gradients, so one
config makes the same optimizer steps, on the same samples, with the same learning rate on 1, 2, 4 or 8 processes.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass

PRECISIONS = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class Layout:
    """A global batch over processes and micro-batches."""
    global_batch: int
    processes: int
    per_device: int

    @property
    def share(self) -> int:
        """Samples of one optimizer step that one process computes."""
        return self.global_batch // self.processes

    @property
    def accumulation(self) -> int:
        """Micro-batches per process and optimizer step."""
        return self.share // self.per_device


def layout(global_batch: int, processes: int, per_device: int | None, batch_key: str, per_device_key: str) -> Layout:
    """The layout of `global_batch` (config `batch_key`) over `processes`, in micro-batches of `per_device`
    (config `per_device_key`; None: the whole share at once), or a ValueError naming the keys and the fix."""
    if global_batch % processes:
        raise ValueError(f"{batch_key} = {global_batch} does not split evenly over {processes} processes: use a "
                         f"multiple of {processes}, or run on a number of GPUs (resources) that divides it")
    share = global_batch // processes
    per_device = share if per_device is None else per_device
    if per_device < 1 or share % per_device:
        raise ValueError(f"{batch_key} = {global_batch} over {processes} process(es) is {share} per process, "
                         f"which {per_device_key} = {per_device} does not divide: use a divisor of {share} "
                         f"(or null for {share} at once)")
    return Layout(global_batch, processes, per_device)


# Each trainer's global batches and the per-device batch each is split into (None: a process's whole share),
# by config section.
BATCHES = {
    "base_model": [("batch_size", None)],
    "lrm": [("batch_size", "per_device_batch_size")],
    "lpo": [("sample_batch_size", None), ("train_batch_size", "per_device_batch_size")],
    "spo": [("sample_batch_size", None), ("train_batch_size", "per_device_batch_size")],
    "grpo": [("sample_batch_size", None), ("train_batch_size", "per_device_batch_size")],
    "diffusion_dpo": [("batch_size", "per_device_batch_size")],
}


def check_batches(config: dict, section: str, processes: int) -> None:
    """Lay out the batches of the trainer config `section` over `processes`, as the trainer will: the DAG calls
    this for every trainer rule, so a batch that does not split stops the run before any job."""
    for batch, per_device in BATCHES[section]:
        layout(config[section][batch], processes, per_device and config[section].get(per_device),
               f"{section}.{batch}", f"{section}.{per_device}")


def check_precision_name(precision: str, key: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"{key} = {precision!r}: use one of {', '.join(map(repr, PRECISIONS))}")


def check_precision(precision: str, device_type: str, bf16_supported: bool, key: str) -> None:
    """Stop before training when `precision` (config `key`) cannot run on the device."""
    check_precision_name(precision, key)
    if precision == "fp16" and device_type != "cuda":
        # accelerate silently trains in fp32 when asked for fp16 on the CPU.
        raise ValueError(f"{key} = 'fp16' needs a CUDA GPU and this job runs on the {device_type}: set {key} to "
                         f"'bf16' or 'no', or give the rule a GPU (resources)")
    if precision == "bf16" and not bf16_supported:
        raise ValueError(f"{key} = 'bf16' but this {device_type} device does not support bfloat16 (CUDA needs "
                         f"compute capability 8.0, Ampere, or newer): set {key} to 'fp16' or 'no'")


def process_state():
    """This process's place among the job's processes, on the GPU when one is visible (launch hides those a job was
    not given). Every caller asks the same way: the first call fixes the device for the process, and accelerate
    runs several CPU processes (gloo) only when asked for the CPU."""
    import torch
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(precision: str, key: str):
    """The trainer's Accelerator, on process_state's device, in `precision` (config `key`), checked first."""
    import torch
    from accelerate import Accelerator
    cuda = torch.cuda.is_available()
    check_precision(precision, "cuda" if cuda else "cpu", torch.cuda.is_bf16_supported() if cuda else True, key)
    return Accelerator(cpu=not cuda, mixed_precision=precision)


def micro_batches(rows, per_device: int):
    """The rows one process computes of one optimizer step, in micro-batches: (part, weight, last), where weight
    is the part's share of the rows, the factor its mean loss takes so that the accumulated gradient is the rows'
    mean, and `last` marks the micro-batch whose backward pass synchronises the gradients (`accumulating`)."""
    starts = range(0, len(rows), per_device)
    for i, start in enumerate(starts):
        part = rows[start:start + per_device]
        yield part, len(part) / len(rows), i == len(starts) - 1


def accumulating(accelerator, model, last: bool):
    """DDP synchronises gradients in every backward pass unless told not to: only the last micro-batch's does."""
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def enable_gradient_checkpointing(*modules) -> None:
    """Recompute activations in the backward pass (diffusers' UNets, transformers' text encoders)."""
    for module in modules:
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        else:
            module.activation_checkpointing_enable()


def command(gpus: int, processes: int, threads: int, args: list[str]) -> tuple[list[str], dict]:
    """The command line and environment that run `python -m lpo <args>` as the processes a job was given."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    n = gpus or processes
    lpo = ["-m", "lpo", "--threads", str(threads), *args]
    if n == 1:
        return [sys.executable, *lpo], env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *lpo], env


def _count(low: int):
    """argparse type: a whole number >= low (lpo.stage's types would import torch before the exec)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: give one >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a whole number >= {low}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lpo.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rule", required=True, help="the rule being run (named in messages)")
    parser.add_argument("--gpus", type=_count(0), required=True,
                        help="GPUs the job was given (resources.rules.<rule>.gpu): one process each")
    parser.add_argument("--processes", type=_count(1), default=1, help="CPU processes when --gpus is 0")
    parser.add_argument("--threads", type=_count(1), default=1, help="torch threads of each process")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments of `python -m lpo`")
    args = parser.parse_args(argv)
    lpo_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not lpo_args:
        parser.error("give the lpo command after --, e.g. -- sd reward-lrm --params ...")
    if args.gpus:
        import torch
        visible = torch.cuda.device_count()
        if visible < args.gpus:
            fix = f"lower it to {visible}" if visible else "set it to 0 to run on the CPU"
            print(f"lpo.launch: error: resources.rules.{args.rule}.gpu = {args.gpus} but {visible} GPU(s) are visible "
                  f"here (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): {fix}, or run the "
                  f"job where {args.gpus} GPUs are", file=sys.stderr)
            return 2
    line, env = command(args.gpus, args.processes, args.threads, lpo_args)
    sys.stdout.flush()
    os.execve(line[0], line, env)


if __name__ == "__main__":
    sys.exit(main())
