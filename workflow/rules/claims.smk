# The verdict on each of the paper's claims: reports/<world>/claims.md, the report to read first. It reads the
# reward study's and the training-cost tables and every method's per-image scores, so it runs last.

# The main methods and the LPO ablation runs by the names the claims read them under (evaluate.smk's SOURCE).
CLAIM_SCORES = {name: SCORES[m] for name, m in SOURCE.items() if name != "base"}


rule claims:
    input:
        reward_accuracy=rules.reward_study.output.csv,
        high_noise=rules.reward_study.output.high_noise,
        cost=rules.optimize_report.output.cost,
        scores=list(dict.fromkeys(CLAIM_SCORES.values())),
    output:
        md=f"{REPORTS}/claims.md",
        csv=f"{REPORTS}/claims.csv",
    params:
        p=params_json("world", "evaluate", "lpo", "lpo_ablations"),
        out=lambda wildcards, output: os.path.dirname(output.md),
        # The reward study writes it beside its declared outputs, so it exists once they do.
        lrm_ablations=f"{REPORTS}/lrm_ablations.csv",
        scores=" ".join(f"{name}={path}" for name, path in CLAIM_SCORES.items()),
    resources:
        **resources_of("claims"),
    log:
        log_of("claims"),
    benchmark:
        benchmark_of("claims")
    conda:
        LPO_ENV
    shell:
        "python -m lpo claims report --params {params.p} --reward-accuracy {input.reward_accuracy} "
        "--lrm-ablations {params.lrm_ablations} --high-noise {input.high_noise} --cost {input.cost} "
        "--scores {params.scores} --out {params.out} > {log} 2>&1"
