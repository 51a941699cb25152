"""Learn a new word for a concept from a few images (textual inversion). Work in progress.

The toy world that `python train.py` will learn a concept in does not exist yet; for now this
script says what exists and exits.
"""
import sys


def main():
    print("minti: textual inversion training is not written yet. What exists now: the tokenizer,")
    print("the text encoder and the tests (`python -m pytest`). See README.md.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
