"""PatternCom's protocol as data, from the official ``evaluate.py`` and ``utils.py`` (github.com/billpsomas/rscir,
commit 1560858)."""

from __future__ import annotations

import re

#: the attributes, in the order of the paper's table (the files' names, ``PatternCom/<attribute>.csv``)
ATTRIBUTES = ("color", "context", "density", "existence", "quantity", "shape")
#: the Precision@K and Recall@K cut-offs (``at``)
KS = (5, 10, 15, 20)

#: ``class_mapping``: classes a positive may come from for a query of another (a sparse-residential query's
#: positives include dense-residential images with the value asked for)
CLASS_MERGES = {
    "denseresidential": "residential", "sparseresidential": "residential",
    "closedroad": "road", "intersection": "road",
    "bridge": "roadpass", "overpass": "roadpass",
    "ferryterminal": "pier", "harbor": "pier",
    "parkingspace": "parking", "parkinglot": "parking",
}

#: ``fix_query_attributelabels``: per attribute file, the substitutions that put two classes' annotations into one
#: group (whose values the group's images query each other with); a merge of CLASS_MERGES that an attribute does
#: not list here keeps its classes' groups apart
GROUP_FIXES = {
    "density": (("densitydenseresidential", "densityresidential"), ("densitysparseresidential", "densityresidential")),
    "shape": (("shapeclosedroad", "shaperoad"), ("shapeintersection", "shaperoad")),
    "context": (("contextbridge", "contextroadpass"), ("contextoverpass", "contextroadpass")),
    "existence": (("existenceferryterminal", "existencepier"), ("existenceharbor", "existencepier"),
                  ("existenceparkingspace", "existenceparking"), ("existenceparkinglot", "existenceparking")),
}


def image_class(filename: str) -> str:
    """An annotated image's class, as the official code reads it: its name up to the first digit
    (``denseresidential123.jpg``)."""
    return re.split(r"\d", filename)[0]


def relevance_class(filename: str) -> str:
    """The class positives must share with the query (after the official ``class_mapping``)."""
    label = image_class(filename)
    return CLASS_MERGES.get(label, label)


def group_key(attribute: str, annotated: str, filename: str) -> str:
    """The group whose values a row's image is queried with: the row's attribute column and the image's class
    joined, with the attribute file's substitutions applied in order, as ``fix_query_attributelabels``."""
    key = annotated + image_class(filename)
    for old, new in GROUP_FIXES.get(attribute, ()):
        key = key.replace(old, new)
    return key
