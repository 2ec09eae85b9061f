"""The RecJob object: apiVersion, kind, metadata, spec, status."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import API_VERSION, KIND, MAX_INTEGER, ApiModel
from .spec import RecJobSpec
from .status import RecJobStatus

#: RecJob names must leave room for the suffixes of the children they own
#: (``<name>-g<generation>-train`` must stay a valid DNS-1035 label of <= 63 chars).
MAX_NAME_LENGTH = 40
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class ObjectMeta(ApiModel):
    """The parts of Kubernetes ObjectMeta the operator reads; others are accepted as-is."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
    namespace: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63
    )
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    generation: int | None = Field(default=None, ge=0, le=MAX_INTEGER)
    uid: str | None = None
    resource_version: str | None = None


class RecJob(ApiModel):
    """A RecJob custom resource (recjob.dev/v1alpha1)."""

    api_version: Literal["recjob.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["RecJob"]
    metadata: ObjectMeta
    spec: RecJobSpec
    status: RecJobStatus | None = None

    @property
    def generation(self) -> int:
        """metadata.generation (1 for a file that was never applied to a cluster)."""
        return self.metadata.generation or 1

    @property
    def service_name(self) -> str:
        """The InferenceService this RecJob rolls out to."""
        return self.spec.serving.name or self.metadata.name


assert API_VERSION == "recjob.dev/v1alpha1" and KIND == "RecJob"
