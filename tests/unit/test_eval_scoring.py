"""Scoring rules for LoCoMo / LongMemEval: every expected value below was worked out by hand."""

from __future__ import annotations

import json

import pytest

from tmem.bench.eval.scoring import (
    ScoreTable,
    exact_match,
    judge_messages,
    locomo_em,
    locomo_f1,
    normalize_answer,
    parse_judge,
    porter_stem,
    token_f1,
    tokens,
)

# Known stems of nltk's PorterStemmer() (default NLTK_EXTENSIONS mode), which LoCoMo's scorer uses:
# Porter's own examples, the NLTK documentation's examples and the irregular-forms table.
PORTER_CASES = [
    ("caresses", "caress"), ("ponies", "poni"), ("cats", "cat"), ("running", "run"),
    ("happily", "happili"), ("relational", "relat"), ("generalization", "gener"), ("hopeful", "hope"),
    ("agreed", "agre"), ("feed", "feed"), ("plastered", "plaster"), ("motoring", "motor"),
    ("sing", "sing"), ("hopping", "hop"), ("falling", "fall"), ("hissing", "hiss"), ("fizzed", "fizz"),
    ("failing", "fail"), ("filing", "file"), ("conditional", "condit"), ("goodness", "good"),
    ("adjustment", "adjust"), ("effective", "effect"), ("controll", "control"), ("roll", "roll"),
    ("flies", "fli"), ("dies", "die"), ("mules", "mule"), ("denied", "deni"), ("died", "die"),
    ("owned", "own"), ("humbled", "humbl"), ("sized", "size"), ("meeting", "meet"), ("stating", "state"),
    ("siezing", "siez"), ("itemization", "item"), ("sensational", "sensat"), ("traditional", "tradit"),
    ("reference", "refer"), ("colonizer", "colon"), ("plotted", "plot"), ("happy", "happi"),
    ("enjoy", "enjoy"), ("sky", "sky"), ("dying", "die"), ("news", "news"), ("is", "is"),
    ("Running", "run"), ("adoption", "adopt"), ("agencies", "agenc"), ("likely", "like"),
    ("counseling", "counsel"), ("certification", "certif"), ("psychology", "psycholog"),
]  # fmt: skip


@pytest.mark.parametrize(("word", "stem"), PORTER_CASES)
def test_porter_stem_matches_nltk_default_mode(word: str, stem: str) -> None:
    assert porter_stem(word) == stem


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower, Paris!", "eiffel tower paris"),
        ("A cat and a dog.", "cat dog"),
        ("Anne and Andy", "anne andy"),  # only whole words a/an/and go, not the "an" in "Anne"
        ("  Hello   World  ", "hello world"),
        ("self-care (daily)", "selfcare daily"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_tokens_are_normalized_then_stemmed() -> None:
    assert tokens("The dogs are running") == ["dog", "are", "run"]


LOCOMO_CASES = [
    # (prediction, gold, category, expected F1, expected EM)
    # category 1, multi-hop: mean over gold comma-parts of the best score against any predicted part
    ("Psychology, counseling certification", "Psychology, counseling certification", 1, 1.0, 1.0),
    ("counseling certification, psychology", "Psychology, counseling certification", 1, 1.0, 1.0),
    ("psychology", "Psychology, counseling certification", 1, 0.5, 0.5),
    # one predicted part {psycholog, counsel}: F1 vs "psychology" 2/3, vs "counseling certification" 1/2;
    # it equals neither part's token set
    ("Psychology and counseling", "Psychology, counseling certification", 1, 7 / 12, 0.0),
    ("2", 2, 1, 1.0, 1.0),
    ("", "Psychology, counseling certification", 1, 0.0, 0.0),
    # category 2, temporal: plain token F1, integer golds compared as text
    ("7 May 2023", "7 May 2023", 2, 1.0, 1.0),
    ("In 2022", 2022, 2, 2 / 3, 0.0),  # P = 1/2, R = 1
    ("2022", 2022, 2, 1.0, 1.0),
    ("June 2023", "The week before 9 June 2023", 2, 4 / 7, 0.0),  # P = 1, R = 2/5
    ("2023", 2022, 2, 0.0, 0.0),
    # category 3, open-domain: only the gold text before the first ";"
    ("Likely no", "Likely no; though she likes reading, she wants to be a counselor", 3, 1.0, 1.0),
    ("Likely no", "Likely no; since this one went badly", 3, 1.0, 1.0),
    ("No", "Likely no; since this one went badly", 3, 2 / 3, 0.0),  # P = 1, R = 1/2
    ("National park", "National park; she likes the outdoors", 3, 1.0, 1.0),
    ("she likes the outdoors", "National park; she likes the outdoors", 3, 0.0, 0.0),
    # category 4, single-hop: plain token F1 after normalization and stemming
    ("Adoption agencies", "adoption agencies", 4, 1.0, 1.0),
    ("The adoption agencies.", "Adoption agencies", 4, 1.0, 1.0),
    ("She researched adoption agencies in May", "Adoption agencies", 4, 0.5, 0.0),  # P = 2/6, R = 1
    ("The Eiffel Tower!", "eiffel tower", 4, 1.0, 1.0),
    ("running", "run", 4, 1.0, 1.0),
    ("", "Single", 4, 0.0, 0.0),
    # category 5, adversarial: credit only for declining in one of two phrases
    ("No information available.", "self-care is important", 5, 1.0, 1.0),
    ("That was not mentioned in the conversation", "self-care is important", 5, 1.0, 1.0),
    ("NOT MENTIONED", "Yes", 5, 1.0, 1.0),
    ("Not mentioned.", "Yes", 5, 1.0, 1.0),
    ("Self-care is important", "self-care is important", 5, 0.0, 0.0),
    ("Yes", "Yes", 5, 0.0, 0.0),
    ("I don't know", "Yes", 5, 0.0, 0.0),
]


@pytest.mark.parametrize(("prediction", "gold", "category", "f1", "em"), LOCOMO_CASES)
def test_locomo_f1_and_em(prediction: str, gold: str | int, category: int, f1: float, em: float) -> None:
    assert locomo_f1(prediction, gold, category) == pytest.approx(f1)
    assert locomo_em(prediction, gold, category) == pytest.approx(em)


def test_category_may_be_given_as_text() -> None:
    assert locomo_f1("In 2022", 2022, "2") == pytest.approx(2 / 3)


def test_unknown_category_is_refused() -> None:
    with pytest.raises(ValueError, match=r"1\.\.5"):
        locomo_f1("x", "x", 6)


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("She researched adoption agencies in May", "Adoption agencies", 0.5),
        ("", "", 0.0),  # nothing shared, not a division by zero
        ("Paris", "London", 0.0),
    ],
)
def test_token_f1(prediction: str, gold: str, expected: float) -> None:
    assert token_f1(prediction, gold) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower!", 1.0),
        ("tower eiffel", "eiffel tower", 1.0),  # LoCoMo compares token sets
        ("Eiffel Tower in Paris", "Eiffel Tower", 0.0),
        ("runs", "running", 1.0),
        ("", "Single", 0.0),
    ],
)
def test_exact_match(prediction: str, gold: str, expected: float) -> None:
    assert exact_match(prediction, gold) == expected


def _filled_table() -> ScoreTable:
    table = ScoreTable()
    table.add("tmem", 1, f1=1.0, em=1.0)
    table.add("tmem", 1, f1=0.5, em=0.0)
    table.add("tmem", 2, f1=0.0, em=0.0)
    table.add("baseline", 1, f1=0.25, em=0.0)
    return table


def test_score_table_means_per_category_and_overall() -> None:
    result = _filled_table().to_dict()
    assert result["metrics"] == ["f1", "em"]
    tmem = result["modes"]["tmem"]
    assert tmem["1"] == {"n": 2, "f1": 0.75, "em": 0.5}
    assert tmem["2"] == {"n": 1, "f1": 0.0, "em": 0.0}
    # Overall pools questions (micro average), it does not average the category means.
    assert tmem["all"] == pytest.approx({"n": 3, "f1": 0.5, "em": 1 / 3})
    assert result["modes"]["baseline"]["all"] == {"n": 1, "f1": 0.25, "em": 0.0}
    assert json.loads(json.dumps(result)) == result


def test_score_table_renders_one_line_per_mode_and_category() -> None:
    lines = _filled_table().render().splitlines()
    assert lines[0].split() == ["mode", "category", "n", "f1", "em"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert [line.split() for line in lines[2:]] == [
        ["tmem", "1", "2", "0.7500", "0.5000"],
        ["tmem", "2", "1", "0.0000", "0.0000"],
        ["tmem", "all", "3", "0.5000", "0.3333"],
        ["baseline", "1", "1", "0.2500", "0.0000"],
        ["baseline", "all", "1", "0.2500", "0.0000"],
    ]


def test_score_table_orders_numeric_categories_before_question_types() -> None:
    table = ScoreTable()
    for category in ("multi-session", "10", 2):
        table.add("m", category, judge=1.0)
    assert list(table.to_dict()["modes"]["m"]) == ["2", "10", "multi-session", "all"]


def test_score_table_averages_each_metric_over_the_questions_that_have_it() -> None:
    table = ScoreTable()
    table.add("m", 4, f1=1.0)
    table.add("m", 4, f1=0.0, judge=1.0)
    assert table.to_dict()["modes"]["m"]["4"] == {"n": 2, "f1": 0.5, "judge": 1.0}
    table.add("m", 5, f1=1.0)
    assert table.render().splitlines()[-2].split() == ["m", "5", "1", "1.0000", "-"]


def test_score_table_add_locomo_scores_f1_and_em() -> None:
    table = ScoreTable()
    table.add_locomo("tmem", 2, "In 2022", 2022)
    table.add_locomo("tmem", 5, "Not mentioned in the conversation", "Yes")
    modes = table.to_dict()["modes"]
    assert modes["tmem"]["2"] == pytest.approx({"n": 1, "f1": 2 / 3, "em": 0.0})
    assert modes["tmem"]["5"] == {"n": 1, "f1": 1.0, "em": 1.0}


@pytest.mark.parametrize(
    ("question_type", "abstention", "marker"),
    [
        ("single-session-user", False, "Correct Answer: Lisbon"),
        ("multi-session", False, "only contains a subset"),
        ("temporal-reasoning", False, "off-by-one"),
        ("knowledge-update", False, "updated answer"),
        ("single-session-preference", False, "Rubric: Lisbon"),
        ("knowledge-update", True, "Explanation: Lisbon"),
        (4, False, "Correct Answer: Lisbon"),  # a LoCoMo category gets the plain prompt
    ],
)
def test_judge_messages_pick_the_prompt_for_the_question_type(
    question_type: str | int, abstention: bool, marker: str
) -> None:
    messages = judge_messages("Where do I live now?", "Lisbon", "You live in Porto.", question_type, abstention)
    assert len(messages) == 1
    assert messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert marker in content
    assert "Question: Where do I live now?" in content
    assert "Model Response: You live in Porto." in content
    assert content.endswith("Answer yes or no only.")
    assert ("unanswerable" in content) == abstention


def test_judge_messages_format_integer_golds() -> None:
    content = judge_messages("How many days?", 12, "12 days", "temporal-reasoning")[0]["content"]
    assert "Correct Answer: 12\n" in content


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("yes", True),
        ("Yes.", True),
        ("YES", True),
        (" yes, the response is correct", True),
        ("The answer is yes", True),
        ("no", False),
        ("No.", False),
        ("No, though it says yes elsewhere", False),
        ("The eyes have it", False),
        ("", False),
    ],
)
def test_parse_judge(reply: str, verdict: bool) -> None:
    assert parse_judge(reply) is verdict
