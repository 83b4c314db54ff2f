"""Every bad input a clear error: one row per bad input, each stopping with a message that names the input (config
key, option or file) and the fix, and leaving no output behind."""
import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_preference_data import write_preferences
from tiny_sd import IMAGE_SIZE, PROMPTS, build_tiny_pipeline

from lpo.cli import main
from lpo.config import parse_params
from lpo.io import CorruptInput
from lpo.launch import check_precision
from lpo.optimize.methods import LPOConfig
from lpo.optimize.step_trainer import train_step_po
from lpo.preference_data import load_pairs
from lpo.reward.lrm import LRMConfig
from lpo.reward.lrm_training import LRMTrainConfig, train_lrm
from lpo.reward.pair_training import fit
from lpo.reward.spm import SPMConfig
from lpo.world.judge import load_judge
from lpo.world.side_scorers import SideScorers

REPO = Path(__file__).resolve().parents[1]
HUGE = 1e30  # a learning rate every trainer diverges at within a step or two
LRM_IO = ["--model", "{tmp}/base", "--preferences", "{tmp}/prefs", "--out", "{tmp}/lrm", "--metrics", "{tmp}/m.json"]
SAMPLE_IO = ["--model", "{tmp}/base", "--prompts", "{tmp}/prompts.json", "--sets", "eval_seen", "--out",
             "{tmp}/s.npz"]
PROMPTS_FILE = {"prompts.json": '{"eval_seen": ["a small red circle on a gray background, on the left"]}'}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("bad_input") / "base")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    prefs = write_preferences(tmp_path_factory.mktemp("bad_input") / "prefs", image_size=IMAGE_SIZE,
                              sizes={"train": 8, "validation_unique": 4})
    return load_pairs(prefs, "train"), load_pairs(prefs, "validation_unique")


def cli(*argv):
    """`lpo argv...` in this process ({tmp}: the row's folder); its stderr, once it has failed."""
    def run(tmp, request):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = main([a.replace("{tmp}", str(tmp)) for a in argv])
            except SystemExit as e:  # argparse
                code = e.code
        assert code != 0, err.getvalue()
        return err.getvalue()
    return run


def raises(kind, call):
    def run(tmp, request):
        with pytest.raises(kind) as error:
            call(tmp, request)
        return str(error.value)
    return run


def snakemake_dry_run(tmp, request):
    """The DAG's start on config/config.yaml plus the row's config.yaml; its output, once it has failed."""
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp), "-n",
                          "--configfile", str(tmp / "config.yaml")], capture_output=True, text=True)
    assert run.returncode != 0
    assert "learning_rate" not in run.stdout + run.stderr, "1e-5 is a number: only lrm.steps is wrong"
    return run.stdout + run.stderr


def keep_all(candidates, t_cur, context):
    return 1e4 * candidates.flatten(1).mean(1)


def train_lpo_diverging(train_batch_size):
    """LPO with a huge learning rate: 6 kept tuples a round, so train_batch_size 6 diverges the policy in one
    optimizer step (the next round samples non-finite latents) and 2 makes the loss of step 2 non-finite."""
    def call(tmp, request):
        config = LPOConfig(samples_per_step=2, num_inference_steps=3, guidance_scale=2.0, threshold="constant",
                           threshold_min=0.01, threshold_max=0.01, lora_rank=2, learning_rate=HUGE,
                           sample_batch_size=2, train_batch_size=train_batch_size, rounds=2, checkpoint_every=10)
        train_step_po(request.getfixturevalue("base"), PROMPTS[:2], keep_all, config, 0, tmp / "out",
                      tmp / "m.json")
    return call


def train_lrm_diverging(tmp, request):
    config = LRMTrainConfig(model=LRMConfig(head_backend="reference"), steps=4, batch_size=4, learning_rate=HUGE,
                            warmup_steps=0, validate_every=10, checkpoint_every=10)
    train_lrm(request.getfixturevalue("base"), *request.getfixturevalue("prefs"), config, 3, tmp / "lrm")


def fit_diverging(tmp, request):
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 1), torch.randn(8, 4)
    config = SPMConfig(steps=5, batch_size=2, learning_rate=HUGE, warmup_steps=0, validate_every=10,
                       checkpoint_every=10)
    fit(model, lambda rows: (model(x[rows]) ** 2).mean(), lambda: {"accuracy": 0.0}, len(x), config, 0, "train spm")


def train_lrm_with(**settings):
    def call(tmp, request):
        config = LRMTrainConfig(model=LRMConfig(head_backend="reference"), steps=2, batch_size=4, **settings)
        train_lrm(request.getfixturevalue("base"), *request.getfixturevalue("prefs"), config, 3, tmp / "lrm")
    return call


def launch(*argv):
    """`python -m lpo.launch argv...`; its stderr, once it has failed."""
    def run(tmp, request):
        done = subprocess.run([sys.executable, "-m", "lpo.launch", *argv], capture_output=True, text=True, cwd=REPO)
        assert done.returncode != 0
        return done.stderr
    return run


# The Slurm profile with its partition line removed.
NO_PARTITION = "\n".join(line for line in (REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text()
                         .splitlines() if "slurm_partition:" not in line)


def slurm_run(tmp, request):
    """The DAG started (not dry-run) with the row's Slurm profile: it must stop before submitting anything, which
    on this machine without Slurm would fail anyway, later and less clearly."""
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp),
                          "--profile", str(tmp / "profile"), "--cores", "2"], capture_output=True, text=True)
    assert run.returncode != 0
    return run.stdout + run.stderr


def params(text):
    return cli("reward", "lrm", "--params", text, *LRM_IO)


def sample(*options):
    return cli("sample", *SAMPLE_IO, *options)


BAD_YAML = "lrm:\n  steps: 20\n learning_rate: 0.1\n"

ROWS = [
    # --params: the config schema, the key by its dotted path
    pytest.param({}, params('{"lrm": {"steps": "20"}}'), ["--params", "lrm.steps", "without quotes"],
                 id="params-number-as-string"),
    pytest.param({}, params('{"lrm": {"steps": 0}}'), ["--params", "lrm.steps = 0", ">= 1"], id="params-below-range"),
    pytest.param({}, params('{"lrm": {"model": {"guidance_scale": -1}}}'), ["lrm.model.guidance_scale", "> 0"],
                 id="params-nested-below-range"),
    pytest.param({}, params('{"lrm": {"stepz": 20}}'), ["unknown key(s) in lrm: stepz", "spelling", "steps"],
                 id="params-unknown-key"),
    pytest.param({}, params('{"lrm": {"model": {"head_backend": "cuda"}}}'),
                 ["lrm.model.head_backend", "use one of", "'triton'"], id="params-not-an-option"),
    pytest.param({}, params('{"seed": -1}'), ["seed = -1", ">= 0"], id="params-negative-seed"),
    pytest.param({}, params("[1, 2]"), ["--params must be a JSON object"], id="params-not-an-object"),
    pytest.param({}, params("{lrm: 1}"), ["--params is not valid JSON", "@config.yaml"], id="params-not-json"),
    pytest.param({}, params("@{tmp}/missing.yaml"), ["--params file", "missing.yaml", "does not exist"],
                 id="params-file-missing"),
    pytest.param({"bad.yaml": BAD_YAML}, params("@{tmp}/bad.yaml"), ["--params file", "bad.yaml, line 3", "indent"],
                 id="params-file-invalid-yaml"),
    pytest.param({"p.yaml": "lrm:\n  learning_rate: 1e-05\n  grad_clip: 1e+30\n  steps: twenty\n"},
                 params("@{tmp}/p.yaml"), ["lrm.steps = 'twenty'", "give a whole number"],
                 id="params-file-wrong-type"),
    # numeric options, range-checked as argparse parses them
    pytest.param({}, cli("--threads", "-2", "world", "prompts", "--out", "{tmp}/p.json"), ["--threads", ">= 1"],
                 id="threads-negative"),
    pytest.param({}, cli("--threads", "0", "world", "prompts", "--out", "{tmp}/p.json"), ["--threads", ">= 1"],
                 id="threads-zero"),
    pytest.param(PROMPTS_FILE, sample("--steps", "0"), ["--steps", ">= 1"], id="sample-steps-zero"),
    pytest.param(PROMPTS_FILE, sample("--steps", "-3"), ["--steps", ">= 1"], id="sample-steps-negative"),
    pytest.param(PROMPTS_FILE, sample("--images-per-prompt", "0"), ["--images-per-prompt", ">= 1"],
                 id="sample-no-images"),
    pytest.param(PROMPTS_FILE, sample("--guidance-scale", "-1"), ["--guidance-scale", ">= 0"],
                 id="sample-negative-guidance"),
    pytest.param(PROMPTS_FILE, sample("--guidance-scale", "nan"), ["--guidance-scale", "finite number >= 0"],
                 id="sample-nan-guidance"),
    pytest.param({"prompts.json": '{"eval_seen": ["a red circle", "  \\t "]}'}, sample(),
                 ["--prompts", "eval_seen[1]", "give every prompt some text"], id="sample-blank-prompt"),
    pytest.param({}, cli("reward", "lrm", *LRM_IO, "--mpcf-strategy", "7"), ["--mpcf-strategy", "choose from"],
                 id="lrm-unknown-mpcf-strategy"),
    pytest.param({}, cli("reward", "lrm", *LRM_IO, "--guidance-scale", "0"), ["--guidance-scale", "> 0"],
                 id="lrm-zero-guidance"),
    # config files: `lpo check-config` is where Snakemake's own errors on --configfile send a user
    pytest.param({}, cli("check-config", "{tmp}/nope.yaml"),
                 ["config file", "nope.yaml", "does not exist", "check the path"], id="config-file-missing"),
    pytest.param({"bad.yaml": BAD_YAML}, cli("check-config", "{tmp}/bad.yaml"),
                 ["config file", "bad.yaml, line 3", "indent"], id="config-file-invalid-yaml"),
    pytest.param({"c.yaml": "lrm:\n  learning_rate: 1e-5\n  stepz: 3\n"}, cli("check-config", "{tmp}/c.yaml"),
                 ["c.yaml", "unknown key(s) in lrm: stepz", "spelling"], id="config-file-unknown-key"),
    pytest.param({"c.yaml": "prompts:\n  eval_heldout: 100000\n"}, cli("check-config", "{tmp}/c.yaml"),
                 ["prompts.eval_heldout=100000", "held-out prompts", "world.heldout_pairs"],
                 id="config-file-more-prompts-than-the-world-has"),
    pytest.param({"config.yaml": "lrm:\n  learning_rate: 1e-5\n  steps: '20'\n"}, snakemake_dry_run,
                 ["config.yaml", "lrm.steps = '20'", "without quotes"], id="config-file-number-as-string"),
    pytest.param({"config.yaml": "resources:\n  rules:\n    world_jugde: {gpu: 1}\n"}, snakemake_dry_run,
                 ["resources.rules names rule(s) ['world_jugde']", "check the spelling", "world_judge"],
                 id="config-file-resources-of-an-unknown-rule"),
    # how a trainer's batches and precision are laid out (lpo.launch)
    pytest.param({"config.yaml": "lrm:\n  batch_size: 16\n  per_device_batch_size: 3\n"}, snakemake_dry_run,
                 ["lrm.batch_size = 16", "lrm.per_device_batch_size = 3 does not divide", "use a divisor of 16"],
                 id="config-file-batch-does-not-split"),
    pytest.param({}, raises(ValueError, train_lrm_with(per_device_batch_size=3)),
                 ["lrm.batch_size = 4", "lrm.per_device_batch_size = 3", "divisor of 4"],
                 id="lrm-batch-does-not-split"),
    pytest.param({}, raises(ValueError, train_lrm_with(mixed_precision="fp16")),
                 ["lrm.mixed_precision = 'fp16' needs a CUDA GPU", "'bf16' or 'no'"], id="fp16-without-a-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on this machine's GPU")),
    pytest.param({}, raises(ValueError, lambda tmp, request: check_precision("bf16", "cuda", False,
                                                                             "lpo.mixed_precision")),
                 ["lpo.mixed_precision = 'bf16'", "does not support bfloat16", "'fp16' or 'no'"],
                 id="bf16-on-a-gpu-without-it"),
    pytest.param({}, launch("--rule", "sd_reward_lrm", "--gpus", "64", "--", "sd", "reward-lrm"),
                 ["resources.rules.sd_reward_lrm.gpu = 64", "GPU(s) are visible", "run the job where 64 GPUs are"],
                 id="more-gpus-than-visible"),
    pytest.param({"profile/config.yaml": NO_PARTITION}, slurm_run, ["no slurm_partition for rule(s)", "world_judge", "default-resources"],
                 id="slurm-profile-without-a-partition"),
    # damaged outputs of earlier stages
    pytest.param({"judge/config.json": "{}", "judge/model.safetensors": "cut short"},
                 raises(CorruptInput, lambda tmp, request: load_judge(tmp / "judge")),
                 ["the judge's weights", "judge/model.safetensors", "damaged", "--forcerun world_judge"],
                 id="judge-weights-damaged"),
    pytest.param({"side/config.json": "{\"words\": [", "side/model.safetensors": ""},
                 raises(CorruptInput, lambda tmp, request: SideScorers.load(tmp / "side")),
                 ["the MPCF side scorers' config", "side/config.json", "--forcerun world_side_scorers"],
                 id="side-scorer-config-damaged"),
    # training that diverges: the stage, the step, the knob and the last finite loss
    pytest.param({}, raises(ValueError, train_lpo_diverging(6)),
                 ["t_cur=", "non-finite", "policy diverged", "lpo.learning_rate"], id="lpo-policy-diverged"),
    pytest.param({}, raises(FloatingPointError, train_lpo_diverging(2)),
                 ["LPO step-level DPO (round 1, optimizer step 2) loss is nan", "the last finite loss was 0.6931",
                  "learning_rate (now 1e+30)", "beta (now 500)"], id="lpo-loss-diverged"),
    pytest.param({}, raises(FloatingPointError, train_lrm_diverging),
                 ["LRM (step 2 of 4) loss is nan", "the last finite loss was", "lrm.learning_rate (now 1e+30)"],
                 id="lrm-loss-diverged"),
    pytest.param({}, raises(FloatingPointError, fit_diverging),
                 ["train spm (step 2 of 5) loss is", "the last finite loss was", "learning_rate (now 1e+30)"],
                 id="pair-training-loss-diverged"),
]


@pytest.mark.parametrize("inputs, run, needles", ROWS)
def test_bad_input_stops_naming_it_and_the_fix(inputs, run, needles, tmp_path, request):
    for name, text in inputs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    message = run(tmp_path, request)
    missing = [n for n in needles if n not in message]
    assert not missing, f"{missing} not in:\n{message}"
    assert "Traceback" not in message
    given = {Path(name).parts[0] for name in inputs}
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in given and p.name != ".snakemake")
    assert left == [], f"left behind: {left}"


def test_numbers_in_any_notation_are_numbers(tmp_path):
    """json.dumps writes 1e-05 and 1e+30; YAML 1.1 reads them as strings, lpo's loader as the numbers they are."""
    (tmp_path / "p.yaml").write_text("lrm:\n  learning_rate: 1e-05\n  grad_clip: 1e+30\n  weight_decay: 1E-4\n"
                                     "  steps: 20\nworld:\n  name: 1e5x\n")
    assert parse_params(f"@{tmp_path / 'p.yaml'}") == {
        "lrm": {"learning_rate": 1e-5, "grad_clip": 1e30, "weight_decay": 1e-4, "steps": 20},
        "world": {"name": "1e5x"}}
