# Preference optimisation: LPO (step-level DPO against the LRM), SPO (against the SPM), step-wise GRPO (against the
# LRM, paper App. B), Diffusion-DPO (offline, on the preference pairs), and the LPO ablation runs of paper Tables 9,
# 10, 22 and 23.

from lpo.optimize.ablations import PROMPT_SET as ABLATION_PROMPT_SET, ablation_variants
from lpo.optimize.methods import grpo_runs

GRPO_RUNS = grpo_runs(config["grpo"]["budgets"])

LPO_ABLATIONS = ablation_variants(config["lpo"], config["lpo_ablations"])
# A run whose settings are the main LPO run's (the reference, when the budgets agree) reuses that run.
LPO_ABLATION_RUNS = [run for run, v in LPO_ABLATIONS.items()
                     if json.dumps(v["settings"], sort_keys=True) != json.dumps(config["lpo"], sort_keys=True)]


rule optimize_lpo:
    input:
        model=rules.world_base_model.output.model,
        prompts=rules.world_prompts.output,
        lrm=rules.reward_lrm.output.model,
        lrm_metrics=rules.reward_lrm.output.metrics,
    output:
        model=directory(f"{RESULTS}/optimize/lpo"),
        metrics=f"{RESULTS}/optimize/lpo_metrics.json",
    params:
        lpo=launch("optimize_lpo", "lpo"),
        p=params_json("lpo"),
    threads: THREADS
    resources:
        **resources_of("optimize_lpo"),
    log:
        log_of("optimize_lpo"),
    benchmark:
        benchmark_of("optimize_lpo")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} optimize lpo --params {params.p} --model {input.model} "
        "--prompts {input.prompts} --lrm {input.lrm} --lrm-metrics {input.lrm_metrics} --out {output.model} "
        "--metrics {output.metrics} > {log} 2>&1"


rule optimize_spo:
    input:
        model=rules.world_base_model.output.model,
        prompts=rules.world_prompts.output,
        spm=rules.reward_spm.output.model,
        spm_metrics=rules.reward_spm.output.metrics,
    output:
        model=directory(f"{RESULTS}/optimize/spo"),
        metrics=f"{RESULTS}/optimize/spo_metrics.json",
    params:
        lpo=launch("optimize_spo", "spo"),
        p=params_json("spo"),
    threads: THREADS
    resources:
        **resources_of("optimize_spo"),
    log:
        log_of("optimize_spo"),
    benchmark:
        benchmark_of("optimize_spo")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} optimize spo --params {params.p} --model {input.model} "
        "--prompts {input.prompts} --spm {input.spm} --spm-metrics {input.spm_metrics} --out {output.model} "
        "--metrics {output.metrics} > {log} 2>&1"


# Step-wise GRPO, one run per budget: `grpo` at grpo.rounds (LPO's cost on this world), `grpo_8x` at 8 times as many.
rule optimize_grpo:
    input:
        model=rules.world_base_model.output.model,
        prompts=rules.world_prompts.output,
        lrm=rules.reward_lrm.output.model,
        lrm_metrics=rules.reward_lrm.output.metrics,
    output:
        model=directory(f"{RESULTS}/optimize/{{grpo_run}}"),
        metrics=f"{RESULTS}/optimize/{{grpo_run}}_metrics.json",
    wildcard_constraints:
        grpo_run=one_of(GRPO_RUNS),
    params:
        lpo=launch("optimize_grpo", "grpo"),
        p=lambda wildcards: shlex.quote(json.dumps(
            {"seed": config["seed"],
             "grpo": {**config["grpo"], "rounds": config["grpo"]["rounds"] * GRPO_RUNS[wildcards.grpo_run]}},
            sort_keys=True)),
    threads: THREADS
    # The longest one-core job after the world: started as soon as the LRM exists, it does not end the DAG alone.
    priority: LRM_PATH
    resources:
        **resources_of("optimize_grpo"),
    log:
        log_of("optimize_{grpo_run}"),
    benchmark:
        benchmark_of("optimize_{grpo_run}")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} optimize grpo --params {params.p} --model {input.model} "
        "--prompts {input.prompts} --lrm {input.lrm} --lrm-metrics {input.lrm_metrics} --out {output.model} "
        "--metrics {output.metrics} > {log} 2>&1"


rule optimize_diffusion_dpo:
    input:
        model=rules.world_base_model.output.model,
        preferences=rules.world_preferences.output,
    output:
        model=directory(f"{RESULTS}/optimize/diffusion_dpo"),
        metrics=f"{RESULTS}/optimize/diffusion_dpo_metrics.json",
    params:
        lpo=launch("optimize_diffusion_dpo", "diffusion_dpo"),
        p=params_json("diffusion_dpo"),
    threads: THREADS
    resources:
        **resources_of("optimize_diffusion_dpo"),
    log:
        log_of("optimize_diffusion_dpo"),
    benchmark:
        benchmark_of("optimize_diffusion_dpo")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} optimize diffusion-dpo --params {params.p} --model {input.model} "
        "--preferences {input.preferences} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule optimize_lpo_ablation:
    input:
        model=rules.world_base_model.output.model,
        prompts=rules.world_prompts.output,
        lrm=rules.reward_lrm.output.model,
        lrm_metrics=rules.reward_lrm.output.metrics,
    output:
        model=directory(f"{RESULTS}/optimize/ablations/{{run}}/lpo"),
        metrics=f"{RESULTS}/optimize/ablations/{{run}}/lpo_metrics.json",
    wildcard_constraints:
        run=one_of(LPO_ABLATION_RUNS),
    params:
        lpo=launch("optimize_lpo_ablation", "lpo"),
        # The run's whole lpo section: the defaults with its ablated value and the ablation budget.
        p=lambda wildcards: shlex.quote(json.dumps({"seed": config["seed"],
                                                    "lpo": LPO_ABLATIONS[wildcards.run]["settings"]},
                                                   sort_keys=True)),
    threads: THREADS
    resources:
        **resources_of("optimize_lpo_ablation"),
    log:
        log_of("optimize_lpo_ablation_{run}"),
    benchmark:
        benchmark_of("optimize_lpo_ablation_{run}")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} optimize lpo --params {params.p} --model {input.model} "
        "--prompts {input.prompts} --lrm {input.lrm} --lrm-metrics {input.lrm_metrics} --out {output.model} "
        "--metrics {output.metrics} > {log} 2>&1"


# Step-level reward fidelity (beyond the paper): do the LRM's and the SPM's scores of a step's candidates rank them
# as the judge ranks their deterministic rollouts? Also the noise-calibrated LRM and the LRM's noise ensembling on the
# same candidates. Beside the reward study's accuracy against noise.
rule optimize_fidelity:
    input:
        model=rules.world_base_model.output.model,
        prompts=rules.world_prompts.output,
        lrm=rules.reward_lrm.output.model,
        calibrated=rules.reward_lrm_calibrated.output.model,
        spm=rules.reward_spm.output.model,
        judge=rules.world_judge.output.model,
        accuracy=rules.reward_study.output.csv,
    output:
        md=f"{REPORTS}/step_fidelity.md",
        csv=f"{REPORTS}/step_fidelity.csv",
        plot=report(f"{REPORTS}/step_fidelity.png", category="Reward models"),
    params:
        lpo=LPO,
        p=params_json("world", "lpo", "spo", "step_fidelity"),
        out=lambda wildcards, output: os.path.dirname(output.md),
    threads: THREADS
    priority: STUDY_PATH
    resources:
        **resources_of("optimize_fidelity"),
    log:
        log_of("optimize_fidelity"),
    benchmark:
        benchmark_of("optimize_fidelity")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} optimize fidelity --params {params.p} --model {input.model} "
        "--prompts {input.prompts} --lrm {input.lrm} --calibrated-lrm {input.calibrated} --spm {input.spm} "
        "--judge {input.judge} --accuracy {input.accuracy} --out {params.out} > {log} 2>&1"
