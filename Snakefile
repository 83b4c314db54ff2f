# The paper's pipeline as one DAG. `snakemake --cores all` builds the embedded Shapes world;
# `--configfile config/<world>.yaml` swaps the world. Every rule calls the `lpo` CLI.
import os
import sys

from snakemake.utils import min_version, validate

sys.path.insert(0, workflow.basedir)
from lpo.checks import check_config

min_version("8.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


validate(config, os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"))
check_config(config)


include: "workflow/rules/common.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/reward.smk"
include: "workflow/rules/optimize.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/timing.smk"


rule all:
    input:
        rules.world_report.output,
        rules.reward_study.output,
        rules.optimize_report.output,
        rules.timing_step_cost.output,
    default_target: True
