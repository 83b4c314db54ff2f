# The paper's Stable Diffusion worlds (config/sd15.yaml, sd21.yaml, sdxl.yaml): Pick-a-Pic v1 preferences and prompt
# sets, the LRM, LPO, Diffusion-DPO and step-wise GRPO (sd_pipeline.trained) trained on the linked base pipeline, the
# official checkpoints linked in, every run sampled on the evaluation prompts and scored by the five Table 2 scorers in their own environment, and
# reports/<world>/table2.{md,csv,tex} (+ table18.*) beside the paper's numbers. The Snakefile has already checked
# that every model, data set and checkpoint these rules read is in place (lpo.checks.check_sd_world).

from lpo.sd.config import official_methods
from lpo.sd.hub import resolve
from lpo.sd.pipelines import scorer_paths

SCORERS_ENV = "../envs/scorers.yaml"
SD_OFFICIAL = official_methods(SD_WORLD)
# Sample runs: the base model, the methods trained here, the official checkpoints.
SD_RUNS = ["original", *SD_PIPELINE.trained, *(f"official_{m}" for m in SD_OFFICIAL)]
SD_TRAINED_LRM = f"{RESULTS}/reward/lrm"
SD_RELEASED_LRM = str(resolve(SD_WORLD.lrm, "sd_world.lrm", "LRM")) if SD_WORLD.lrm else None
# Table 18's LRMs by the name its rows carry.
SD_LRMS = ({"trained": SD_TRAINED_LRM} if SD_PIPELINE.trains_lrm else {}) | (
    {"released": SD_RELEASED_LRM} if SD_RELEASED_LRM else {})

# The pipeline folder each sample run samples from.
SD_MODEL = {"original": f"{RESULTS}/sd/base_model"} | {
    f"official_{m}": f"{RESULTS}/sd/official/{m}" for m in SD_OFFICIAL} | {
    m: f"{RESULTS}/optimize/{m}" for m in SD_PIPELINE.trained}


rule sd_base_model:
    output:
        directory(f"{RESULTS}/sd/base_model"),
    params:
        p=params_json("sd_world"),
    resources:
        **resources_of("sd_base_model"),
    log:
        log_of("sd_base_model"),
    conda:
        LPO_ENV
    shell:
        "python -m lpo sd link --params {params.p} --out {output} > {log} 2>&1"


rule sd_official_model:
    output:
        directory(f"{RESULTS}/sd/official/{{method}}"),
    wildcard_constraints:
        method=one_of(SD_OFFICIAL),
    params:
        p=params_json("sd_world"),
    resources:
        **resources_of("sd_official_model"),
    log:
        log_of("sd_official_model_{method}"),
    conda:
        LPO_ENV
    shell:
        "python -m lpo sd link --params {params.p} --method {wildcards.method} --out {output} > {log} 2>&1"


rule sd_prompts:
    output:
        f"{RESULTS}/sd/prompts.json",
    params:
        p=params_json("sd_world"),
    resources:
        **resources_of("sd_prompts"),
    log:
        log_of("sd_prompts"),
    conda:
        LPO_ENV
    shell:
        "python -m lpo sd prompts --params {params.p} --out {output} > {log} 2>&1"


rule sd_preferences:
    output:
        directory(f"{RESULTS}/preferences"),
    params:
        p=params_json("sd_world"),
    resources:
        **resources_of("sd_preferences"),
    log:
        log_of("sd_preferences"),
    benchmark:
        benchmark_of("sd_preferences")
    conda:
        LPO_ENV
    shell:
        "python -m lpo sd preferences --params {params.p} --out {output} > {log} 2>&1"


rule sd_reward_lrm:
    input:
        model=rules.sd_base_model.output[0],
        preferences=rules.sd_preferences.output[0],
    output:
        model=directory(SD_TRAINED_LRM),
        metrics=f"{SD_TRAINED_LRM}_metrics.json",
    params:
        lpo=launch("sd_reward_lrm", "lrm", PROCESSES, EXCLUSIVE_THREADS),
        p=params_json("sd_world", "mpcf", "lrm"),
    threads: launched_threads("sd_reward_lrm", PROCESSES, EXCLUSIVE_THREADS)
    resources:
        **resources_of("sd_reward_lrm"),
    log:
        log_of("sd_reward_lrm"),
    benchmark:
        benchmark_of("sd_reward_lrm")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} sd reward-lrm --params {params.p} --model {input.model} "
        "--preferences {input.preferences} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule sd_reward_table18:
    input:
        model=rules.sd_base_model.output[0],
        preferences=rules.sd_preferences.output[0],
        trained=[SD_TRAINED_LRM] if "trained" in SD_LRMS else [],
    output:
        f"{RESULTS}/reward/table18.json",
    params:
        lpo=LPO_EXCLUSIVE,
        p=params_json("sd_world", "sd_pipeline"),
        lrms=" ".join(f"{name}={shlex.quote(path)}" for name, path in SD_LRMS.items()),
    threads: EXCLUSIVE_THREADS
    resources:
        **resources_of("sd_reward_table18"),
    log:
        log_of("sd_reward_table18"),
    benchmark:
        benchmark_of("sd_reward_table18")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} sd reward-table18 --params {params.p} --model {input.model} "
        "--preferences {input.preferences} --lrm {params.lrms} --out {output} > {log} 2>&1"


rule sd_optimize_lpo:
    input:
        model=rules.sd_base_model.output[0],
        prompts=rules.sd_prompts.output[0],
        # The LRM trained here, or none: the released one (sd_pipeline.lpo_lrm) is outside the workflow.
        lrm=[SD_TRAINED_LRM] if SD_PIPELINE.lpo_lrm == "trained" else [],
        lrm_metrics=[f"{SD_TRAINED_LRM}_metrics.json"] if SD_PIPELINE.lpo_lrm == "trained" else [],
    output:
        model=directory(f"{RESULTS}/optimize/lpo"),
        metrics=f"{RESULTS}/optimize/lpo_metrics.json",
    params:
        lpo=launch("sd_optimize_lpo", "lpo", PROCESSES, EXCLUSIVE_THREADS),
        p=params_json("lpo"),
        lrm=lambda wildcards, input: input.lrm if input.lrm else shlex.quote(str(SD_RELEASED_LRM)),
        cost=lambda wildcards, input: f"--lrm-metrics {input.lrm_metrics}" if input.lrm_metrics else "",
    threads: launched_threads("sd_optimize_lpo", PROCESSES, EXCLUSIVE_THREADS)
    resources:
        **resources_of("sd_optimize_lpo"),
    log:
        log_of("sd_optimize_lpo"),
    benchmark:
        benchmark_of("sd_optimize_lpo")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} optimize lpo --params {params.p} --model {input.model} "
        "--prompts {input.prompts} --lrm {params.lrm} {params.cost} --out {output.model} "
        "--metrics {output.metrics} > {log} 2>&1"


# Step-wise GRPO (paper App. B, Table 12) against the same LRM as LPO, one run of grpo.rounds.
rule sd_optimize_grpo:
    input:
        model=rules.sd_base_model.output[0],
        prompts=rules.sd_prompts.output[0],
        lrm=[SD_TRAINED_LRM] if SD_PIPELINE.lpo_lrm == "trained" else [],
        lrm_metrics=[f"{SD_TRAINED_LRM}_metrics.json"] if SD_PIPELINE.lpo_lrm == "trained" else [],
    output:
        model=directory(f"{RESULTS}/optimize/grpo"),
        metrics=f"{RESULTS}/optimize/grpo_metrics.json",
    params:
        lpo=launch("sd_optimize_grpo", "grpo", PROCESSES, EXCLUSIVE_THREADS),
        p=params_json("grpo"),
        lrm=lambda wildcards, input: input.lrm if input.lrm else shlex.quote(str(SD_RELEASED_LRM)),
        cost=lambda wildcards, input: f"--lrm-metrics {input.lrm_metrics}" if input.lrm_metrics else "",
    threads: launched_threads("sd_optimize_grpo", PROCESSES, EXCLUSIVE_THREADS)
    resources:
        **resources_of("sd_optimize_grpo"),
    log:
        log_of("sd_optimize_grpo"),
    benchmark:
        benchmark_of("sd_optimize_grpo")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} optimize grpo --params {params.p} --model {input.model} "
        "--prompts {input.prompts} --lrm {params.lrm} {params.cost} --out {output.model} "
        "--metrics {output.metrics} > {log} 2>&1"


rule sd_optimize_diffusion_dpo:
    input:
        model=rules.sd_base_model.output[0],
        preferences=rules.sd_preferences.output[0],
    output:
        model=directory(f"{RESULTS}/optimize/diffusion_dpo"),
        metrics=f"{RESULTS}/optimize/diffusion_dpo_metrics.json",
    params:
        lpo=launch("sd_optimize_diffusion_dpo", "diffusion_dpo", PROCESSES, EXCLUSIVE_THREADS),
        p=params_json("diffusion_dpo"),
    threads: launched_threads("sd_optimize_diffusion_dpo", PROCESSES, EXCLUSIVE_THREADS)
    resources:
        **resources_of("sd_optimize_diffusion_dpo"),
    log:
        log_of("sd_optimize_diffusion_dpo"),
    benchmark:
        benchmark_of("sd_optimize_diffusion_dpo")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} optimize diffusion-dpo --params {params.p} --model {input.model} "
        "--preferences {input.preferences} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule sd_sample:
    input:
        model=lambda wildcards: SD_MODEL[wildcards.run],
        prompts=rules.sd_prompts.output[0],
    output:
        directory(f"{RESULTS}/sd/samples/{{run}}"),
    wildcard_constraints:
        run=one_of(SD_RUNS),
    params:
        lpo=LPO_EXCLUSIVE,
        p=params_json("sd_world", "sd_pipeline"),
    threads: EXCLUSIVE_THREADS
    resources:
        **resources_of("sd_sample"),
    log:
        log_of("sd_sample_{run}"),
    benchmark:
        benchmark_of("sd_sample_{run}")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} sd sample --params {params.p} --run {wildcards.run} --model {input.model} "
        "--prompts {input.prompts} --out {output} > {log} 2>&1"


rule sd_score:
    input:
        f"{RESULTS}/sd/samples/{{run}}",
    output:
        f"{RESULTS}/sd/scores/{{run}}.csv",
    wildcard_constraints:
        run=one_of(SD_RUNS),
    params:
        threads=EXCLUSIVE_THREADS,
        # Checkpoint paths resolved now (the hub cache is read at start-up only), so the rule needs no hub client.
        scorers=shlex.quote(json.dumps(scorer_paths(SD_WORLD), sort_keys=True)),
        batch=SD_PIPELINE.scorer_batch_size,
    threads: EXCLUSIVE_THREADS
    resources:
        **resources_of("sd_score"),
    log:
        log_of("sd_score_{run}"),
    benchmark:
        benchmark_of("sd_score_{run}")
    conda:
        SCORERS_ENV
    shell:
        "OMP_NUM_THREADS={params.threads} python -m lpo.evaluate.scorers score --scorers {params.scorers} "
        "--samples {input} --batch-size {params.batch} --out {output} > {log} 2>&1"


rule sd_report:
    input:
        scores=expand(f"{RESULTS}/sd/scores/{{run}}.csv", run=SD_RUNS),
        samples=expand(f"{RESULTS}/sd/samples/{{run}}", run=SD_RUNS),
        table18=rules.sd_reward_table18.output if SD_LRMS else [],
    output:
        md=f"{REPORTS}/table2.md",
        csv=f"{REPORTS}/table2.csv",
        tex=f"{REPORTS}/table2.tex",
        plot=report(f"{REPORTS}/table2.png", caption="../report/sd_table2.rst", category="Preference scores"),
        grids=[report(f"{REPORTS}/samples_{run}.png", caption="../report/sd_samples.rst", category="Sample grids",
                      labels={"run": run}) for run in SD_RUNS],
        table18=[f"{REPORTS}/table18.{ext}" for ext in ("md", "csv", "tex")] if SD_LRMS else [],
    params:
        p=params_json("world", "sd_world", "sd_pipeline"),
        out=lambda wildcards, output: os.path.dirname(output.md),
        scores=" ".join(f"{run}={RESULTS}/sd/scores/{run}.csv" for run in SD_RUNS),
        samples=" ".join(f"{run}={RESULTS}/sd/samples/{run}" for run in SD_RUNS),
        table18=f"--table18 {RESULTS}/reward/table18.json" if SD_LRMS else "",
    resources:
        **resources_of("sd_report"),
    log:
        log_of("sd_report"),
    conda:
        LPO_ENV
    shell:
        "python -m lpo sd report --params {params.p} --scores {params.scores} --samples {params.samples} "
        "{params.table18} --out {params.out} > {log} 2>&1"
