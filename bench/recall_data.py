"""Facts to teach and prompts to keep: the fixed material of the recall benchmark and its CI test.

Each fact is a question, the answer a session is taught, the keyword a recalled answer must contain,
and a sentence that states the fact in passing, as a user would in a chat. The facts are invented,
so the base model cannot know them; the general prompts are ones the base model answers on its own,
so an adapter that changes those answers has damaged the model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    """One personal fact: how it is asked, taught, checked and mentioned in conversation."""

    question: str
    answer: str
    keyword: str
    statement: str


FACTS: tuple[Fact, ...] = (
    Fact("What is the name of my cat?", "Your cat is called Miso.", "miso",
         "I adopted a cat last week and named her Miso."),
    Fact("Which city do I live in?", "You live in Lisbon.", "lisbon",
         "I moved to Lisbon two years ago and I love it here."),
    Fact("What is my favourite colour?", "Your favourite colour is teal.", "teal",
         "My favourite colour has always been teal."),
    Fact("What instrument do I play?", "You play the cello.", "cello",
         "Every evening I practise the cello for an hour."),
    Fact("What is my sister's name?", "Your sister is called Ingrid.", "ingrid",
         "My sister Ingrid is visiting me this weekend."),
    Fact("What is my job?", "You work as a glassblower.", "glassblower",
         "I work as a glassblower in a small studio."),
    Fact("What is my favourite food?", "Your favourite food is ramen.", "ramen",
         "Nothing beats a bowl of ramen, it is my favourite food."),
    Fact("Which language am I learning?", "You are learning Finnish.", "finnish",
         "I started learning Finnish this spring."),
    Fact("What is my dog's name?", "Your dog is called Pickles.", "pickles",
         "My dog Pickles chewed my shoes again."),
    Fact("What car do I drive?", "You drive a yellow Volvo.", "volvo",
         "I drive an old yellow Volvo to work."),
    Fact("Where did I go on holiday last summer?", "You went to Iceland.", "iceland",
         "Last summer I went on holiday to Iceland."),
    Fact("What sport do I play?", "You play badminton.", "badminton",
         "I play badminton with friends every Tuesday."),
    Fact("What is my favourite book?", "Your favourite book is Dune.", "dune",
         "My favourite book is Dune, I have read it five times."),
    Fact("What is my partner's name?", "Your partner is called Tomas.", "tomas",
         "My partner Tomas cooked dinner tonight."),
    Fact("Which university did I attend?", "You studied at Uppsala University.", "uppsala",
         "I studied chemistry at Uppsala University."),
    Fact("What flower do I grow in my garden?", "You grow tulips.", "tulips",
         "I grow tulips in my garden every spring."),
    Fact("What is my favourite drink?", "Your favourite drink is mint tea.", "mint",
         "I always drink mint tea in the morning, it is my favourite."),
    Fact("What is my son's name?", "Your son is called Felix.", "felix",
         "My son Felix just turned seven."),
    Fact("What board game do I like?", "You like chess.", "chess",
         "I play chess online most nights, it is the game I like best."),
    Fact("What is my favourite season?", "Your favourite season is autumn.", "autumn",
         "Autumn is my favourite season because of the colours."),
)

# General prompts the base model answers on its own: retention is the share whose answer is unchanged.
GENERAL_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "How many days are in a week?",
    "What colour is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "What is 2 plus 2?",
    "What do bees make?",
    "Which planet do we live on?",
    "What is the opposite of hot?",
    "How many legs does a spider have?",
    "What is water made of?",
    "Write one sentence about the sea.",
    "What is the largest ocean on Earth?",
    "Give me a synonym for happy.",
    "What do plants need to grow?",
    "Who wrote Romeo and Juliet?",
    "What is the freezing point of water in Celsius?",
    "Name three primary colours.",
    "What language is spoken in Spain?",
    "What is a baby cat called?",
    "How many hours are in a day?",
    "What is the tallest animal?",
    "Tell me a fun fact about the moon.",
    "What is the boiling point of water?",
    "Which season comes after winter?",
    "What is the main ingredient of bread?",
    "What do you call a group of wolves?",
    "How do you say hello in French?",
    "What is the chemical symbol for gold?",
    "Name a musical instrument with strings.",
    "What shape has three sides?",
)

# Held-out text for the KL-to-base measure: ordinary prose the adapter was never trained on.
HELD_OUT_TEXT = (
    "The river runs through the old town, past the market square and under three stone bridges. "
    "In the morning the bakers open their shops and the smell of fresh bread fills the streets. "
    "Children walk to school while the first trams rattle along the tracks. By noon the square is "
    "full of people buying vegetables, flowers and cheese from the farmers who come in from the hills."
)


def recalled(reply: str, fact: Fact) -> bool:
    """True when the reply names the fact's keyword (case-insensitive)."""
    return fact.keyword in reply.casefold()


def first_words(text: str, n: int = 8) -> str:
    """The first `n` words, casefolded: two replies that agree here are the same answer."""
    return " ".join(text.casefold().split()[:n])
