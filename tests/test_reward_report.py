"""The reward report's ablation tables: which LRM belongs to which of paper Tables 7 and 8."""
from lpo.reward.report import lrm_ablation_rows, training_summary


def lrm_metrics(strategy: int, scale: float) -> dict:
    return {"mpcf": {"strategy": strategy}, "guidance_scale": scale, "train_pairs": 10, "best_step": 5,
            "best_validation_accuracy": 0.6, "train_seconds": 2.04}


def test_main_lrm_is_in_both_ablations_and_variants_in_one():
    metrics = {"LRM": lrm_metrics(2, 7.5), "LRM ablation mpcf0": lrm_metrics(0, 7.5),
               "LRM ablation vfe1": lrm_metrics(2, 1.0)}
    table18 = [{"model": name, "pair_type": t} for name in [*metrics, "SPM"] for t in ("all", "same_source")]
    rows = lrm_ablation_rows(table18, metrics, main_strategy=2, main_scale=7.5)
    by_table = {(r["varied"], r["model"]) for r in rows}
    assert by_table == {("strategy", "LRM"), ("guidance_scale", "LRM"), ("strategy", "LRM ablation mpcf0"),
                        ("guidance_scale", "LRM ablation vfe1")}


def test_training_summary_reports_accuracy_and_seconds():
    summary = training_summary({"LRM": lrm_metrics(2, 7.5)}, {"best_validation_accuracy": 0.7, "train_seconds": 3},
                               {"best_validation_accuracy": 0.65, "train_seconds": 4})
    assert summary["LRM"]["best_validation_accuracy"] == 0.6 and summary["LRM"]["seconds"] == 2.0
    assert summary["SPM"] == {"best_validation_accuracy": 0.65, "seconds": 4}
