"""Files in and out: model weights and their configs, tokenizer files, concept and space-time word files,
the prompt syntax of learned words, atomic writes. This layer imports the reading path (minti/*.py); the
reading path never imports it.
"""
