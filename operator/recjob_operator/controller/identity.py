"""Which spec fields define the model, and the names of the children derived from them.

A spec edit bumps ``metadata.generation`` whatever it touches; the children must not
follow it blindly, or editing a canary's steps would retrain the model and roll it back.
So the training and conversion children are named after digests of what they depend on:

- the **model generation** (``status.modelGeneration``) advances only when a field that
  defines the trained weights changes: ``data``, ``model``, ``training``, ``compression``
  and ``artifactsUri`` (where the run directory lives);
- the **conversion revision** (``status.conversionRevision``) counts the conversions of one
  model generation: it advances when what the converted artifact depends on changes
  (``export``, and ``serving.name`` / ``serving.storageUri``: the repository it is
  published to) after a conversion of the current revision was started;
- ``rollout`` and the rest of ``serving`` define neither: an edit applies in place.

Both counters live in the status, with the digest they stand for; the identity of the
current spec is derived from them, so a backend finds the children of an edited spec by
name before the core has written anything (``identity`` is pure). Digests cover explicitly
set values only (defaults excluded), so a new API field with a default never changes
them. A status from before these fields existed keeps ``metadata.generation`` as its
model generation, so its children keep their names.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from typing import Any

from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.spec import RecJobSpec

#: Spec fields (Python names) that define the trained model.
MODEL_FIELDS = ("data", "model", "training", "compression", "artifacts_uri")
#: Serving fields the conversion depends on (where the model repository is).
CONVERSION_SERVING_FIELDS = ("name", "storage_uri")
#: Spec fields an edit of which applies in place (besides the serving fields above);
#: ``storage`` (credentials for the storage URIs) is read when a child is created.
IN_PLACE_FIELDS = ("serving", "rollout", "storage")


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def model_digest(spec: RecJobSpec) -> str:
    """Digest of the fields that define the trained model."""
    return _digest(
        spec.model_dump(
            mode="json", by_alias=True, exclude_defaults=True, include=set(MODEL_FIELDS)
        )
    )


def conversion_digest(spec: RecJobSpec) -> str:
    """Digest of what the converted artifact depends on beyond the model."""
    return _digest(
        {
            "export": spec.export.model_dump(mode="json", by_alias=True, exclude_defaults=True),
            "serving": spec.serving.model_dump(
                mode="json",
                by_alias=True,
                exclude_defaults=True,
                include=set(CONVERSION_SERVING_FIELDS),
            ),
        }
    )


@dataclass(frozen=True)
class Identity:
    """The model generation and conversion revision of a RecJob's current spec."""

    model_generation: int
    model_digest: str
    conversion_revision: int
    conversion_digest: str


#: Both digests of each spec in memory, by ``id()`` (an entry goes with its spec): a pass
#: asks for its spec's identity eight times (each child's name derives from it), and
#: dumping the spec twice each time was a third of a pass's CPU. Specs are not changed
#: after validation (an edit is a new RecJob object from the API server).
_DIGESTS: dict[int, tuple[str, str]] = {}


def spec_digests(spec: RecJobSpec) -> tuple[str, str]:
    """(:func:`model_digest`, :func:`conversion_digest`) of ``spec``, computed once."""
    key = id(spec)
    digests = _DIGESTS.get(key)
    if digests is None:
        digests = _DIGESTS[key] = (model_digest(spec), conversion_digest(spec))
        weakref.finalize(spec, _DIGESTS.pop, key, None)  # before the id can be reused
    return digests


def identity(recjob: RecJob) -> Identity:
    """The identity of ``recjob``'s spec, given what its status records."""
    spec, status = recjob.spec, recjob.status
    model, conversion = spec_digests(spec)
    if status is None or status.model_generation is None or status.model_digest is None:
        return Identity(recjob.generation, model, 1, conversion)
    if status.model_digest != model:
        return Identity(status.model_generation + 1, model, 1, conversion)
    revision = status.conversion_revision or 1
    changed = status.conversion_digest is not None and status.conversion_digest != conversion
    if changed and status.conversion is not None:  # that revision was converted (or started)
        revision += 1
    return Identity(status.model_generation, model, revision, conversion)


# --------------------------------------------------------------------------- names
def training_child_name(name: str, model_generation: int) -> str:
    """The training child of model generation ``model_generation`` of RecJob ``name``."""
    return f"{name}-g{model_generation}-train"


def conversion_part(revision: int) -> str:
    """The conversion's name suffix and directory: ``convert``, then ``convert-2``, ..."""
    return "convert" if revision <= 1 else f"convert-{revision}"


def conversion_child_name(name: str, model_generation: int, revision: int) -> str:
    """The conversion child of a model generation's conversion ``revision``."""
    return f"{name}-g{model_generation}-{conversion_part(revision)}"


def training_name(recjob: RecJob) -> str:
    """Deterministic name of the training child of the spec's model generation."""
    return training_child_name(recjob.metadata.name, identity(recjob).model_generation)


def conversion_name(recjob: RecJob) -> str:
    """Deterministic name of the conversion child of the spec's conversion revision."""
    ident = identity(recjob)
    return conversion_child_name(
        recjob.metadata.name, ident.model_generation, ident.conversion_revision
    )


def generation_parts(recjob: RecJob, part: str) -> tuple[str, str]:
    """Directory parts of the spec's ``train`` or ``convert`` output under the RecJob's
    folder: ``("g<model generation>", "train" | "convert" | "convert-<revision>")``."""
    ident = identity(recjob)
    if part == "convert":
        part = conversion_part(ident.conversion_revision)
    return f"g{ident.model_generation}", part
