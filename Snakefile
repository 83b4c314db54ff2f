# The paper's pipeline as one DAG. `snakemake --cores all` builds the embedded Shapes world;
# `--configfile config/<world>.yaml` swaps the world. Every rule calls the `lpo` CLI.
import os
import sys

from snakemake.utils import min_version

# This checkout's import roots: lpo/ at the top, the kernels' package lpo_kernels in kernels/ (a top-level
# `kernels` would shadow the distribution transformers imports). Rules export the same as PYTHONPATH (common.smk);
# tests/test_import_names.py checks that nothing on these roots shadows an installed distribution.
IMPORT_ROOTS = [workflow.basedir, os.path.join(workflow.basedir, "kernels")]
sys.path[:0] = IMPORT_ROOTS
from lpo.checks import check_config, check_sd_world
from lpo.config import DEFAULT_CONFIG, read_config

min_version("8.0")

# Snakemake reads config files as YAML 1.1, where `1e-5` is a string, and names neither file nor line of a YAML
# error in them: the config is the same files read again by lpo's loader, merged in Snakemake's order (--config last).
CONFIG_FILES = [
    *([] if workflow.config_settings.replace_workflow_config else [str(DEFAULT_CONFIG)]),
    *map(str, workflow.config_settings.configfiles),
]


configfile: str(DEFAULT_CONFIG)


config.clear()
config.update(read_config(CONFIG_FILES, workflow.config_settings.config))
check_config(config)
# An `sd_world` section selects the paper's Stable Diffusion worlds; every model, data set and checkpoint they read
# must be in place (local paths or the local Hugging Face cache) before any job starts: one message lists what is not.
SD = "sd_world" in config
if SD:
    SD_WORLD, SD_PIPELINE = check_sd_world(config)


include: "workflow/rules/common.smk"


if SD:

    include: "workflow/rules/sd.smk"

    rule all:
        input:
            rules.sd_report.output,
        default_target: True

else:

    include: "workflow/rules/world.smk"
    include: "workflow/rules/reward.smk"
    include: "workflow/rules/optimize.smk"
    include: "workflow/rules/evaluate.smk"
    include: "workflow/rules/timing.smk"
    include: "workflow/rules/claims.smk"

    rule all:
        input:
            rules.world_report.output,
            rules.reward_study.output,
            rules.reward_probes.output,
            rules.optimize_report.output,
            rules.optimize_fidelity.output,
            rules.timing_step_cost.output,
            rules.claims.output,
        default_target: True


# After every rule is defined: a resources entry for a rule this world does not have is a typo.
UNKNOWN_RESOURCE_RULES = sorted(set(config["resources"]["rules"]) - {r.name for r in workflow.rules})
if UNKNOWN_RESOURCE_RULES:
    raise ValueError(
        f"resources.rules names rule(s) {UNKNOWN_RESOURCE_RULES} this world does not have: check the spelling "
        f"(its rules: {', '.join(sorted(r.name for r in workflow.rules if r.name != 'all'))})"
    )


onstart:
    # Without a partition the Slurm executor sends every job to the cluster's default one, which seldom has the
    # GPUs: stop before anything is submitted.
    if workflow.executor_plugin.name == "slurm":
        unplaced = sorted(
            r.name
            for r in workflow.rules
            if r.name != "all"
            and "slurm_partition" not in r.resources
            and "slurm_partition" not in workflow.resource_settings.overwrite_resources.get(r.name, {})
        )
        if unplaced:
            raise SystemExit(
                f"lpo: error: the Slurm executor has no slurm_partition for rule(s) {', '.join(unplaced)}: set "
                f"default-resources: {{slurm_partition: NAME}} in the profile (workflow/profiles/slurm/config.yaml), "
                f"or pass --default-resources slurm_partition=NAME"
            )
