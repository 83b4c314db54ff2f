# The cost of one sampling step with K candidates, LRM against SPM (paper Table 5), on the world's trained models,
# and the LRM step under noise ensembling for each M of timing.ensemble_draws (step_cost_ensembling.csv).
# The job takes every core, so no other job runs beside it while it times.


rule timing_step_cost:
    input:
        model=rules.world_base_model.output.model,
        lrm=rules.reward_lrm.output.model,
        spm=rules.reward_spm.output.model,
    output:
        md=f"{REPORTS}/step_cost.md",
        csv=f"{REPORTS}/step_cost.csv",
        tex=f"{REPORTS}/step_cost.tex",
        ensembling=f"{REPORTS}/step_cost_ensembling.csv",
    params:
        lpo=LPO_EXCLUSIVE,
        p=params_json("world", "timing"),
        out=lambda wildcards, output: os.path.dirname(output.md),
    threads: workflow.cores
    resources:
        **resources_of("timing_step_cost"),
    log:
        log_of("timing_step_cost"),
    benchmark:
        benchmark_of("timing_step_cost")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} timing step-cost --params {params.p} --model {input.model} "
        "--lrm {input.lrm} --spm {input.spm} --out {params.out} > {log} 2>&1"
