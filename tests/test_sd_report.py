"""The SD worlds' report tables on fake scores: Table 2 and Table 18 forms as Markdown, CSV and LaTeX, each of our
rows beside the paper's row, HPS shown x100, scales in the headers, undecodable images counted."""
import numpy as np
import pytest
import yaml
from test_pickapic import read_rows

from lpo.evaluate.scorers import Scores
from lpo.tables import PAPER_NUMBERS
from lpo.sd.report import (ACCURACY, TABLE2_METRICS, SDEvaluation, paper_names, plot_table2, reward_model_row,
                           sample_folder_grid, table2, table2_cells, table18, write_sd_report)

RAW = {"pickscore": 21.0, "imagereward": 0.5, "hpsv2": 0.275, "hpsv2.1": 0.28, "aesthetic": 5.9}
HEADERS = [m.header for m in TABLE2_METRICS]


def fake(model: str, method: str, shift: float, skipped=(), n_prompts: int = 20, seed: int = 0,
         source: str = "ours") -> SDEvaluation:
    """Two images per prompt; `skipped` images failed to decode (NaN, listed by every scorer)."""
    rng = np.random.default_rng(seed)
    scores = {}
    for name, centre in RAW.items():
        scale = 0.01 if name.startswith("hps") else 1.0  # HPS scorers return the raw cosine
        values = centre + scale * (shift + rng.normal(0, 0.01, 2 * n_prompts))
        values[list(skipped)] = np.nan
        scores[name] = Scores(values, tuple(skipped))
    return SDEvaluation(model, method, scores, np.repeat(np.arange(n_prompts), 2), source)


def test_paper_names():
    assert paper_names("sd15", "diffusion_dpo") == ("SD1.5", "Diffusion-DPO")
    assert paper_names("sd21", "lpo") == ("SD2.1", "LPO with LRM-1.5")
    assert paper_names("sdxl", "original") == ("SDXL", "Original")
    with pytest.raises(ValueError):
        paper_names("sd3", "lpo")


def test_table2_puts_the_papers_row_after_ours_at_the_papers_scale():
    records = table2([fake("SD1.5", "Original", 0), fake("SD1.5", "LPO", 0.5, source="ours (official)"),
                      fake("SD1.5", "LPO", 0.6, seed=1, source="ours (trained here)"), fake("SD2.1", "Original", 0)],
                     n_bootstrap=200)
    assert [(r["method"], r["source"]) for r in records] == [
        ("Original", "ours"), ("Original", "paper, [FT] Table 2"), ("LPO", "ours (official)"),
        ("LPO", "ours (trained here)"), ("LPO", "paper, [FT] Table 2"), ("Original", "ours"),
        ("Original", "paper, [FT] Table 4")]
    ours = records[0]["metrics"]
    assert ours["HPSv2 (cos x100)"].mean == pytest.approx(27.5, abs=0.05)  # raw cosine 0.275, shown x100
    assert ours["PickScore (~100*cos)"].low < ours["PickScore (~100*cos)"].mean < ours["PickScore (~100*cos)"].high
    assert records[1]["metrics"]["PickScore (~100*cos)"] == 20.56 and records[6]["metrics"]["HPSv2 (cos x100)"] == 27.05
    cells = table2_cells(records)
    assert cells[1]["ImageReward (standardised)"] == "0.0076" and cells[1]["Images scored"] == "-"
    assert cells[0]["Aesthetic (1-10)"].count("[") == 1


def test_a_row_the_paper_lacks_is_marked(tmp_path):
    records = table2([fake("SDXL", "LPO with LRM-1.5", 0), fake("SD2.1", "SPO", 0)], n_bootstrap=50)
    assert records[1]["source"] == "paper, [FT] Table 4"
    assert records[1]["metrics"]["PickScore (~100*cos)"] == 20.82
    assert records[3]["source"] == "paper: no such row"
    assert all(v is None for v in records[3]["metrics"].values())
    numbers = yaml.safe_load(PAPER_NUMBERS.read_text())
    only_table2 = tmp_path / "numbers.yaml"
    only_table2.write_text(yaml.safe_dump({"table2_main_results": numbers["table2_main_results"]}))
    assert table2([fake("SD2.1", "Original", 0)], 50, paper_numbers=only_table2)[1]["source"] == "paper: no such row"


def test_mismatched_scores_are_refused():
    bad = fake("SD1.5", "LPO", 0)
    bad = SDEvaluation(bad.model, bad.method, bad.scores, bad.prompt_index[:-1])
    with pytest.raises(ValueError, match="40 pickscore scores but 39 prompt indices"):
        table2([bad])


def test_write_sd_report_in_three_formats(tmp_path):
    evaluations = [fake("SD1.5", "Original", 0, skipped=(3, 17)), fake("SD1.5", "LPO", 0.5)]
    reward = [{"model": "LRM-1.5 (t = 0)", "split": "validation_unique+test_unique", "timestep": 1,
               "accuracy_label": 0.6512, "label_low": 0.64, "label_high": 0.66, "pairs_label": 1200,
               "aesthetic_corr": 0.12, "clipscore_corr": 0.35, "vqascore_corr": float("nan")},
              {"model": "our PickScore", "paper_model": "PickScore", "accuracy_label": 0.70, "label_low": 0.69,
               "label_high": 0.71, "pairs_label": 1200, "aesthetic_corr": 0.05, "clipscore_corr": 0.5,
               "vqascore_corr": 0.4},
              {"model": "HPSv2", "accuracy_label": 0.64, "aesthetic_corr": 0.0, "clipscore_corr": 0.6}]
    write_sd_report(tmp_path, "sd15", evaluations, reward, n_bootstrap=100, setup=["Prompts: twenty."])
    report = (tmp_path / "table2.md").read_text()
    assert "Prompts: twenty." in report
    lines = report.splitlines()
    ours = next(i for i, line in enumerate(lines) if line.startswith("| SD1.5 | Original | ours |"))
    assert lines[ours + 1].startswith("| SD1.5 | Original | paper, [FT] Table 2 | 20.56 | 0.0076 | 26.46 | 24.05 | "
                                      "5.468 |")
    assert "| 38 | 2 |" in lines[ours] and "SD1.5 Original (ours): 2" in report
    assert all(header in report for header in HEADERS)
    assert "PickScore: logit_scale.exp() * cos" in report and "tables show x100" in report

    rows = read_rows(tmp_path / "table2.csv")
    assert [r["source"] for r in rows] == ["ours", "paper, [FT] Table 2", "ours", "paper, [FT] Table 2"]
    assert float(rows[0]["HPSv2.1 (cos x100)"]) == pytest.approx(28.0, abs=0.05)
    assert float(rows[0]["HPSv2.1 (cos x100) 95% low"]) < float(rows[0]["HPSv2.1 (cos x100)"])
    assert rows[0]["skipped_undecodable"] == "2" and rows[1]["PickScore (~100*cos)"] == "20.56"
    assert rows[1]["PickScore (~100*cos) 95% low"] == ""

    tex = (tmp_path / "table2.tex").read_text()
    assert r"\toprule" in tex and "20.56" in tex and r"HPSv2 (cos x100)" in tex and r"\label{tab:sd15-table2}" in tex

    table18 = read_rows(tmp_path / "table18.csv")
    assert [(r["model"], r["source"]) for r in table18] == [
        ("LRM-1.5 (t = 0)", "ours"), ("LRM-1.5 (t = 0)", "paper, [FT] Table 18"), ("our PickScore", "ours"),
        ("PickScore", "paper, [FT] Table 18"), ("HPSv2", "ours"), ("HPSv2", "paper: not transcribed")]
    assert float(table18[0][ACCURACY]) == pytest.approx(65.12) and table18[1][ACCURACY] == "65.46"
    assert table18[0]["VQA-Corr (Pearson r of gaps)"] == "" and table18[3]["Aes-Corr (Pearson r of gaps)"] == "0.066"
    assert "| LRM-1.5 (t = 0) | ours | 0.120 | 0.350 | - | 65.12 [64.00, 66.00] | 1200 |" in (
        tmp_path / "table18.md").read_text()
    assert r"Val-Test accuracy (\%)" in (tmp_path / "table18.tex").read_text()


def test_reward_model_row_counts_decided_pairs_and_ties_of_scores_half():
    row = reward_model_row("LRM-1.5 trained (t = 0)", "LRM-1.5 (t = 0)", np.array([1.0, 0.0, 2.0, 5.0, 3.0]),
                           np.array([0.0, 1.0, 2.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0, 0.5, 0.0]), 200)
    # pairs 0-2 and 4 are decided: right, wrong, tied scores (half), wrong
    assert row["accuracy_label"] == pytest.approx(1.5 / 4) and row["pairs_label"] == 4
    assert row["label_low"] <= row["accuracy_label"] <= row["label_high"]
    records = table18([row])
    assert [r["source"] for r in records] == ["ours", "paper, [FT] Table 18"]
    assert records[0][ACCURACY].mean == pytest.approx(37.5)
    with pytest.raises(ValueError, match="no decided pair"):
        reward_model_row("x", "x", np.zeros(2), np.zeros(2), np.full(2, 0.5))


def test_plot_and_sample_grid(tmp_path):
    from lpo.evaluate.scorers.sample_folder import save_image, write_index
    rng = np.random.default_rng(0)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(4):
        save_image(folder, i, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (folder / "00003.png").write_bytes(b"not a png")
    write_index(folder, [{"prompt": f"p{i // 2}", "prompt_index": i // 2, "image_index": i % 2, "seed": 42 + i % 2}
                         for i in range(4)])
    sample_folder_grid(folder, tmp_path / "grid.png", 2)
    plot_table2(tmp_path / "table2.png", [fake("SD1.5", "Original", 0), fake("SD1.5", "LPO", 0.5)],
                ["original", "lpo"], n_bootstrap=50)
    for name in ("grid.png", "table2.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
