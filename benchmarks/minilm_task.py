"""The MiniLM sentence-pair task the model-level benchmarks share: the adapted Linear names and
eight paraphrase pairs for an in-batch contrastive loss."""

TARGETS = ["query", "key", "value", "dense"]
PAIRS = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("Stocks fell sharply on Monday.", "Markets dropped at the start of the week."),
    ("She is cooking pasta for dinner.", "A woman prepares spaghetti in the evening."),
    ("The train was late again.", "Once more the railway service was delayed."),
    ("Children are playing in the park.", "Kids run around on the playground."),
    ("He repaired the old bicycle.", "The man fixed an aging bike."),
    ("It is raining in the city.", "Rain falls over the town today."),
]
