"""Files of space-time words (spacetime.py): one safetensors file per word, its kind in the metadata.

format "minti-spacetime", kind "per-layer" (P+: the tensor "vectors" [T, layers, n, D]) or "neti" (the
mapper's weights under "mapper.*" and its sizes in the metadata). Both name the UNet layers they were
trained for (diffusers module paths, unet.cross_attention_layers): a file is refused on a UNet with
other layers, or a text encoder of another width, with a message saying what differs. Tools without
layers (diffusers, A1111) get an ordinary word: `export_layer_average` or `export_layer`, named so.
"""
import json
import os
from dataclasses import dataclass, field

import safetensors
import torch

from .concepts import (SPACETIME_FORMAT, Concept, ConceptError, check_finite, check_width, derived_token,
                       extension, file_kind, file_metadata, file_tensor, read_safetensors, saved_step,
                       stored_vectors, write_safetensors)
from ..spacetime import NeTIMapper, NeTIWord, PerLayerWord, layer_average
from ..textual_inversion import add_words, check_new_word

KINDS = ("per-layer", "neti")


@dataclass
class SpaceTimeConcept:
    """A space-time word read from (or going to) a file. vectors: [T, layers, n, D] for "per-layer";
    tensors: the mapper's state_dict for "neti" (sizes in meta)."""

    kind: str
    token: str
    layer_names: list
    vectors: torch.Tensor | None = None
    tensors: dict = field(default_factory=dict)
    step: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.vectors.shape[-1] if self.kind == "per-layer" else int(self.meta["width"])


def from_word(word, token, step=None, meta=None) -> SpaceTimeConcept:
    """The file contents of a trained PerLayerWord or NeTIWord."""
    if isinstance(word, PerLayerWord):
        return SpaceTimeConcept("per-layer", token, word.layer_names, word.vectors.detach().cpu().clone(),
                                step=step, meta=dict(meta or {}))
    if isinstance(word, NeTIWord):
        m = word.mapper
        sizes = {"width": m.width, "hidden": m.hidden, "frequencies": m.encode.w.shape[0], "bypass": m.bypass,
                 "norm": m.norm, "anchors": m.net[0].out_features // len(word.layer_names),
                 "num_train_timesteps": word.num_train_timesteps}
        tensors = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
        return SpaceTimeConcept("neti", token, word.layer_names, tensors=tensors, step=step,
                                meta={**(meta or {}), **sizes})
    raise TypeError(f"not a space-time word: {type(word).__name__}")


def save_spacetime(path, concept: SpaceTimeConcept) -> None:
    """Write one word to `path` (.safetensors)."""
    if extension(path) != ".safetensors":
        raise ConceptError(f"{path}: a space-time word is a .safetensors file.")
    if concept.kind == "per-layer":
        tensors = {"vectors": concept.vectors}
        T, _, n, D = concept.vectors.shape
        sizes = {"resolutions": T, "vectors": n, "width": D}
    else:
        tensors, sizes = {f"mapper.{k}": v for k, v in concept.tensors.items()}, {}
    tensors = {name: file_tensor(t, concept.token, f"{path} ({name})") for name, t in tensors.items()}
    layers = json.dumps(list(concept.layer_names))
    metadata = file_metadata(concept.meta, **sizes, format=SPACETIME_FORMAT, kind=concept.kind,
                             token=concept.token, layers=layers, step=concept.step)
    write_safetensors(path, tensors, metadata)


def load_spacetime(path, layer_names=None, width=None) -> SpaceTimeConcept:
    """Read a space-time word; layer_names (the model's, unet.cross_attention_layers) and width (its
    token width) refuse a file made for another model."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConceptError(f"No such space-time word file: {path}")
    if file_kind(path) != "safetensors":
        raise ConceptError(f"{path} is not a safetensors file; space-time words are written by "
                           "save_spacetime.")
    tensors, meta = read_safetensors(path)
    if meta.get("format") != SPACETIME_FORMAT:
        raise ConceptError(f"{path} is not a space-time word (its format is {meta.get('format')!r}, not "
                           f"{SPACETIME_FORMAT!r}); an ordinary embedding goes through load_concepts.")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ConceptError(f"{path}: unknown kind {kind!r} of space-time word (known: {', '.join(KINDS)}).")
    try:
        names = json.loads(meta.get("layers", ""))
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not names:
        raise ConceptError(f"{path}: the metadata does not name the UNet layers the word was trained for "
                           "(damaged, or edited by hand).")
    rest = {k: v for k, v in meta.items() if k not in ("format", "kind", "token", "layers", "step")}
    concept = SpaceTimeConcept(kind, meta.get("token", ""), names, step=saved_step(meta), meta=rest)
    if kind == "per-layer":
        concept.vectors = _per_layer_vectors(tensors, meta, len(names), path)
    else:
        concept.tensors = _neti_weights(tensors, meta, path)
        try:  # the weights must fit the sizes the metadata gives
            neti_mapper(concept)
        except (RuntimeError, KeyError, ValueError) as e:
            raise ConceptError(f"{path}: the NeTI mapper's weights do not fit its metadata ({e}).") from None
    if layer_names is not None and list(layer_names) != names:
        raise ConceptError(f"{path} was trained for a UNet with {len(names)} cross-attention layers "
                           f"({names[0]} ... {names[-1]}), but this model has {len(layer_names)} "
                           f"({layer_names[0]} ... {layer_names[-1]}): a per-layer word only fits the model "
                           "family it was trained on. Use export_layer_average for a plain word.")
    if width is not None and concept.width != width:
        check_width(Concept(concept.token or "<word>", torch.zeros(1, concept.width)), width)
    return concept


def _per_layer_vectors(tensors, meta, num_layers, path) -> torch.Tensor:
    """A P+ file's tensor "vectors" [T, layers, n, D], checked against its metadata."""
    v = stored_vectors(tensors, meta, "T layers n D", path)
    if v.shape[1] != num_layers:
        raise ConceptError(f"{path}: 'vectors' has {v.shape[1]} layers but the metadata names {num_layers}; "
                           "the file is inconsistent (damaged or edited by hand).")
    return v


def _neti_weights(tensors, meta, path) -> dict:
    """A NeTI file's mapper weights (its "mapper.*" tensors), its metadata checked for the mapper's sizes."""
    for key in ("width", "hidden", "frequencies", "bypass", "norm", "anchors"):
        if key not in meta:
            raise ConceptError(f"{path}: a NeTI word's metadata must say its {key}; the file is damaged.")
    weights = {k[len("mapper."):]: t for k, t in tensors.items() if k.startswith("mapper.")}
    for name, t in weights.items():
        check_finite(t, meta.get("token", ""), f"{path} ({name})")
    return weights


def neti_mapper(concept: SpaceTimeConcept) -> NeTIMapper:
    m = concept.meta
    mapper = NeTIMapper(len(concept.layer_names), int(m["width"]), float(m["norm"]), hidden=int(m["hidden"]),
                        anchors=int(m["anchors"]), bypass=m["bypass"] in (True, "True"),
                        frequencies=int(m["frequencies"]),
                        num_train_timesteps=int(m.get("num_train_timesteps", 1000)))
    mapper.load_state_dict(concept.tensors)  # strict: every weight present, of its size
    return mapper


def make_word(concept: SpaceTimeConcept, tokenizer):
    """The PerLayerWord / NeTIWord of a file, its placeholders registered in `tokenizer` (eval mode)."""
    check_new_word(tokenizer, concept.token)
    steps = int(concept.meta.get("num_train_timesteps", 1000))
    if concept.kind == "per-layer":
        ids = add_words(tokenizer, {concept.token: concept.vectors.shape[2]})[concept.token]
        return PerLayerWord(concept.vectors, ids, concept.layer_names, steps).eval()
    ids = add_words(tokenizer, {concept.token: 1})[concept.token]
    return NeTIWord(neti_mapper(concept), ids, concept.layer_names, steps).eval()


def export_layer_average(concept: SpaceTimeConcept, token=None) -> Concept:
    """An ordinary word [n, D] for tools without layers: the mean of a P+ word over layers (and time
    buckets), named "<token-layer-avg>"."""
    if concept.kind != "per-layer":
        raise ConceptError(f"{concept.token!r} is a NeTI word: it has no table of vectors to average.")
    return Concept(token or derived_token(concept.token, "layer-avg"), layer_average(concept.vectors),
                   step=concept.step, meta={"source_token": concept.token, "export": "layer average"})


def export_layer(concept: SpaceTimeConcept, layer, token=None) -> Concept:
    """An ordinary word [n, D]: one layer's vectors (a name from layer_names, or an index), averaged over
    time buckets, named "<token-LAYERNAME>"."""
    if concept.kind != "per-layer":
        raise ConceptError(f"{concept.token!r} is a NeTI word: it has no table of vectors to export.")
    index = concept.layer_names.index(layer) if isinstance(layer, str) else int(layer)
    name = concept.layer_names[index]
    return Concept(token or derived_token(concept.token, name), concept.vectors[:, index].mean(0),
                   step=concept.step, meta={"source_token": concept.token, "export": f"layer {name}"})


def is_spacetime_file(path) -> bool:
    """Whether `path` is a minti-spacetime safetensors file (by its metadata; False for anything else)."""
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == SPACETIME_FORMAT
    except Exception:  # not safetensors, missing, damaged: the ordinary loader says what is wrong
        return False
