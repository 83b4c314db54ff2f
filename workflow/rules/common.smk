import json
import os
import re
import shlex

WORLD = config["world"]["name"]
RESULTS = f"results/{WORLD}"
REPORTS = f"reports/{WORLD}"
LPO_ENV = "../envs/lpo.yaml"
# Rules run the CLI (`python -m lpo`) from this checkout, so per-rule conda envs need only the dependencies,
# not an install of lpo.
shell.prefix(f"export PYTHONPATH={shlex.quote(os.pathsep.join(IMPORT_ROOTS))}; ")
# Most stages take half the cores, so two run side by side: the VAE, judge, reward models, optimisation runs and
# ablations are small-batch jobs that use a second thread poorly (the VAE's step: 0.17 s on one thread, 0.14 s on
# two). The base model, the preference data and the base samples (the world's critical path) keep every core; so
# does the step-cost timing, so that nothing runs beside it while it measures.
SHARED_CORES = max(1, workflow.cores // 2)


def lpo_processes(threads, batch_size=None):
    """`python -m lpo` as several CPU processes that share the work (torchrun, gloo), one thread each: the world's
    tiny models use a second thread of one process poorly (a base-model step: 0.35 s on two threads, 0.26 s as two
    processes). At most 4 processes, more were never measured (this machine has 2 cores); training needs a
    `batch_size` they split evenly."""
    processes = max(p for p in range(1, min(threads, 4) + 1) if batch_size is None or batch_size % p == 0)
    if processes == 1:
        return f"python -m lpo --threads {threads}"
    return (f"python -m torch.distributed.run --standalone --nproc_per_node {processes} -m lpo "
            f"--threads {threads // processes}")


def one_of(names):
    """A wildcard constraint matching exactly these names (nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def params_json(*sections):
    """The config sections a stage reads, plus the seed, as one shell-quoted JSON argument for `--params`."""
    return shlex.quote(json.dumps({"seed": config["seed"], **{s: config[s] for s in sections}}, sort_keys=True))


def log_of(rule_name):
    return f"{RESULTS}/logs/{rule_name}.log"


def benchmark_of(rule_name):
    return f"{RESULTS}/benchmarks/{rule_name}.tsv"


# The reward stage's LRM ablations (reward.smk).
MAIN_STRATEGY = config["mpcf"]["strategy"]
MAIN_SCALE = config["lrm"]["model"]["guidance_scale"]
# One LRM per ablation setting; the main LRM is both the default strategy and the default VFE scale.
LRM_ABLATIONS = [f"mpcf{s}" for s in config["reward_study"]["mpcf_strategies"] if s != MAIN_STRATEGY] + [
    f"vfe{g:g}" for g in config["reward_study"]["vfe_scales"] if g != MAIN_SCALE]


def ablation_flags(wildcards):
    kind, value = re.fullmatch(r"(mpcf|vfe)(.+)", wildcards.variant).groups()
    return f"--mpcf-strategy {value}" if kind == "mpcf" else f"--guidance-scale {value}"
