"""Evaluation harness for LoCoMo and LongMemEval: data loaders (`datasets`), answer scoring (`scoring`), the
runner and its command (`runner`, `cli`), re-scoring a finished run (`rescore`) and the report (`report`)."""
