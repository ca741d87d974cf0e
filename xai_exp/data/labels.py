"""True labels to a model's class indices: ImageNet synset ids and class names.

A label is what the data calls an image's class: a folder name (``goldfish``, ``n01443537``),
a synset id in a file name, or a manifest cell (``n01443537 12 40 200 180``). A label holding
an ImageNet synset id maps to the standard 1000-class order (timm's ImageNet metadata, shipped
with timm, nothing downloaded) when the model has 1000 classes; any other label maps by name,
case and ``_``/``-`` ignored, to the model's class names or, for a 1000-class model, to any
WordNet lemma of an ImageNet class (``tabby``, ``tabby cat``). Names shared by two classes
(ImageNet's two ``crane``) are ambiguous and map to none.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from xai_exp.data.images import SYNSET_ID

IMAGENET_CLASSES = 1000


def normalise_name(name: str) -> str:
    """A class name for matching: case folded, ``_``/``-`` as spaces, spaces collapsed."""
    return " ".join(re.sub(r"[_\-]+", " ", name).casefold().split())


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids in the standard class order."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


@functools.cache
def imagenet_lemmas() -> tuple[tuple[str, ...], ...]:
    """Each ImageNet-1k class's WordNet lemmas (``goldfish``, ``Carassius auratus``)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(
        tuple(part.strip() for part in info.index_to_description(i).split(","))
        for i in range(IMAGENET_CLASSES)
    )


class ClassIndex:
    """Maps labels to a model's class indices (None: unknown or ambiguous).

    The name and synset tables are built at the first lookup: a study without labels never
    loads ImageNet's metadata.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self.imagenet = len(self.class_names) == IMAGENET_CLASSES

    @functools.cached_property
    def names(self) -> dict[str, set[int]]:
        """Normalised name -> the class indices it names."""
        names: dict[str, set[int]] = {}
        for index, name in enumerate(self.class_names):
            names.setdefault(normalise_name(name), set()).add(index)
        lemmas: dict[str, set[int]] = {}
        for index, found in enumerate(imagenet_lemmas() if self.imagenet else ()):
            for lemma in found:
                lemmas.setdefault(normalise_name(lemma), set()).add(index)
        return {**lemmas, **names}  # the model's own class names first

    @functools.cached_property
    def synsets(self) -> dict[str, int]:
        """ImageNet synset id -> class index (empty unless the model has 1000 classes)."""
        return {synset: i for i, synset in enumerate(imagenet_synsets())} if self.imagenet else {}

    def lookup(self, label: str) -> int | None:
        """The class index of a label, or None."""
        found = SYNSET_ID.search(label)
        if found is not None and self.synsets:
            return self.synsets.get(found.group(0))
        matches = self.names.get(normalise_name(label), set())
        return next(iter(matches)) if len(matches) == 1 else None

    def why_unknown(self, label: str) -> str:
        """Why `lookup` gives None for this label, in a few words."""
        found = SYNSET_ID.search(label)
        if found is not None:
            if not self.synsets:
                return "a synset id, and the model lacks the 1000 ImageNet classes"
            return f"{found.group(0)} is not an ImageNet-1k synset"
        if len(self.names.get(normalise_name(label), ())) > 1:
            return "more than one class has this name"
        return "no class has this name"
