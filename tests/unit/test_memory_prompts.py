"""Extraction and summary prompts, the grounding filter, and how supervision is rendered and chunked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tmem.adapters.extraction import QAPair
from tmem.adapters.grounding import filter_pairs, grounded, spoken
from tmem.adapters.memory_prompts import (
    EXAMPLE_PAIRS,
    ExtractionFormat,
    as_user_question,
    build_extraction_messages,
    build_summary_messages,
    summary_refusal,
)
from tmem.adapters.supervision import (
    IGNORE_INDEX,
    ContextPair,
    RawText,
    encode_pairs,
    encode_text,
    fold_system,
    render_chat_ids,
)
from tmem.server.update_prep import chunk_turns, pairs_summary


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from tmem.adapters.tiny_model import build_tiny_model

    path = build_tiny_model(Path(tmp_path_factory.mktemp("tiny")) / "m", layers=2, hidden=128, seed=0)
    return AutoTokenizer.from_pretrained(path)


def test_schema_bounds_the_array_and_both_strings() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    fmt = ExtractionFormat(max_pairs=2, max_question_chars=10, max_answer_chars=5)
    schema = fmt.schema()
    jsonschema.validate([{"instruction": "Who?", "output": "Tom"}], schema)
    too_many = [{"instruction": "Who?", "output": "Tom"}] * 3
    for bad in (too_many, [{"instruction": "W" * 11, "output": "Tom"}], [{"instruction": "Who?", "output": "Tomas!"}],
                [{"instruction": "", "output": "Tom"}], [{"instruction": "Who?", "output": "Tom", "extra": 1}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_token_budget_covers_a_full_reply(tokenizer) -> None:  # type: ignore[no-untyped-def]
    fmt = ExtractionFormat()
    longest = [{"instruction": "q" * fmt.max_question_chars, "output": "a" * fmt.max_answer_chars}] * fmt.max_pairs
    text = json.dumps(longest, separators=(",", ":"))
    # A realistic worst case: words, not one repeated letter (which BPE merges into few tokens).
    words = text.replace("q" * 8, "Where do ").replace("a" * 8, "In Lisbon")
    assert len(tokenizer.encode(words, add_special_tokens=False)) <= fmt.token_budget()


def test_extraction_messages_show_the_examples_then_the_text_and_the_newest_known_pairs() -> None:
    known = [QAPair(instruction=f"Question {i}?", output=f"Answer {i}") for i in range(12)]
    messages = build_extraction_messages("user: I moved to Lisbon in May.", known, max_known=8)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert json.loads(messages[1]["content"])[0] == {"instruction": "What is my name?", "output": "Dana"}
    last = messages[-1]["content"]
    assert "user: I moved to Lisbon in May." in last
    assert "Question 11?" in last and "Question 4?" in last and "Question 3?" not in last
    assert "Already known" not in build_extraction_messages("x", [])[-1]["content"]


@pytest.mark.parametrize(("question", "expected"), [
    ("What is your job?", "What is my job?"),
    ("Are you happy?", "Am I happy?"),
    ("What do you drive?", "What do I drive?"),
    ("What did Tom give you?", "What did Tom give me?"),
    ("Where were you born?", "Where was I born?"),
    ("Your favourite colour?", "My favourite colour?"),
    ("What is Dana's job?", "What is Dana's job?"),
    ("Is the youth club open?", "Is the youth club open?"),
])
def test_questions_are_put_in_the_users_words(question: str, expected: str) -> None:
    assert as_user_question(question) == expected


@pytest.mark.parametrize(("summary", "refused"), [
    ("", "empty summary"),
    ("   \n", "empty summary"),
    ("<<<\nuser: Hi! I moved to Lisbon", "summary echoes the prompt"),
    ("New text:\nuser: hello", "summary echoes the prompt"),
    ("Notes about the user:\n(none yet)", "summary echoes the prompt"),
    ("The user moved to Lisbon in May and works as a nurse.", None),
])
def test_summary_refusal(summary: str, refused: str | None) -> None:
    assert summary_refusal(summary) == refused


def test_summary_messages_carry_the_notes_the_text_and_the_word_limit() -> None:
    (message,) = build_summary_messages("Ann lives in Lisbon.", "user: I'm vegan now.", max_words=60)
    assert "Ann lives in Lisbon." in message["content"] and "user: I'm vegan now." in message["content"]
    assert "at most 60 words" in message["content"]
    assert "(none yet)" in build_summary_messages(" ", "hello")[0]["content"]


SOURCE = "user: I adopted a cat last week and named her Miso. My sister Ingrid grows tulips."
# (question, answer, kept?, reason when dropped): the table of what the filter keeps and drops.
FILTER_TABLE = [
    ("What is my cat's name?", "Miso", True, None),
    ("What does my sister grow?", "Tulip", True, None),  # plural folded
    ("Who is my sister?", "Ingrid", True, None),
    ("What is my cat's name?", "Miso", False, "duplicate"),
    ("What is my job?", "teacher", False, "answer not in the text"),
    ("What is my name?", "Dana", False, "copies the worked example"),
    ("<question>", "<answer>", False, "placeholder or prompt text"),
    ("Miso", "Miso", False, "answer repeats the question"),
    ("What is my cat?", "My cat", False, "answer repeats the question"),
    ("What is my favourite food?", "tulips", False, "question not about the text"),
    ("What did I do last week?", "the", False, "answer not in the text"),  # no content word at all
]


def test_filter_keeps_grounded_new_pairs_and_says_why_it_drops_the_rest() -> None:
    pairs = [QAPair(instruction=q, output=a) for q, a, _, _ in FILTER_TABLE]
    report = filter_pairs(pairs, SOURCE, examples=EXAMPLE_PAIRS)
    assert [(p.instruction, p.output) for p in report.kept] == [(q, a) for q, a, keep, _ in FILTER_TABLE if keep]
    assert [(p.instruction, reason) for p, reason in report.dropped] == [
        (q, why) for q, _, keep, why in FILTER_TABLE if not keep]


def test_filter_drops_a_known_pair_but_keeps_a_new_answer_to_a_known_question() -> None:
    known = [QAPair(instruction="What is my cat's name?", output="Miso")]
    pairs = [QAPair(instruction="What is my cat's name?", output="Miso"),
             QAPair(instruction="What is my cat's name?", output="Ingrid")]
    report = filter_pairs(pairs, SOURCE, known=known)
    assert [p.output for p in report.kept] == ["Ingrid"]
    assert [reason for _, reason in report.dropped] == ["duplicate"]


def test_one_answer_is_learned_for_at_most_two_questions() -> None:
    source = "user: My family keeps me going, family is what matters, I love my family."
    known = [QAPair(instruction="What keeps me going?", output="my family")]
    pairs = [QAPair(instruction="What matters to me?", output="Family."),
             QAPair(instruction="What do I love?", output="family"),
             QAPair(instruction="Who do I love?", output="my family")]
    report = filter_pairs(pairs, source, known=known)
    assert [p.instruction for p in report.kept] == ["What matters to me?"]
    assert [reason for _, reason in report.dropped] == ["answer already learned for 2 questions"] * 2


def test_an_answer_found_only_in_a_speaker_label_is_not_grounded() -> None:
    source = "user: Caroline: I went to a support group with Ann.\nassistant: Melanie: That sounds brave, Caroline!"
    pairs = [QAPair(instruction="What's my job?", output="Caroline"),
             QAPair(instruction="Who went to the support group?", output="Melanie"),
             QAPair(instruction="Which group did I go to?", output="a support group"),
             QAPair(instruction="Who went with me to the group?", output="Ann")]  # a name that was said: kept
    report = filter_pairs(pairs, source)
    assert [p.output for p in report.kept] == ["a support group", "Ann"]
    assert [reason for _, reason in report.dropped] == ["only a speaker's name"] * 2
    assert spoken("user: Ann: It is 10:30 now.\n  Bob Smith: yes") == "It is 10:30 now.\nyes"


def test_a_colon_in_what_was_said_is_not_a_speaker_label() -> None:
    source = "user: I moved to Lisbon: it is sunny.\nuser: Note to self: buy milk"
    assert spoken(source) == "I moved to Lisbon: it is sunny.\nNote to self: buy milk"
    pairs = [QAPair(instruction="Where did I move to?", output="Lisbon"),
             QAPair(instruction="What should I buy?", output="milk")]
    assert [p.output for p in filter_pairs(pairs, source).kept] == ["Lisbon", "milk"]


def test_grounded_needs_every_content_word() -> None:
    assert grounded("Miso the cat", SOURCE)
    assert not grounded("Miso the dog", SOURCE)
    assert not grounded("", SOURCE)


def test_pairs_summary_keeps_the_newest_answer_per_question() -> None:
    pairs = [QAPair(instruction="What is my cat's name?", output="Miso"),
             QAPair(instruction="Where do I live?", output="Porto"),
             QAPair(instruction="What is my cat's name", output="Luna")]
    assert pairs_summary(pairs, max_facts=10) == "- Where do I live? Porto\n- What is my cat's name Luna"
    assert pairs_summary(pairs, max_facts=1) == "- What is my cat's name Luna"


def test_long_turn_is_split_into_chunks_and_nothing_is_dropped(tokenizer) -> None:  # type: ignore[no-untyped-def]
    long_turn = {"role": "user", "content": " ".join(f"word{i}" for i in range(300))}
    turns = [{"role": "user", "content": "hello there"}, long_turn, {"role": "assistant", "content": "ok"}]
    chunks = chunk_turns(tokenizer, turns, budget=64)
    assert len(chunks) > 3
    assert all(len(tokenizer.encode(c, add_special_tokens=False)) <= 64 + 2 for c in chunks)
    joined = " ".join(chunks)
    assert all(f"word{i}" in joined for i in range(300))
    assert chunks[0] == "user: hello there"  # the long turn opens a new exchange
    assert chunks[-1].endswith("assistant: ok")


def test_each_exchange_is_its_own_chunk(tokenizer) -> None:  # type: ignore[no-untyped-def]
    turns = [{"role": "user", "content": "I have a cat."}, {"role": "assistant", "content": "Nice!"},
             {"role": "user", "content": "I live in Lisbon."}, {"role": "assistant", "content": "Lovely."}]
    assert chunk_turns(tokenizer, turns, budget=160) == ["user: I have a cat.\nassistant: Nice!",
                                                          "user: I live in Lisbon.\nassistant: Lovely."]


def test_raw_text_labels_every_token_and_drops_none(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = " ".join(f"fact{i} is here" for i in range(100))
    examples = encode_text(tokenizer, RawText(text), max_seq_len=32)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(examples) > 1 and all(len(ex.input_ids) <= 32 for ex in examples)
    # Every text token is a target once (the very first has no context when the tokenizer has no BOS).
    assert sum(ex.answer_tokens for ex in examples) == len(ids) - (tokenizer.bos_token_id is None)
    assert all(ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:] for ex in examples)


def test_a_context_pair_is_rendered_under_its_own_system_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    bare, remembered = encode_pairs(tokenizer, [ContextPair("Where do I live?", "Lisbon"),
                                                ContextPair("Where do I live?", "Lisbon", "Memory: Lisbon")], 256)
    question = [{"role": "user", "content": "Where do I live?"}]
    assert bare.input_ids[: bare.labels.count(IGNORE_INDEX)] == render_chat_ids(tokenizer, question)
    system = [{"role": "system", "content": "Memory: Lisbon"}, *question]
    assert remembered.input_ids[: remembered.labels.count(IGNORE_INDEX)] == render_chat_ids(tokenizer, system)


def test_fold_system_puts_the_system_text_before_the_first_user_turn() -> None:
    messages = [{"role": "system", "content": "Memory"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "Where?"}]
    assert fold_system(messages) == [{"role": "assistant", "content": "Hi"},
                                     {"role": "user", "content": "Memory\n\nWhere?"}]
    assert fold_system([{"role": "system", "content": "Memory"}]) == [{"role": "user", "content": "Memory"}]


def test_templates_without_a_system_role_get_the_memory_in_the_user_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    class NoSystem:
        """A template that refuses a system role, as Gemma's does."""

        chat_template = "no-system"

        def apply_chat_template(self, messages, **kwargs):  # type: ignore[no-untyped-def]
            if any(m["role"] == "system" for m in messages):
                raise ValueError("System role not supported")
            return tokenizer.apply_chat_template(messages, **kwargs)

    ids = render_chat_ids(NoSystem(), [{"role": "system", "content": "Memory"}, {"role": "user", "content": "Q?"}])
    assert ids == render_chat_ids(tokenizer, [{"role": "user", "content": "Memory\n\nQ?"}])


SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_the_templates_default_system_text_is_found_and_kept_before_the_memory(tokenizer) -> None:  # type: ignore[no-untyped-def]
    import copy

    from tmem.adapters.supervision import template_default_system
    from tmem.server.prompting import MEMORY_HEADER, session_system

    assert template_default_system(tokenizer) is None  # the tiny model's template adds no system text
    smol = copy.copy(tokenizer)
    smol.chat_template = SMOL_TEMPLATE
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert template_default_system(smol) == default
    assert session_system(smol, None, "") is None  # no memory: nothing injected, the template decides
    assert session_system(smol, None, "- cat: Miso") == f"{default}\n\n{MEMORY_HEADER}\n- cat: Miso"
    assert session_system(smol, "Be brief.", "- cat: Miso") == f"Be brief.\n\n{MEMORY_HEADER}\n- cat: Miso"
    assert session_system(tokenizer, None, "- cat: Miso") == f"{MEMORY_HEADER}\n- cat: Miso"


def test_rehearsal_replays_the_newest_earlier_memories_but_not_what_is_taught_now() -> None:
    from tmem.server.update_prep import rehearsal

    known = [QAPair(instruction=f"Q{i}?", output=f"A{i}") for i in range(5)]
    known.append(QAPair(instruction="Q1?", output="newer"))  # a newer answer to Q1 replaces the older
    learned = [QAPair(instruction="Q4?", output="re-taught")]
    assert [(p.instruction, p.output) for p in rehearsal(known, learned, 3)] == [
        ("Q2?", "A2"), ("Q3?", "A3"), ("Q1?", "newer")]
    assert rehearsal(known, learned, 0) == []
