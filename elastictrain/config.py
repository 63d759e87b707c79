"""Pydantic configs, one per component; every field has a description and a default.

Errors raised by validation say what to change. These constructors read no
environment variables: a key spec names one, and `elastictrain.checkpoint.keys` reads it.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from elastictrain.election.topology import TopologyPolicy


class _Config(BaseModel):
    # hide_input_in_errors: a key pasted where a key spec belongs must not reach a log through the error text
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class ScalingConfig(_Config):
    """How many workers to run and where."""

    min_workers: int = Field(
        1, ge=1, description="Training waits while fewer are alive (up to failure.below_min_timeout_s, then fails)."
    )
    max_workers: int = Field(1, ge=1, description="Never more workers than this; new capacity joins up to it.")
    spares: int = Field(
        0, ge=0, description="Warm spares: workers started beyond max_workers, placed like the others, that warm up "
        "and wait outside the world; a rebuild after a loss takes one in at once (no process start), and a new "
        "spare starts in the background. Each reserves resources_per_worker."
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0}, description="Ray resources each worker actor reserves."
    )
    use_gpu: bool = Field(
        False, description="Train on a GPU per worker (NCCL; resources_per_worker['GPU'] may set a fraction "
        "or more); gloo on CPU otherwise."
    )
    label_selector: Optional[dict[str, str]] = Field(
        None, description="Ray node labels a worker's node must carry, e.g. {'provider': 'aws'}."
    )
    group_by: list[str] = Field(
        default_factory=list, description="Node labels to group ranks by: a process group per label value "
        "(['region'] gives 'region:<value>') and one of each group's lowest rank ('leaders:region'); "
        "`ctx.group(name)` returns it."
    )
    allowed_regions: Optional[list[str]] = Field(
        None, description="Jurisdiction policy: the `region` node-label values workers may run in, e.g. "
        "['eu-west-1', 'europe-west4']. Workers are placed only there (a Ray label selector) and a world with a "
        "member elsewhere is refused at its start. None: anywhere.",
    )

    @field_validator("allowed_regions")
    @classmethod
    def _regions(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        from elastictrain.fleet.jurisdiction import check_regions

        return check_regions(value, "ScalingConfig.allowed_regions")

    spread_by: Optional[str] = Field(
        None, description="Node label to spread workers over (e.g. 'provider' or 'region'): no value of it holds "
        "more than max_share of the workers. Each start gets a Ray label selector `in(...)` naming the values with "
        "room under the cap; when none has, the start goes where capacity is, the run continues and a "
        "`spread_unmet` event says so; when capacity returns, workers move back at step boundaries "
        "(`spread_restored`). None: off."
    )
    max_share: float = Field(
        1.0, gt=0, le=1, description="With spread_by: the largest fraction of the workers on one label value. The "
        "cap in workers is max_share * (max_workers + spares), rounded down: warm spares count, since a spare "
        "enters the world at the next loss."
    )
    spread_pending_timeout_s: float = Field(
        60.0, gt=0, description="With spread_by: a worker whose spread selector keeps it pending (unschedulable) "
        "this long is stopped and started again without the spread constraint (seconds), so a wrong guess "
        "about capacity never stalls the run."
    )

    @model_validator(mode="after")
    def _check(self) -> "ScalingConfig":
        from elastictrain.fleet.jurisdiction import selector_refusal

        refusal = selector_refusal(self.allowed_regions, self.label_selector)
        if refusal is not None:
            raise ValueError(refusal)
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers={self.min_workers} exceeds max_workers={self.max_workers}: "
                "raise max_workers or lower min_workers"
            )
        for name, amount in self.resources_per_worker.items():
            if amount < 0:
                raise ValueError(f"resources_per_worker[{name!r}]={amount} is negative: use 0 or more")
        self.topology_policy()  # a bad label name fails here, not on the workers
        self._check_spread()
        gpus = self.resources_per_worker.get("GPU")
        if gpus is not None and (gpus > 0) != self.use_gpu:
            raise ValueError(
                f"resources_per_worker['GPU']={gpus} with use_gpu={self.use_gpu}: set use_gpu=True to train "
                "on GPUs (a worker drives one, cuda:0 of what Ray gives it), or drop the 'GPU' entry"
            )
        return self

    def worker_gpus(self) -> float:
        """GPUs one worker holds: `resources_per_worker['GPU']` (1 when unset) with `use_gpu`, else 0."""
        return float(self.resources_per_worker.get("GPU", 1.0)) if self.use_gpu else 0.0

    def _check_spread(self) -> None:
        if self.spread_by is None:
            if self.max_share != 1.0:
                raise ValueError(f"max_share={self.max_share} without spread_by: name the node label to spread "
                                 "over, e.g. spread_by='provider'")
            return
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_./-]{0,251}[A-Za-z0-9])?", self.spread_by):
            raise ValueError(f"spread_by={self.spread_by!r} is not a node label name: use one like 'provider' "
                             "or 'region' that your nodes carry")
        if self.label_selector and self.spread_by in self.label_selector:
            raise ValueError(f"label_selector already fixes {self.spread_by!r}, the label spread_by spreads over: "
                             f"drop it from label_selector, or spread over another label")
        pool = self.max_workers + self.spares
        if math.floor(self.max_share * pool + 1e-9) < 1:
            raise ValueError(f"max_share={self.max_share} allows no worker of {pool} (max_workers + spares) on any "
                             f"{self.spread_by!r} value: raise max_share to at least {1 / pool:.4g} or run more workers")

    def topology_policy(self) -> "TopologyPolicy":
        """The named groups every world of this run has (`group_by`)."""
        from elastictrain.election.topology import TopologyPolicy

        return TopologyPolicy(group_by=tuple(self.group_by))


class NoticeConfig(_Config):
    """Preemption notices from the cloud's metadata service (AWS spot instance actions and rebalance
    recommendations, GCP preemption and maintenance, Azure Scheduled Events).

    The cloud comes from local facts only (this setting, the node's labels, its DMI strings), never from
    a probe of the metadata address; on a node of no known cloud nothing is polled. A notice makes the
    member save (through the leader) and leave at the next step boundary, as SIGTERM does.
    """

    cloud: str = Field(
        "auto", description="'auto' (from the node's 'provider' label, else its DMI strings), 'off', 'aws', "
        "'gcp' or 'azure'.",
    )
    poll_interval_s: float = Field(
        1.0, gt=0, description="How often a worker asks the metadata service for a notice (seconds).",
    )
    timeout_s: float = Field(
        1.0, gt=0, description="Timeout of one request to the metadata service (seconds); a slower answer counts "
        "as none.",
    )
    endpoint: Optional[str] = Field(
        None, description="Base URL of the metadata service, e.g. 'http://127.0.0.1:8080' (tests, a proxy); "
        "unset: the provider's own. ELASTICTRAIN_METADATA_ENDPOINT in a worker's environment replaces it there.",
    )
    leave_on_rebalance: bool = Field(
        False, description="An AWS rebalance recommendation (a softer notice than a spot interruption) makes "
        "the member leave too; unset, it is only reported as a cloud_notice event.",
    )
    dmi_root: Optional[str] = Field(
        None, description="Folder of the DMI strings read to recognise the cloud; unset: /sys/class/dmi/id.",
    )

    @model_validator(mode="after")
    def _check(self) -> "NoticeConfig":
        if self.cloud not in ("auto", "off", "aws", "gcp", "azure"):
            raise ValueError(f"cloud={self.cloud!r}: use 'auto', 'off', 'aws', 'gcp' or 'azure'")
        if self.endpoint is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(self.endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(
                    f"endpoint={self.endpoint!r}: give a base URL such as 'http://127.0.0.1:8080' "
                    "(scheme, host and port; the provider's paths are added)"
                )
        if self.timeout_s > 10:
            raise ValueError(
                f"timeout_s={self.timeout_s}: a notice gives seconds of warning (GCP about 30), so a request "
                "may not take longer than 10 s; 1 s is plenty for the machine's own metadata service"
            )
        return self


class FailureConfig(_Config):
    """How failures are detected and how many are tolerated."""

    max_failures: int = Field(100, ge=-1, description="Lost workers tolerated before the run fails; -1: no limit.")
    collective_timeout_s: float = Field(
        10.0, gt=0, description="A collective that takes longer fails, so a hung peer is detected (seconds)."
    )
    heartbeat_interval_s: float = Field(0.25, gt=0, description="How often a worker says it is alive (seconds).")
    heartbeat_timeout_s: float = Field(
        3.0, gt=0, description="A worker silent for this long is taken for lost (seconds)."
    )
    rendezvous_timeout_s: float = Field(
        60.0, gt=0, description="How long a leader waits for live members to join a new world (seconds)."
    )
    startup_wait_s: float = Field(
        10.0, ge=0, description="The first world waits this long for max_workers before starting with fewer (seconds)."
    )
    below_min_timeout_s: float = Field(
        600.0, gt=0, description="How long the run waits while fewer than min_workers are alive (seconds)."
    )
    hang_timeout_s: Optional[float] = Field(
        600.0, gt=0,
        description="A worker inside the training loop that completes no step, report or accumulate call for this "
        "long is hung and is killed, even while its heartbeat thread lives (seconds; None: never). Keep it above "
        "the slowest step and above collective_timeout_s.",
    )
    state_growth_limit: float = Field(
        8.0, ge=1,
        description="A worker refuses a state a peer broadcasts to it (after a rebuild) that takes more than this "
        "many times the bytes of its own, or a tensor it does not hold itself (say optimizer state before its "
        "first step) over this many times its own largest one; states up to 256 MiB always pass. Raise it for an "
        "optimizer whose state is much larger than the model.",
    )
    notices: NoticeConfig = Field(
        default_factory=NoticeConfig,
        description="Preemption notices from the cloud's metadata service (`NoticeConfig`): a notice saves and "
        "leaves like SIGTERM.",
    )

    @model_validator(mode="after")
    def _check(self) -> "FailureConfig":
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s={self.heartbeat_timeout_s} must exceed heartbeat_interval_s="
                f"{self.heartbeat_interval_s}: a worker would be taken for lost between two beats"
            )
        if self.hang_timeout_s is not None and self.hang_timeout_s <= self.collective_timeout_s:
            raise ValueError(
                f"hang_timeout_s={self.hang_timeout_s} must exceed collective_timeout_s={self.collective_timeout_s}: "
                "peers waiting on a hung worker in a collective would be taken for hung themselves"
            )
        return self


class BatchConfig(_Config):
    """The global batch, kept the same at every world size."""

    global_batch_size: int = Field(32, ge=1, description="Samples per optimizer step, summed over all workers.")
    micro_batch_size: int = Field(8, ge=1, description="Samples per forward/backward on one worker.")
    seed: int = Field(0, description="Seed of the per-epoch sample permutation.")
    shuffle: bool = Field(True, description="Permute samples each epoch; False keeps dataset order.")
    drop_last: bool = Field(
        True, description="Epochs hold whole global batches; the remainder of each permutation is skipped."
    )

    @model_validator(mode="after")
    def _check(self) -> "BatchConfig":
        if self.micro_batch_size > self.global_batch_size:
            raise ValueError(
                f"micro_batch_size={self.micro_batch_size} exceeds global_batch_size={self.global_batch_size}: "
                "lower micro_batch_size"
            )
        return self


class EncryptionConfig(_Config):
    """Envelope encryption of checkpoints: `key` wraps a per-run data key."""

    key: str = Field(..., description="Key spec: 'env:VAR', 'file:PATH' (32 bytes, base64) or 'kms:KEY_ID'.")
    old_keys: list[str] = Field(
        default_factory=list, description="Key specs of earlier rotations, to read older checkpoints."
    )
    signing_key: Optional[str] = Field(
        None,
        description="Key spec of the manifest signing seed; unset: derived from `key` (a kms: key: from the run's "
        "data key, so set one with KMS).",
    )

    @model_validator(mode="after")
    def _check(self) -> "EncryptionConfig":
        for spec in [self.key, *self.old_keys, *([self.signing_key] if self.signing_key else [])]:
            scheme = spec.split(":", 1)[0]
            if ":" not in spec or scheme not in ("env", "file", "kms"):
                # the text is not echoed: a key pasted in place of a spec must not reach logs
                raise ValueError(
                    f"a key spec ({len(spec)} characters, not shown) is not 'env:VAR', 'file:PATH' or "
                    "'kms:KEY_ID': put the key itself in a variable or a file and name that"
                )
        return self


class CheckpointConfig(_Config):
    """Where and how often checkpoints are written."""

    uri: Optional[str] = Field(
        None, description="fsspec URI: file:///path, s3://bucket/prefix, memory://x; None: no checkpoints."
    )
    every_steps: Optional[int] = Field(None, ge=1, description="Save after every N committed steps.")
    every_seconds: Optional[float] = Field(None, gt=0, description="Save when this long passed since the last.")
    keep_last: int = Field(3, ge=1, description="Manifests kept; older ones and their unshared chunks go.")
    encryption: Optional[EncryptionConfig] = Field(None, description="None stores plaintext (still hashed).")
    signing_key: Optional[str] = Field(
        None,
        description="Plaintext runs: key spec ('env:VAR' or 'file:PATH', 32 bytes, base64) of the seed that signs "
        "manifests (Ed25519); readers with it refuse unsigned or wrongly signed manifests, and retention counts only "
        "manifests it signed. Encrypted runs set EncryptionConfig.signing_key instead.",
    )
    async_save: bool = Field(True, description="Only the snapshot stalls training; the rest runs behind it.")
    chunk_size_mb: int = Field(64, ge=1, description="Large tensors are stored in pieces of this size (MiB).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to fsspec.filesystem(). A credential (an option named like key, secret, token, "
        "password, *_key, nested ones too) may be 'env:VAR': read from VAR on each machine that opens the "
        "storage, so it is not in the config; reprs, errors and events hide credential values.",
    )
    io_threads: int = Field(
        2, ge=1, le=64, description="Threads that hash, seal and upload chunks in parallel (raise for S3)."
    )
    fsync: bool = Field(
        True,
        description="Local disks: fsync chunks, then the manifest, and their folders, before a save counts as "
        "committed and before retention removes older checkpoints, so a machine that crashes keeps a checkpoint "
        "that loads. False saves into the page cache only (faster). Object stores are durable either way.",
    )
    allowed_regions: Optional[list[str]] = Field(
        None, description="Jurisdiction policy for the checkpoint storage: the regions it may be in. `fit()` "
        "refuses, before any training, a bucket elsewhere or one whose region it cannot tell. None: anywhere.",
    )
    bucket_region: Optional[str] = Field(
        None, description="The region the checkpoint storage is in; unset: for S3, the bucket's location as S3 "
        "reports it (GetBucketLocation), else unknown. Checked against `allowed_regions`.",
    )

    @field_validator("allowed_regions")
    @classmethod
    def _regions(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        from elastictrain.fleet.jurisdiction import check_regions

        return check_regions(value, "CheckpointConfig.allowed_regions")

    @field_validator("bucket_region")
    @classmethod
    def _bucket_region(cls, value: Optional[str]) -> Optional[str]:
        from elastictrain.fleet.jurisdiction import check_regions

        return None if value is None else check_regions([value], "CheckpointConfig.bucket_region")[0]

    @model_validator(mode="after")
    def _uri_scheme(self) -> "CheckpointConfig":
        if self.signing_key is not None:
            if self.encryption is not None:
                raise ValueError(
                    "CheckpointConfig.signing_key is for plaintext checkpoints: with encryption, set "
                    "EncryptionConfig.signing_key instead"
                )
            scheme = self.signing_key.split(":", 1)[0]
            if ":" not in self.signing_key or scheme not in ("env", "file"):
                # the text is not echoed: a key pasted in place of a spec must not reach logs
                raise ValueError(
                    f"CheckpointConfig.signing_key ({len(self.signing_key)} characters, not shown) is not 'env:VAR' "
                    "or 'file:PATH': put the 32-byte key (base64, `elastictrain ckpt keygen`) in a variable or a "
                    "file and name that"
                )
        if self.uri is not None:
            from elastictrain.checkpoint.storage import check_uri

            check_uri(self.uri)
        from elastictrain.checkpoint.credentials import check_options

        check_options(self.storage_options)
        return self

    def __repr_args__(self):
        # repr and str: credential values in storage_options are hidden ('env:VAR' references shown)
        from elastictrain.checkpoint.credentials import redact_options

        for name, value in super().__repr_args__():
            yield name, (redact_options(value) if name == "storage_options" else value)


class NetworkConfig(_Config):
    """The network the run's machines talk over, and the run secret that authenticates them.

    Collective traffic (gradients, the state handed to a member that is behind) is plaintext on gloo
    and NCCL. A world whose ranks sit on nodes of different providers or regions (the `span_labels`
    node labels) is refused unless the network is declared private or encrypted (an overlay such as
    WireGuard or Tailscale, or a VPC): name its interface or address range, or set `private=True`;
    `allow_plaintext=True` accepts plaintext across networks explicitly.
    """

    interface: Optional[str] = Field(
        None, description="Network interface the workers bind and advertise for collectives (e.g. 'wg0', "
        "'tailscale0'); sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME on every worker. Naming one declares the "
        "network private unless `private=False`.",
    )
    cidr: Optional[str] = Field(
        None, description="Address range of the private network (e.g. '100.64.0.0/10'); each worker uses its "
        "interface with an address in it. Naming one declares the network private unless `private=False`.",
    )
    private: Optional[bool] = Field(
        None, description="The network between every machine of the run is private or encrypted; unset: true "
        "when `interface` or `cidr` is given.",
    )
    allow_plaintext: bool = Field(
        False, description="Let a world span providers or regions over a network not declared private "
        "(gradients and state then cross it in plaintext).",
    )
    span_labels: list[str] = Field(
        default_factory=lambda: ["provider", "region"],
        description="Node labels whose values tell networks apart: ranks with different values are on different "
        "networks.",
    )
    secret: Optional[str] = Field(
        None, description="Key spec of the run secret ('env:VAR' or 'file:PATH', 32 bytes base64) that "
        "authenticates election records and rendezvous values; unset: derived from a local checkpoint "
        "encryption key, or else made by the driver for each fit().",
    )

    @model_validator(mode="after")
    def _check(self) -> "NetworkConfig":
        if self.interface is not None and self.cidr is not None:
            raise ValueError("set interface or cidr, not both: the interface named is the one used")
        if self.interface is not None and not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", self.interface):
            raise ValueError(f"interface {self.interface!r} is not a network interface name (e.g. 'wg0')")
        if self.cidr is not None:
            import ipaddress

            try:
                ipaddress.ip_network(self.cidr, strict=False)
            except ValueError:
                raise ValueError(f"cidr {self.cidr!r} is not an address range such as '10.8.0.0/16'") from None
        if self.secret is not None:
            scheme = self.secret.split(":", 1)[0]
            if ":" not in self.secret or scheme not in ("env", "file"):
                raise ValueError(
                    f"secret: a key spec ({len(self.secret)} characters, not shown) is not 'env:VAR' or 'file:PATH': "
                    "put the secret in a variable or a file and name that"
                )
        return self

    @property
    def is_private(self) -> bool:
        """Whether the run's network is declared private or encrypted."""
        if self.private is not None:
            return self.private
        return self.interface is not None or self.cidr is not None


class RunConfig(_Config):
    """Run-wide settings that are not about one component."""

    name: Optional[str] = Field(
        None, description="Run name, in the run's Ray key-value namespace and its errors; unset: a random one."
    )
    seed: int = Field(0, description="Seed for torch's, numpy's and Python's RNGs on every worker at first entry.")
    progress: bool = Field(
        False,
        description="Show the run's progress on the driver's stderr: a progress bar on a terminal, a plain line at "
        "most every second otherwise (steps, world size, samples/s, last loss, recoveries).",
    )
    progress_total: Optional[int] = Field(
        None, ge=1,
        description="Steps the progress bar counts to (the loop's `total_steps`); unset: it counts steps without a total.",
    )
    metrics: bool = Field(
        True,
        description="Keep live Prometheus metrics of the run on the driver through `ray.util.metrics` (Ray's metrics "
        "endpoint exports them, names prefixed `ray_elastictrain_`); False: none.",
    )
    events_path: Optional[str] = Field(
        None, description="Folder (local path or fsspec URI) for the run's event log, read by `elastictrain report`; "
        "unset: `<checkpoint uri>/events` with the checkpoints' storage_options, or no log without a checkpoint URI.",
    )
