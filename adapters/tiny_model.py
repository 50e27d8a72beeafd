"""A tiny random-weight Llama model with a locally trained tokenizer, for tests and benchmarks.

No model weights can be downloaded where the tests run, so the suite builds its own base model:
Llama architecture (what vLLM, transformers and PEFT all support), head_dim 64 (vLLM's CPU attention
rejects smaller heads), a byte-level BPE trained here on a synthetic English corpus, and a ChatML
chat template. The same seed always gives byte-identical files, so cached builds and test outputs are
reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

HEAD_DIM = 64
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Measured on the default size (greedy, 32 tokens after 5 chat prompts, seeds 0 and 1): at 0.02 the
# logits are nearly flat (median top-1 margin 0.05) and greedy output collapses into one repeated
# token (15-19% distinct tokens); 0.05 still loops (53-56%); 0.1 gives 97-99% distinct tokens with a
# median margin of 0.3 (5th percentile 0.02-0.04, far above float32 noise). 0.2 is no better and
# doubles the logit scale, making the untrained loss needlessly high for the adapter-training tests.
INITIALIZER_RANGE = 0.1
# The corpus is fixed, not drawn from the model seed: every build shares one tokenizer.
_CORPUS_SEED = 1234
_CORPUS_LINES = 8_000


def _word_list(text: str, sep: str | None = None) -> tuple[str, ...]:
    """Split a word list written as one string (`sep=","` for multi-word entries)."""
    return tuple(item.strip() for item in text.split(sep))


_FIRST_NAMES = _word_list(
    "Alice Bob Carol David Emma Frank Grace Henry Isabel Jack Karen Liam Maria Noah Olivia Peter "
    "Quinn Rachel Sam Tina Umar Victor Wendy Xavier Yuki Zoe Ahmed Priya Chen Sofia Mateo Hannah "
    "Oliver Amelia Lucas Mia James Charlotte Daniel Laura Caroline Melanie John Sarah Michael"
)
_PLACES = _word_list(
    "Paris, London, Tokyo, Berlin, Madrid, Rome, Boston, Chicago, Seattle, Toronto, Sydney, Dublin, "
    "Lisbon, Vienna, Prague, Mumbai, Seoul, Denver, Austin, Oslo, Nairobi, Cairo, Lima, Montreal, "
    "the beach, the park, the library, the office, the gym, the museum, the lake, the mountains, "
    "the city center, home, school",
    sep=",",
)
_JOBS = _word_list(
    "teacher nurse engineer doctor painter chef writer designer lawyer pilot farmer musician "
    "student scientist photographer accountant counselor developer manager librarian"
)
_THINGS = _word_list(
    "coffee, tea, pizza, sushi, pasta, chocolate, ice cream, hiking, running, swimming, reading, "
    "painting, jazz, rock music, classical music, movies, board games, chess, yoga, cooking, "
    "gardening, travel, camping, photography, dogs, cats, horses, the piano, the guitar, football, "
    "tennis, poetry, pottery",
    sep=",",
)
_DAYS = _word_list("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")
_MONTHS = _word_list("January February March April May June July August September October November December")
_RELATIONS = _word_list("sister brother mother father friend cousin wife husband daughter son neighbor boss")
_FEELINGS = _word_list("happy excited tired nervous proud worried grateful curious relaxed busy")
_TEMPLATES = (
    "My name is {name} and I live in {place}.",
    "{name} works as a {job} in {place}.",
    "I really love {thing}, but my {rel} prefers {thing2}.",
    "On {day}, {name} went to {place} with her {rel}.",
    "We are planning a trip to {place} in {month} {year}.",
    "{name} was born on {month} {dom}, {year}.",
    "What is your favorite {kind}? Mine is {thing}.",
    "Where does {name} live? {name} lives in {place}.",
    "When did you start {thing}? I started in {year}.",
    "Q: Who is {name}'s {rel}? A: {name2}.",
    "Q: What does {name} do for a living? A: {name} is a {job}.",
    "Q: When is the meeting? A: On {day} at {hour} o'clock.",
    "I feel {feeling} today because I finished my project.",
    "Last {day} I met {name} at {place}, and we talked about {thing}.",
    "Could you remind me what I said about {thing} yesterday?",
    "Sure! You told me that you enjoy {thing} and want to visit {place}.",
    "{name} has {num} {plural} and a small garden.",
    "Thanks for asking. I'm {feeling}, how about you?",
    "The event starts at {hour}:{minute} on {month} {dom}.",
    "Please don't forget: {name}'s birthday is in {month}.",
    "I think {thing} is great, although it can be expensive.",
    "Hi {name}! It's been a while. How was {place}?",
    "[{num}] \"{name}\" said: 'I can't wait for {thing}!' (really)",
    "In {year}, {name} moved from {place} to {place2}; it was {feeling}.",
)
# Common English words, so ordinary chat text outside the templates still gets whole-word merges.
_COMMON = _word_list(
    "the be to of and a in that have it for not on with he as you do at this but his by from they we "
    "say her she or an will my one all would there their what so up out if about who get which go me "
    "when make can like time no just him know take people into year your good some could them see "
    "other than then now look only come its over think also back after use two how our work first "
    "well way even new want because any these give day most us is are was were been has had did does "
    "very much many more should need feel try leave call ask tell find keep let begin seem help talk "
    "turn start show hear play run move live believe hold bring happen write provide sit stand lose "
    "pay meet include continue set learn change lead understand watch follow stop create speak read "
    "spend grow open walk win offer remember love consider appear buy wait serve die send expect build "
    "stay fall cut reach kill remain suggest raise pass sell require report decide pull vacation tips "
    "weekend morning evening night week month last next yesterday today tomorrow always never often "
    "sometimes usually really actually probably maybe please thanks sorry great nice little big old "
    "long small large important different same right left early late young favorite family friends "
    "house car phone email dinner lunch breakfast birthday party wedding concert trip flight hotel "
    "job project meeting class team game book song movie weather rain sun snow summer winter spring "
    "autumn question answer problem idea story place name number water money health hello hi hey yes okay"
)
_KINDS = _word_list("food hobby sport book movie song city color season drink")
_PLURALS = _word_list("kids dogs cats books plants bikes friends cousins paintings guitars")


def _sentence(rng: random.Random) -> str:
    """One sentence: a filled template about a person, place, date or preference, or common words."""
    if rng.random() < 0.3:
        words = rng.choices(_COMMON, k=rng.randint(5, 16))
        return " ".join(words).capitalize() + rng.choice(".?!")
    fields = {
        "name": rng.choice(_FIRST_NAMES),
        "name2": rng.choice(_FIRST_NAMES),
        "place": rng.choice(_PLACES),
        "place2": rng.choice(_PLACES),
        "job": rng.choice(_JOBS),
        "thing": rng.choice(_THINGS),
        "thing2": rng.choice(_THINGS),
        "rel": rng.choice(_RELATIONS),
        "day": rng.choice(_DAYS),
        "month": rng.choice(_MONTHS),
        "dom": rng.randint(1, 28),
        "year": rng.randint(1950, 2030),
        "hour": rng.randint(1, 12),
        "minute": f"{rng.choice((0, 15, 30, 45)):02d}",
        "num": rng.randint(2, 99),
        "kind": rng.choice(_KINDS),
        "plural": rng.choice(_PLURALS),
        "feeling": rng.choice(_FEELINGS),
    }
    return rng.choice(_TEMPLATES).format(**fields)


def synthetic_corpus(n_lines: int = _CORPUS_LINES, seed: int = _CORPUS_SEED) -> Iterator[str]:
    """Yield deterministic English chat-like lines about people, places, dates and preferences."""
    rng = random.Random(seed)
    for _ in range(n_lines):
        # Several sentences per line, so sentence-initial words also get their " Word" merges.
        line = " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
        yield line.lower() if rng.random() < 0.1 else line
        if rng.random() < 0.2:
            # Newline-separated roles, as the chat template lays text out.
            yield f"user\n{line}\nassistant\nOkay, noted."


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (`tokenizers.Tokenizer`) on the synthetic corpus, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Byte-level: any unicode string encodes and decodes losslessly, whatever the corpus lacked.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(synthetic_corpus(), trainer=trainer)
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    layers: int = 4,
    hidden: int = 256,
    intermediate: int | None = None,
    vocab_size: int = 2048,
    seed: int = 0,
    max_position_embeddings: int = 4096,
) -> Path:
    """Write a random-weight Llama model and its tokenizer to `out_dir`; return the directory.

    The model is float32 safetensors with head_dim 64 (so `hidden` must be a multiple of 64) and
    untied embeddings; the tokenizer ends turns with `<|im_end|>`, which is also the EOS token.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if hidden <= 0 or hidden % HEAD_DIM:
        raise ValueError(f"hidden must be a multiple of {HEAD_DIM}, got {hidden}")
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the byte alphabet plus specials, got {vocab_size}")
    if intermediate is None:
        # Llama's FFN ratio (~2.75x hidden), rounded to a multiple of 64 like real checkpoints.
        intermediate = max(HEAD_DIM, round(2.75 * hidden / HEAD_DIM) * HEAD_DIM)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_position_embeddings,
    )
    pad_id, im_end_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    # Embedding rows for the full vocab_size even if BPE stopped early (few merges left).
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM,
        num_key_value_heads=hidden // HEAD_DIM,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position_embeddings,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=im_end_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    # A private RNG stream: the weights depend on `seed` alone, and the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float().eval()
    model.generation_config.eos_token_id = im_end_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    # The template goes into tokenizer_config.json (not chat_template.jinja) so older readers find it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    return out
