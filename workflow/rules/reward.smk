# Reward models: MPCF counts, the LRM (and its ablations), the pixel reward model, the SPM, and the study of
# reward accuracy against noise (reports/<world>/reward.md).

# The reward study (~8 min on one core) and the step-level fidelity after it are the longest one-core chain after the
# world: its stages go first, so that chain does not finish alone on an otherwise idle machine at the DAG's end.
# Below half of CRITICAL_PATH: Snakemake picks the jobs whose priorities sum highest, and two of these must not
# outweigh the two-process base samples that finish the world.
STUDY_PATH = 4
# The LRM goes first among them: the longest one-core job after the world, step-wise GRPO's 8x run, waits for it.
LRM_PATH = STUDY_PATH + 1

rule reward_mpcf:
    input:
        preferences=rules.world_preferences.output,
    output:
        f"{RESULTS}/reward/mpcf.json",
    params:
        p=params_json("mpcf"),
    priority: STUDY_PATH
    resources:
        **resources_of("reward_mpcf"),
    log:
        log_of("reward_mpcf"),
    conda:
        LPO_ENV
    shell:
        "python -m lpo reward mpcf --params {params.p} --preferences {input.preferences} --out {output} > {log} 2>&1"


rule reward_lrm:
    input:
        model=rules.world_base_model.output.model,
        preferences=rules.world_preferences.output,
    output:
        model=directory(f"{RESULTS}/reward/lrm"),
        metrics=f"{RESULTS}/reward/lrm_metrics.json",
    params:
        lpo=launch("reward_lrm", "lrm"),
        p=params_json("mpcf", "lrm"),
    threads: THREADS
    priority: LRM_PATH
    resources:
        **resources_of("reward_lrm"),
    log:
        log_of("reward_lrm"),
    benchmark:
        benchmark_of("reward_lrm")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} reward lrm --params {params.p} --model {input.model} "
        "--preferences {input.preferences} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule reward_lrm_ablation:
    input:
        model=rules.world_base_model.output.model,
        preferences=rules.world_preferences.output,
    output:
        model=directory(f"{RESULTS}/reward/ablations/{{variant}}/lrm"),
        metrics=f"{RESULTS}/reward/ablations/{{variant}}/lrm_metrics.json",
    wildcard_constraints:
        variant=r"(mpcf\d|vfe[0-9.]+)",
    params:
        lpo=launch("reward_lrm_ablation", "lrm"),
        p=params_json("mpcf", "lrm"),
        flags=ablation_flags,
    threads: THREADS
    priority: STUDY_PATH
    resources:
        **resources_of("reward_lrm_ablation"),
    log:
        log_of("reward_lrm_ablation_{variant}"),
    benchmark:
        benchmark_of("reward_lrm_ablation_{variant}")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} reward lrm --params {params.p} {params.flags} --model {input.model} "
        "--preferences {input.preferences} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


# Beyond the paper: the noise-calibrated LRM (DiNa-LRM), trained as the LRM is, on the same pairs with the same
# seed, with the lrm_calibrated section's likelihood, uncertainty and head.
rule reward_lrm_calibrated:
    input:
        model=rules.world_base_model.output.model,
        preferences=rules.world_preferences.output,
    output:
        model=directory(f"{RESULTS}/reward/lrm_calibrated"),
        metrics=f"{RESULTS}/reward/lrm_calibrated_metrics.json",
    params:
        lpo=launch("reward_lrm_calibrated", "lrm"),
        p=params_json("mpcf", "lrm", "lrm_calibrated"),
    threads: THREADS
    priority: STUDY_PATH
    resources:
        **resources_of("reward_lrm_calibrated"),
    log:
        log_of("reward_lrm_calibrated"),
    benchmark:
        benchmark_of("reward_lrm_calibrated")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} reward lrm --params {params.p} --calibrated --model {input.model} "
        "--preferences {input.preferences} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule reward_pixel:
    input:
        clip=rules.world_clip.output.model,
        preferences=rules.world_preferences.output,
    output:
        model=directory(f"{RESULTS}/reward/pixel"),
        metrics=f"{RESULTS}/reward/pixel_metrics.json",
    params:
        lpo=launch("reward_pixel"),
        p=params_json("pixel_reward"),
    threads: THREADS
    priority: STUDY_PATH
    resources:
        **resources_of("reward_pixel"),
    log:
        log_of("reward_pixel"),
    benchmark:
        benchmark_of("reward_pixel")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} reward pixel --params {params.p} --clip {input.clip} "
        "--preferences {input.preferences} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule reward_spm:
    input:
        model=rules.world_base_model.output.model,
        pixel=rules.reward_pixel.output.model,
        preferences=rules.world_preferences.output,
    output:
        model=directory(f"{RESULTS}/reward/spm"),
        metrics=f"{RESULTS}/reward/spm_metrics.json",
    params:
        lpo=launch("reward_spm"),
        p=params_json("spm"),
    threads: THREADS
    priority: STUDY_PATH
    resources:
        **resources_of("reward_spm"),
    log:
        log_of("reward_spm"),
    benchmark:
        benchmark_of("reward_spm")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} reward spm --params {params.p} --model {input.model} "
        "--pixel {input.pixel} --preferences {input.preferences} --out {output.model} "
        "--metrics {output.metrics} > {log} 2>&1"


rule reward_study:
    input:
        model=rules.world_base_model.output.model,
        preferences=rules.world_preferences.output,
        mpcf=rules.reward_mpcf.output,
        clip=rules.world_clip.output.model,
        lrm=rules.reward_lrm.output.model,
        lrm_metrics=rules.reward_lrm.output.metrics,
        calibrated=rules.reward_lrm_calibrated.output.model,
        calibrated_metrics=rules.reward_lrm_calibrated.output.metrics,
        pixel=rules.reward_pixel.output.model,
        pixel_metrics=rules.reward_pixel.output.metrics,
        spm=rules.reward_spm.output.model,
        spm_metrics=rules.reward_spm.output.metrics,
        ablations=expand(f"{RESULTS}/reward/ablations/{{variant}}/lrm", variant=LRM_ABLATIONS),
    output:
        md=f"{REPORTS}/reward.md",
        csv=f"{REPORTS}/reward_accuracy.csv",
        calibration=f"{REPORTS}/reward_calibration.csv",
        calibration_plot=report(f"{REPORTS}/reward_calibration.png", category="Reward models"),
        high_noise=f"{REPORTS}/reward_high_noise.csv",
        plot=report(f"{REPORTS}/reward_accuracy.png", caption="../report/reward_accuracy.rst",
                    category="Reward models"),
    params:
        lpo=LPO,
        p=params_json("world", "mpcf", "lrm", "reward_study"),
        out=lambda wildcards, output: os.path.dirname(output.md),
        ablations=" ".join(f"{v}={RESULTS}/reward/ablations/{v}/lrm" for v in LRM_ABLATIONS),
    threads: THREADS
    priority: STUDY_PATH
    resources:
        **resources_of("reward_study"),
    log:
        log_of("reward_study"),
    benchmark:
        benchmark_of("reward_study")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} reward study --params {params.p} --model {input.model} "
        "--preferences {input.preferences} --mpcf {input.mpcf} --clip {input.clip} --lrm {input.lrm} "
        "--calibrated-lrm {input.calibrated} --pixel {input.pixel} "
        "--spm {input.spm} --ablations {params.ablations} --out {params.out} > {log} 2>&1"


# Opt-in (not in `all`): six pixel-model trainings, ~15 min on 2 cores.
rule reward_scaling:
    input:
        clip=rules.world_clip.output.model,
        preferences=rules.world_preferences.output,
    output:
        md=f"{REPORTS}/reward_scaling.md",
        csv=f"{REPORTS}/reward_scaling.csv",
        plot=report(f"{REPORTS}/reward_scaling.png", caption="../report/reward_scaling.rst",
                    category="Reward models"),
    params:
        lpo=LPO_EXCLUSIVE,
        p=params_json("world", "preferences", "pixel_reward", "reward_scaling"),
        out=lambda wildcards, output: os.path.dirname(output.md),
    threads: workflow.cores
    resources:
        **resources_of("reward_scaling"),
    log:
        log_of("reward_scaling"),
    benchmark:
        benchmark_of("reward_scaling")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} reward scaling --params {params.p} --clip {input.clip} "
        "--preferences {input.preferences} --out {params.out} > {log} 2>&1"


# Opt-in (not in `all`): linear probes of frozen features predicting what the judge sees, ~2 min on 1 core.
rule reward_probes:
    input:
        model=rules.world_base_model.output.model,
        judge=rules.world_judge.output.model,
        lrm=rules.reward_lrm.output.model,
        preferences=rules.world_preferences.output,
        clip=rules.world_clip.output.model,
    output:
        md=f"{REPORTS}/probes.md",
        csv=f"{REPORTS}/probes.csv",
        plot=report(f"{REPORTS}/probes.png", category="Reward models"),
    params:
        lpo=LPO,
        p=params_json("world", "probes"),
        out=lambda wildcards, output: os.path.dirname(output.md),
    threads: THREADS
    resources:
        **resources_of("reward_probes"),
    log:
        log_of("reward_probes"),
    benchmark:
        benchmark_of("reward_probes")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} reward probes --params {params.p} --model {input.model} "
        "--judge {input.judge} --lrm {input.lrm} --preferences {input.preferences} --clip {input.clip} "
        "--out {params.out} > {log} 2>&1"
