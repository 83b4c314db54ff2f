import json
import os
import re
import shlex

from lpo.launch import check_batches

WORLD = config["world"]["name"]
RESULTS = f"results/{WORLD}"
REPORTS = f"reports/{WORLD}"
LPO_ENV = "../envs/lpo.yaml"
# Rules run the CLI (`python -m lpo`) from this checkout, so per-rule conda envs need only the dependencies,
# not an install of lpo.
shell.prefix(f"export PYTHONPATH={shlex.quote(os.pathsep.join(IMPORT_ROOTS))}; ")
# The numbers a stage gives depend on how its work is split (a torch reduction by its thread count, a torchrun batch
# by its process count), so the split comes from the config (`compute`) and never from `--cores`, which only decides
# how many jobs run at once. A rule's `threads:` tells the scheduler what its job occupies (Snakemake lowers it to
# --cores); its command runs with the config's split whatever the scheduler grants.
THREADS = config["compute"]["threads"]
PROCESSES = config["compute"]["processes"]
EXCLUSIVE_THREADS = config["compute"]["exclusive_threads"]
LPO = f"python -m lpo --threads {THREADS}"
LPO_EXCLUSIVE = f"python -m lpo --threads {EXCLUSIVE_THREADS}"


def launch(rule_name, section=None, processes=1, threads=THREADS):
    """The command that starts a trainer's `python -m lpo` (lpo.launch): one process per GPU the rule's resources
    give it, else `processes` one-`threads` CPU processes (torchrun, gloo) sharing each batch; the world's tiny
    models use a second thread of one process poorly (a base-model step: 0.35 s on two threads, 0.26 s as two
    processes). The batches of the config `section` are laid out over those processes now, so that a batch that
    does not split stops the run before any job."""
    gpus = resources_of(rule_name)["gpu"]
    if section is not None:
        check_batches(config, section, gpus or processes)
    return f"python -m lpo.launch --rule {rule_name} --gpus {gpus} --processes {processes} --threads {threads} --"


def launched_threads(rule_name, processes=1, threads=THREADS):
    """The cores a trainer's job occupies: `threads` for each process `launch` starts."""
    return threads * (resources_of(rule_name)["gpu"] or processes)


def resources_of(rule_name):
    """What the rule's job asks of the scheduler (`snakemake --resources gpu=1`) or of a cluster
    (workflow/profiles/slurm): the config's `resources.default` under `resources.rules.<rule>`."""
    return {**config["resources"]["default"], **config["resources"]["rules"].get(rule_name, {})}


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
