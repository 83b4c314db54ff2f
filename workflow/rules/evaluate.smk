# Evaluation of the trained methods: samples with the base samples' prompts, seeds, steps and CFG, every image
# scored by the judge and the pixel reward model, and reports/<world>/optimize.md.

MAIN_METHODS = ["diffusion_dpo", "spo", "lpo", *GRPO_RUNS]
# Every trained model by the name its samples and scores are filed under.
TRAINED = {"lpo": rules.optimize_lpo.output.model, "spo": rules.optimize_spo.output.model,
           "diffusion_dpo": rules.optimize_diffusion_dpo.output.model} | {
    run: f"{RESULTS}/optimize/{run}" for run in GRPO_RUNS} | {
    f"ablation_{run}": f"{RESULTS}/optimize/ablations/{run}/lpo" for run in LPO_ABLATION_RUNS}
# What the report calls each method -> the trained model whose files it reads.
SOURCE = {"base": "base", **{m: m for m in MAIN_METHODS}} | {
    f"ablation_{run}": f"ablation_{run}" if run in LPO_ABLATION_RUNS else "lpo" for run in LPO_ABLATIONS}
SAMPLES = {m: f"{RESULTS}/samples/{m}.npz" for m in ["base", *TRAINED]}
SCORES = {m: f"{RESULTS}/evaluate/{m}_scores.csv" for m in ["base", *TRAINED]}
TRAINING_METRICS = {"lpo": rules.optimize_lpo.output.metrics, "spo": rules.optimize_spo.output.metrics,
                    "diffusion_dpo": rules.optimize_diffusion_dpo.output.metrics} | {
    run: f"{RESULTS}/optimize/{run}_metrics.json" for run in GRPO_RUNS} | {
    f"ablation_{run}": f"{RESULTS}/optimize/ablations/{run}/lpo_metrics.json" for run in LPO_ABLATION_RUNS}


rule sample_method:
    input:
        model=lambda wildcards: TRAINED[wildcards.method],
        prompts=rules.world_prompts.output,
    output:
        f"{RESULTS}/samples/{{method}}.npz",
    wildcard_constraints:
        method=one_of(TRAINED),
    params:
        lpo=LPO,
        # Exactly rule sample_base's settings, so every image has a base-model twin (same prompt and seed).
        p=params_json("world"),
        n=config["report"]["images_per_prompt"],
        steps=config["report"]["sampling_steps"],
        cfg=config["report"]["guidance_scale"],
        sets=lambda wildcards: ABLATION_PROMPT_SET if wildcards.method.startswith("ablation_")
        else "eval_seen,eval_heldout",
    threads: THREADS
    resources:
        **resources_of("sample_method"),
    log:
        log_of("sample_{method}"),
    benchmark:
        benchmark_of("sample_{method}")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} sample --params {params.p} --model {input.model} --prompts {input.prompts} "
        "--sets {params.sets} --images-per-prompt {params.n} --steps {params.steps} "
        "--guidance-scale {params.cfg} --out {output} > {log} 2>&1"


rule evaluate_scores:
    input:
        samples=f"{RESULTS}/samples/{{method}}.npz",
        judge=rules.world_judge.output.model,
        pixel=rules.reward_pixel.output.model,
    output:
        f"{RESULTS}/evaluate/{{method}}_scores.csv",
    wildcard_constraints:
        method=one_of(["base", *TRAINED]),
    params:
        lpo=LPO,
        p=params_json("world"),
    threads: THREADS
    resources:
        **resources_of("evaluate_scores"),
    log:
        log_of("evaluate_scores_{method}"),
    benchmark:
        benchmark_of("evaluate_scores_{method}")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} evaluate score --params {params.p} --samples {input.samples} "
        "--judge {input.judge} --pixel {input.pixel} --out {output} > {log} 2>&1"


rule optimize_report:
    input:
        scores=list(SCORES.values()),
        training=list(TRAINING_METRICS.values()),
        samples=[SAMPLES[m] for m in ["base", *MAIN_METHODS]],
    output:
        md=f"{REPORTS}/optimize.md",
        main=f"{REPORTS}/optimize_main.csv",
        cost=f"{REPORTS}/optimize_cost.csv",
        tex=f"{REPORTS}/optimize.tex",
        curves=report(f"{REPORTS}/training_curves.png", caption="../report/training_curves.rst",
                      category="Preference optimisation"),
        grids=[report(f"{REPORTS}/samples_{m}.png", caption="../report/sample_grids.rst",
                      category="Preference optimisation", labels={"figure": "samples", "method": m})
               for m in ["base", *MAIN_METHODS]],
    params:
        p=params_json("world", "evaluate", "lpo", "spo", "grpo", "diffusion_dpo", "lpo_ablations", "report",
                      "preferences"),
        out=lambda wildcards, output: os.path.dirname(output.md),
        scores=" ".join(f"{name}={SCORES[m]}" for name, m in SOURCE.items()),
        training=" ".join(f"{name}={TRAINING_METRICS[m]}" for name, m in SOURCE.items() if m != "base"),
        samples=" ".join(f"{m}={SAMPLES[m]}" for m in ["base", *MAIN_METHODS]),
        # Benchmark files are no rule's output, so they cannot be inputs; they exist once the inputs do.
        benchmarks=[benchmark_of(f"optimize_{m}") for m in MAIN_METHODS],
    resources:
        **resources_of("optimize_report"),
    log:
        log_of("optimize_report"),
    benchmark:
        benchmark_of("optimize_report")
    conda:
        LPO_ENV
    shell:
        "python -m lpo evaluate report --params {params.p} --scores {params.scores} --training {params.training} "
        "--samples {params.samples} --benchmarks {params.benchmarks} --out {params.out} > {log} 2>&1"
