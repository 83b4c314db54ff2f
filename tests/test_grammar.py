import math

import pytest

from lpo.world.grammar import ATTRIBUTES, COLORS, SHAPES, Grammar, Scene, Vocabulary

SMALL = Vocabulary(sizes=("small", "large"), colors=("red", "blue", "green"), shapes=("circle", "square", "cross"),
                   backgrounds=("gray", "black"), positions=("left", "center"))


def test_scene_count_is_product_of_vocabulary_sizes():
    for vocabulary in (Vocabulary(), SMALL):
        grammar = Grammar(vocabulary, heldout_pairs=2, seed=0)
        expected = math.prod(len(vocabulary.values(a)) for a in ATTRIBUTES)
        assert len(grammar.scenes()) == len(set(grammar.scenes())) == expected


def test_heldout_and_seen_partition_the_scenes():
    grammar = Grammar(Vocabulary(), heldout_pairs=8, seed=3)
    seen, heldout = set(grammar.seen_scenes()), set(grammar.heldout_scenes())
    assert seen.isdisjoint(heldout)
    assert seen | heldout == set(grammar.scenes())
    assert len(grammar.heldout_pairs) == 8
    assert {(s.color, s.shape) for s in heldout} == grammar.heldout_pairs
    assert all(not grammar.is_heldout(s) for s in seen)


def test_every_colour_and_shape_stays_seen_when_many_pairs_are_held_out():
    # 29 of 40: the most that the greedy draw can reach for every seed (11 seen pairs in the worst case).
    grammar = Grammar(Vocabulary(), heldout_pairs=29, seed=1)
    seen = grammar.seen_scenes()
    assert {s.color for s in seen} == set(COLORS)
    assert {s.shape for s in seen} == set(SHAPES)


def test_parse_inverts_prompt():
    grammar = Grammar(SMALL, heldout_pairs=1, seed=0)
    for scene in grammar.scenes():
        assert grammar.parse(scene.prompt) == scene
    default = Grammar(Vocabulary(), heldout_pairs=1, seed=0)
    for scene in default.scenes()[::97]:
        assert default.parse(scene.prompt) == scene


def test_prompt_reads_as_the_paper_example():
    scene = Scene("small", "red", "triangle", "gray", "left")
    assert scene.prompt == "a small red triangle on a gray background, on the left"


@pytest.mark.parametrize("prompt", ["a small red triangle", "a photo of a cat",
                                    "a small purple circle on a gray background, on the left"])
def test_parse_rejects_prompts_outside_the_grammar(prompt):
    with pytest.raises(ValueError, match="not a sentence"):
        Grammar(SMALL, heldout_pairs=0, seed=0).parse(prompt)


def test_empty_vocabulary_list_names_its_key():
    with pytest.raises(ValueError, match="world.vocabulary.colors"):
        Vocabulary(colors=())


def test_unknown_and_repeated_values_raise():
    with pytest.raises(ValueError, match="magenta"):
        Vocabulary(colors=("red", "magenta"))
    with pytest.raises(ValueError, match="world.vocabulary.shapes"):
        Vocabulary(shapes=("circle", "circle"))
    with pytest.raises(ValueError, match="unknown key"):
        Vocabulary.from_dict({"colours": ["red"]})


def test_too_many_heldout_pairs_raise():
    tiny = Vocabulary(colors=("red", "blue"), shapes=("circle", "square"))
    with pytest.raises(ValueError, match="too many"):
        Grammar(tiny, heldout_pairs=3, seed=0)  # holding 3 of 4 pairs out would leave a colour or shape unseen
    with pytest.raises(ValueError, match="heldout_pairs"):
        Grammar(tiny, heldout_pairs=4, seed=0)
    with pytest.raises(ValueError, match="heldout_pairs"):
        Grammar(tiny, heldout_pairs=-1, seed=0)
    assert len(Grammar(tiny, heldout_pairs=2, seed=0).heldout_pairs) == 2


def test_heldout_set_depends_on_seed_only():
    first = Grammar(Vocabulary(), heldout_pairs=6, seed=7).heldout_pairs
    assert Grammar(Vocabulary(), heldout_pairs=6, seed=7).heldout_pairs == first
    others = {Grammar(Vocabulary(), heldout_pairs=6, seed=s).heldout_pairs for s in range(8, 12)}
    assert any(other != first for other in others)
