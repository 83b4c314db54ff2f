# The embedded world: prompts, corpus, tokenizer, judge, VAE, base model, MPCF side scorers, preference data,
# and the world report.


# The chain corpus -> VAE -> base model -> preference data -> base samples -> report bounds the world's wall
# time: its jobs go first whenever a core frees (without this, Snakemake started the tokenizer and judge
# before the corpus, and the base samples waited behind the reward jobs).
CRITICAL_PATH = 10


rule world_prompts:
    output:
        f"{RESULTS}/world/prompts.json",
    params:
        p=params_json("world", "prompts"),
    resources:
        **resources_of("world_prompts"),
    log:
        log_of("world_prompts"),
    benchmark:
        benchmark_of("world_prompts")
    conda:
        LPO_ENV
    shell:
        "python -m lpo world prompts --params {params.p} --out {output} > {log} 2>&1"


rule world_corpus:
    output:
        directory(f"{RESULTS}/world/corpus"),
    params:
        p=params_json("world", "corpus"),
    priority: CRITICAL_PATH
    resources:
        **resources_of("world_corpus"),
    log:
        log_of("world_corpus"),
    benchmark:
        benchmark_of("world_corpus")
    conda:
        LPO_ENV
    shell:
        "python -m lpo world corpus --params {params.p} --out {output} > {log} 2>&1"


rule world_tokenizer:
    output:
        directory(f"{RESULTS}/world/tokenizer"),
    resources:
        **resources_of("world_tokenizer"),
    log:
        log_of("world_tokenizer"),
    benchmark:
        benchmark_of("world_tokenizer")
    conda:
        LPO_ENV
    shell:
        "python -m lpo world tokenizer --out {output} > {log} 2>&1"


rule world_judge:
    output:
        model=directory(f"{RESULTS}/world/judge"),
        metrics=f"{RESULTS}/world/judge_metrics.json",
    params:
        lpo=LPO,
        p=params_json("world", "judge"),
    threads: THREADS
    resources:
        **resources_of("world_judge"),
    log:
        log_of("world_judge"),
    benchmark:
        benchmark_of("world_judge")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} world judge --params {params.p} --out {output.model} "
        "--metrics {output.metrics} > {log} 2>&1"


rule world_vae:
    input:
        corpus=rules.world_corpus.output,
    output:
        model=directory(f"{RESULTS}/world/vae"),
        metrics=f"{RESULTS}/world/vae_metrics.json",
    params:
        lpo=LPO,
        p=params_json("world", "vae"),
    threads: THREADS
    priority: CRITICAL_PATH
    resources:
        **resources_of("world_vae"),
    log:
        log_of("world_vae"),
    benchmark:
        benchmark_of("world_vae")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} world vae --params {params.p} --corpus {input.corpus} --out {output.model} "
        "--metrics {output.metrics} > {log} 2>&1"


rule world_base_model:
    input:
        corpus=rules.world_corpus.output,
        vae=rules.world_vae.output.model,
        tokenizer=rules.world_tokenizer.output,
    output:
        model=directory(f"{RESULTS}/world/base_model"),
        snapshots=directory(f"{RESULTS}/world/base_model_snapshots"),
        metrics=f"{RESULTS}/world/base_model_metrics.json",
    params:
        p=params_json("world", "base_model"),
        lpo=launch("world_base_model", "base_model", PROCESSES),
    threads: PROCESSES
    priority: CRITICAL_PATH
    resources:
        **resources_of("world_base_model"),
    log:
        log_of("world_base_model"),
    benchmark:
        benchmark_of("world_base_model")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} world base-model --params {params.p} --corpus {input.corpus} --vae {input.vae} "
        "--tokenizer {input.tokenizer} --out {output.model} --snapshots {output.snapshots} "
        "--metrics {output.metrics} > {log} 2>&1"


# The world's CLIP-H: the pixel reward model (the world's PickScore) and the SPM are fine-tuned from it.
rule world_clip:
    input:
        corpus=rules.world_corpus.output,
        tokenizer=rules.world_tokenizer.output,
    output:
        model=directory(f"{RESULTS}/world/clip"),
        metrics=f"{RESULTS}/world/clip_metrics.json",
    params:
        lpo=LPO,
        p=params_json("world_clip"),
    threads: THREADS
    resources:
        **resources_of("world_clip"),
    log:
        log_of("world_clip"),
    benchmark:
        benchmark_of("world_clip")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} world clip --params {params.p} --corpus {input.corpus} "
        "--tokenizer {input.tokenizer} --out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule world_side_scorers:
    input:
        corpus=rules.world_corpus.output,
    output:
        model=directory(f"{RESULTS}/world/side_scorers"),
        metrics=f"{RESULTS}/world/side_scorers_metrics.json",
    params:
        lpo=LPO,
        p=params_json("world", "side_scorers"),
    threads: THREADS
    resources:
        **resources_of("world_side_scorers"),
    log:
        log_of("world_side_scorers"),
    benchmark:
        benchmark_of("world_side_scorers")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} world side-scorers --params {params.p} --corpus {input.corpus} "
        "--out {output.model} --metrics {output.metrics} > {log} 2>&1"


rule world_preferences:
    input:
        model=rules.world_base_model.output.model,
        snapshots=rules.world_base_model.output.snapshots,
        judge=rules.world_judge.output.model,
        side_scorers=rules.world_side_scorers.output.model,
        prompts=rules.world_prompts.output,
    output:
        directory(f"{RESULTS}/preferences"),
    params:
        p=params_json("world", "preferences"),
        lpo=launch("world_preferences", processes=PROCESSES),
    threads: PROCESSES
    priority: CRITICAL_PATH
    resources:
        **resources_of("world_preferences"),
    log:
        log_of("world_preferences"),
    benchmark:
        benchmark_of("world_preferences")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} world preferences --params {params.p} --model {input.model} --snapshots {input.snapshots} "
        "--judge {input.judge} --side-scorers {input.side_scorers} --prompts {input.prompts} "
        "--out {output} > {log} 2>&1"


rule sample_base:
    input:
        model=rules.world_base_model.output.model,
        prompts=rules.world_prompts.output,
    output:
        f"{RESULTS}/samples/base.npz",
    params:
        p=params_json("world"),
        n=config["report"]["images_per_prompt"],
        steps=config["report"]["sampling_steps"],
        cfg=config["report"]["guidance_scale"],
        lpo=launch("sample_base", processes=PROCESSES),
    threads: PROCESSES
    priority: CRITICAL_PATH
    resources:
        **resources_of("sample_base"),
    log:
        log_of("sample_base"),
    benchmark:
        benchmark_of("sample_base")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} sample --params {params.p} --model {input.model} --prompts {input.prompts} "
        "--sets eval_seen,eval_heldout --images-per-prompt {params.n} --steps {params.steps} "
        "--guidance-scale {params.cfg} --out {output} > {log} 2>&1"


WORLD_STAGES = ["world_prompts", "world_corpus", "world_tokenizer", "world_judge", "world_vae",
                "world_base_model", "world_clip", "world_side_scorers", "world_preferences", "sample_base"]


rule world_report:
    input:
        samples=rules.sample_base.output,
        judge=rules.world_judge.output.model,
        judge_metrics=rules.world_judge.output.metrics,
        vae_metrics=rules.world_vae.output.metrics,
        preferences=rules.world_preferences.output,
    output:
        md=f"{REPORTS}/world.md",
        csv=f"{REPORTS}/world.csv",
        grid=f"{REPORTS}/base_samples.png",
    params:
        lpo=LPO,
        p=params_json("world", "report"),
        out=lambda wildcards, output: os.path.dirname(output.md),
        # Benchmark files are no rule's output, so they cannot be inputs; they exist once the inputs do.
        benchmarks=[benchmark_of(r) for r in WORLD_STAGES],
    priority: CRITICAL_PATH
    resources:
        **resources_of("world_report"),
    log:
        log_of("world_report"),
    conda:
        LPO_ENV
    shell:
        "{params.lpo} world report --params {params.p} --samples {input.samples} --judge {input.judge} "
        "--vae-metrics {input.vae_metrics} --judge-metrics {input.judge_metrics} "
        "--preferences {input.preferences} --benchmarks {params.benchmarks} --out {params.out} > {log} 2>&1"


# Opt-in (not in `all`): judges trained as the world's on other seeds, scoring the preference pairs (~6 min a
# judge on 2 cores): how far the labels are a property of the images.
rule world_judge_agreement:
    input:
        judge=rules.world_judge.output.model,
        preferences=rules.world_preferences.output,
    output:
        md=f"{REPORTS}/judge_agreement.md",
        csv=f"{REPORTS}/judge_agreement.csv",
    params:
        lpo=LPO_EXCLUSIVE,
        p=params_json("world", "judge_agreement"),
        out=lambda wildcards, output: os.path.dirname(output.md),
    threads: workflow.cores
    resources:
        **resources_of("world_judge_agreement"),
    log:
        log_of("world_judge_agreement"),
    benchmark:
        benchmark_of("world_judge_agreement")
    conda:
        LPO_ENV
    shell:
        "{params.lpo} world judge-agreement --params {params.p} --judge {input.judge} "
        "--preferences {input.preferences} --out {params.out} > {log} 2>&1"
