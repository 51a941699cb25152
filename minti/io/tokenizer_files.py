"""CLIP tokenizer files, read into a minti `Tokenizer` and written from one: tokenizer.py's loading layer.

SD 1.x's diffusers `tokenizer/` folder (vocab.json + merges.txt, or the tokenizer.json that
transformers 5 writes), with the placeholder words a textual-inversion run saved there; openai/CLIP's
own merges file, bpe_simple_vocab_16e6.txt.gz; and that file as an installed open_clip / clip
package ships it. `Tokenizer.save` writes a `tokenizer/` folder that transformers loads.
"""
import gzip
import importlib.util
import json
import os

from ..tokenizer import BOS, CONTEXT_LENGTH, EOS, Tokenizer, base_tokens

CLIP_NUM_MERGES = 49152 - 256 - 2  # openai/CLIP reads this many merges from its .txt.gz: 48,894


def read_tokenizer_folder(path, cleanup: str = "transformers") -> Tokenizer:
    """Read a tokenizer folder: vocab.json + merges.txt (SD 1.x's diffusers `tokenizer/` folder, or
    the model folder above it), or the tokenizer.json that transformers 5 writes instead.

    Placeholders that a textual-inversion run saved there are added back: tokenizer_config.json's
    `added_tokens_decoder`, the older added_tokens.json, or tokenizer.json's `added_tokens`.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path} not found")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "tokenizer.json")):
        path = os.path.join(path, "tokenizer")  # a whole diffusers model folder

    def there(name):
        return os.path.isfile(os.path.join(path, name))

    def read(name):
        with open(os.path.join(path, name), encoding="utf-8") as f:
            return f.read() if name.endswith(".txt") else json.load(f)

    added = {}  # placeholder -> id, from whichever of the files below are there
    if there("vocab.json") and there("merges.txt"):
        vocab = read("vocab.json")
        lines = [line for line in read("merges.txt").split("\n") if line.strip()]
        merges = [tuple(line.split()) for line in lines if not line.startswith("#version")]
    elif there("tokenizer.json"):
        data = read("tokenizer.json")
        if data.get("model", {}).get("type") != "BPE":
            raise ValueError(f"{path}/tokenizer.json does not hold a BPE model (is it a CLIP tokenizer?)")
        added.update({t["content"]: t["id"] for t in data.get("added_tokens", []) if not t["special"]})
        vocab = data["model"]["vocab"]
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    else:
        raise FileNotFoundError(f"{path} holds neither vocab.json + merges.txt nor tokenizer.json "
                                f"(an SD 1.x diffusers model has them in its tokenizer/ subfolder)")
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{path}: a merge is two tokens separated by a space, got {' '.join(bad[0])!r}")
    tok = Tokenizer(vocab, merges, cleanup)
    if there("tokenizer_config.json"):
        decoder = read("tokenizer_config.json").get("added_tokens_decoder", {})
        added.update({e["content"]: int(i) for i, e in decoder.items() if not e.get("special")})
    if there("added_tokens.json"):
        added.update(read("added_tokens.json"))
    added = sorted((i, t) for t, i in added.items() if i >= len(vocab))
    if [i for i, _ in added] != list(range(len(vocab), len(vocab) + len(added))):
        raise ValueError(f"{path}: added token ids {[i for i, _ in added]} do not follow the vocabulary "
                         f"({len(vocab)} tokens) without gaps")
    tok.add_tokens([t for _, t in added])
    return tok


def read_clip_bpe(path, cleanup: str = "transformers", num_merges: int = CLIP_NUM_MERGES) -> Tokenizer:
    """Read openai/CLIP's merges file (bpe_simple_vocab_16e6.txt.gz): a version line, then merges.

    The vocabulary is not stored in it; it is built as openai/CLIP builds it: the 256 byte tokens,
    the same with '</w>', one token per merge, then BOS (49406) and EOS (49407).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass the path of CLIP's bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:num_merges + 1]]
    if len(merges) != num_merges or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} does not hold {num_merges} merges ('a b' lines after a version line)")
    tokens = base_tokens() + ["".join(m) for m in merges] + [BOS, EOS]
    return Tokenizer({t: i for i, t in enumerate(tokens)}, merges, cleanup)


def clip_tokenizer(cleanup: str = "transformers") -> Tokenizer:
    """CLIP's standard vocabulary (the one SD 1.x uses), from an installed package that ships it.

    open-clip-torch (or openai's `clip` package) ships bpe_simple_vocab_16e6.txt.gz. The package
    is located without importing it: open_clip's import pulls in torchvision and timm.
    """
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
            if os.path.isfile(path):
                return read_clip_bpe(path, cleanup)
    raise FileNotFoundError(
        "CLIP's vocabulary file (bpe_simple_vocab_16e6.txt.gz) was not found. Install a package that "
        "ships it (`pip install --no-deps open-clip-torch`), or load a tokenizer folder with "
        "read_tokenizer_folder('<sd-model>/tokenizer') or the file with read_clip_bpe(path).")


def write_tokenizer_folder(tok: Tokenizer, folder) -> None:
    """`tok.save(folder)`: an SD 1.x diffusers-style `tokenizer/` folder that transformers' CLIPTokenizer
    loads: vocab.json, merges.txt, tokenizer_config.json (placeholders in `added_tokens_decoder`, as
    transformers writes them) and special_tokens_map.json."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(tok.vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tok.merges))

    def entry(content, special):
        return {"content": content, "lstrip": False, "normalized": not special, "rstrip": False,
                "single_word": False, "special": special}

    added = {str(tok.bos_id): entry(BOS, True), str(tok.eos_id): entry(EOS, True)}
    added.update({str(i): entry(t, False) for t, i in tok.added.items()})
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
              **specials, "added_tokens_decoder": added}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
