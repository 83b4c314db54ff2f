import shutil

import open_clip
import pytest
from transformers import CLIPTokenizer

from lpo.world.grammar import Grammar, Vocabulary
from lpo.world.tokenizer import BOS, EOS, MAX_LENGTH, build_clip_tokenizer

ODD = ["Hello, WORLD!!! It's 2024; isn't it?", "RGB(255,0,0) & #00FF00 -- 3.14159 x 42",
       "   lots   of\twhitespace\nand a newline ", "", "a " * 100 + "prompt longer than the context"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def _prompts() -> list[str]:
    scenes = Grammar(Vocabulary(), heldout_pairs=0, seed=0).scenes()
    return [s.prompt for s in scenes[::len(scenes) // 5]] + ODD


def _open_clip_ids(prompts: list[str]) -> list[list[int]]:
    """open_clip's ids, padded with <|endoftext|> instead of 0, as Stable Diffusion's tokenizer pads."""
    rows = open_clip.tokenizer.SimpleTokenizer()(prompts, context_length=MAX_LENGTH).tolist()
    eos = open_clip.tokenizer.SimpleTokenizer().eot_token_id
    return [row[:row.index(eos) + 1] + [eos] * (MAX_LENGTH - row.index(eos) - 1) for row in rows]


def _ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids


def test_vocabulary_is_clips(tokenizer):
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, EOS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    assert tokenizer.model_max_length == MAX_LENGTH


def test_ids_match_open_clip(tokenizer):
    prompts = _prompts()
    assert _ids(tokenizer, prompts) == _open_clip_ids(prompts)


def test_every_world_prompt_fits_the_context(tokenizer):
    # The default vocabulary is every value the renderer draws: no configured world has a longer prompt.
    lengths = [len(tokenizer(s.prompt).input_ids) for s in Grammar(Vocabulary(), heldout_pairs=0, seed=0).scenes()]
    assert max(lengths) <= MAX_LENGTH


def test_sd_layout_files_alone_give_the_same_ids(tokenizer, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(tokenizer.name_or_path, folder)
    (folder / "tokenizer.json").unlink()
    assert {"vocab.json", "merges.txt"} <= {p.name for p in folder.iterdir()}
    rebuilt = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert _ids(rebuilt, _prompts()) == _ids(tokenizer, _prompts())
