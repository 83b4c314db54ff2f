# The paper's pipeline as one DAG. `snakemake --cores all` builds the embedded Shapes world;
# `--configfile config/<world>.yaml` swaps the world. Every rule calls the `lpo` CLI.
import os

from snakemake.utils import min_version, validate

min_version("8.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


validate(config, os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"))


include: "workflow/rules/common.smk"
include: "workflow/rules/world.smk"


rule all:
    input:
        rules.world_report.output,
    default_target: True
