"""The application's configuration: one validated source of truth for every setting.

``serve run serve_configs/<file>.yaml`` passes the YAML's ``args`` to ``app.builder:build_app``,
which validates them into :class:`AppConfig`. Unknown keys are errors, so a typo fails at
deploy time with the field's name instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.placement import PlacementConfig, engine_placement_args
from autoscaling.settings import AutoscalingSettings

Mode = Literal["disaggregated", "aggregated"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    path: str = Field(description="Local checkpoint directory or Hugging Face model id.")
    served_model_name: str = Field(description="Name clients pass as `model`.")


class PhaseConfig(_Strict):
    """One engine deployment (prefill, decode or aggregated)."""

    num_replicas: int = Field(1, ge=1)
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM AsyncEngineArgs for this phase, merged over the shared engine_args.",
    )
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    cpu_cores: list[str] | None = Field(
        None,
        description="CPU engines only: cores for replica rank i (e.g. ['0', '1'] or ['0-3']); "
        "every thread of the engine's processes is pinned there.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment set in the replica before the engine."
    )
    max_ongoing_requests: int = Field(256, ge=1)
    placement: PlacementConfig = Field(
        default_factory=PlacementConfig, description="Node group and GPU type of this "
        "phase's replicas; one GPU bundle per device for TP/PP > 1 (app/placement.py).")

    @field_validator("cpu_cores")
    @classmethod
    def _cores_parse(cls, cores: list[str] | None) -> list[str] | None:
        for spec in cores or []:
            parse_core_spec(spec)
        return cores


# Decode's NIXL progress-thread sleep under pull (NixlConfig.reader_progress_delay_us); the
# benches start their plain servers with it too.
READER_PROGRESS_DELAY_US = 20_000
# A pull decode engine's sleep between idle engine steps while its requests wait for their KV
# (EngineProcessConfig.kv_wait_sleep_s; vLLM's is 1 ms).
KV_WAIT_SLEEP_S = 0.0001
# How often a push decode engine's writer thread drains NIXL notifications while pushed KV is
# awaited (EngineProcessConfig.push_notif_poll_s; vLLM drains only when an engine step wakes it).
PUSH_NOTIF_POLL_S = 0.0005


class NixlConfig(_Strict):
    kv_buffer_device: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description="Where NIXL stages KV: 'auto' picks cuda on GPUs, cpu otherwise."
    )
    progress_delay_us: int = Field(
        100,
        ge=0,
        description="Sleep of NIXL's progress thread between polls; 0 is NIXL's busy spin, "
        "which burns a core per idle engine (DESIGN.md). NIXL rounds it up to whole ms.",
    )
    reader_progress_delay_us: int = Field(
        READER_PROGRESS_DELAY_US,
        ge=0,
        description="The same sleep on an engine that only READs (decode under pull "
        "transfers): it starts its READs and polls them from its own scheduler steps, so "
        "its progress thread has nothing on the path; each wake-up preempts the engine's "
        "compute on its core (measured ~10% of decode's inter-token time on CPU, "
        "docs/HANDOFF.md). Prefill (READ target) and decode under push (WRITE target) keep "
        "progress_delay_us.",
    )
    side_channel_host: str | None = Field(
        None, description="Address engines advertise for the NIXL handshake; None = node IP."
    )
    kv_load_failure_policy: Literal["recompute", "fail"] = Field(
        "recompute", description="A failed KV read on decode: recompute the prompt locally "
        "(the request survives) or fail it.")
    kv_lease_s: int = Field(
        30, ge=6, description="NixlConnector's kv_lease_duration: a prefill engine frees a "
        "finished prompt's blocks this long after the last sign of its decode reader (decode "
        "renews the lease by heartbeats every lease/6 s while it waits), so a dead or "
        "cancelled decode never pins prefill KV for longer. vLLM's default is 30.")


class EngineProcessConfig(_Strict):
    shm_busy_loop_s: float | None = Field(
        None,
        gt=0,  # measured: 0 hangs engine start-up (a notification is missed)
        description="How long vLLM's engine-core/worker queue readers spin after a message "
        "before sleeping (vLLM: 1 s). On small CPU hosts where engines are pinned to every "
        "core, spinning starves the serving processes; 0.0005 frees them. None = vLLM's.",
    )
    kv_wait_sleep_s: float | None = Field(
        KV_WAIT_SLEEP_S,
        gt=0,
        le=0.001,
        description="How long a decode engine pulling KV sleeps between engine steps that "
        "ran nothing while its requests wait for their READ (vLLM: 1 ms). The READ's end is "
        "seen only at such a step and the request runs one step later, so vLLM's 1 ms sits "
        "on every handoff's path, often twice (docs/HANDOFF.md). Only decode engines under "
        "pull transfers get it: under push decode waits through the whole prefill, and "
        "prefill's waits (for the reader to free blocks) are off the path. None = vLLM's.",
    )
    kv_reads_before_forward: bool = Field(
        True,
        description="A pull decode engine posts a step's KV READs before its forward pass "
        "(vLLM posts them after launching it, which on a CPU means after the whole forward: "
        "the READ was then collected a step later and the request ran two steps after its "
        "admission). Off = vLLM's order, which suits GPUs (the GPU configs set it).",
    )
    kv_ready_at_once: bool = Field(
        True, description="A decode engine goes straight to the next engine step after the "
        "step that learnt a request's KV arrived (a finished READ under pull, a 'KV written' "
        "notification under push), instead of vLLM's idle-step sleep (1 ms, or "
        "kv_wait_sleep_s) before the step that runs the request (docs/HANDOFF.md).")
    push_notif_poll_s: float | None = Field(
        PUSH_NOTIF_POLL_S,
        gt=0,
        le=0.01,
        description="How often a decode engine under push transfers drains NIXL "
        "notifications while it awaits pushed KV. vLLM's push writer thread drains them only "
        "when an engine step wakes it, and the scheduler takes a 'KV written' notification "
        "at the step after, so a pushed request waited one engine step more than needed "
        "(an idle loop's 1-2 ms on a CPU, a whole decode step under load; docs/HANDOFF.md). "
        "Only decode engines under push get it. None = vLLM's.",
    )


class ServerConfig(_Strict):
    """What the HTTP front accepts (``app.request_limits``, ``app.api_keys``)."""

    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    max_json_depth: int = Field(
        32, ge=2, le=500, description="Deeper-nested JSON bodies get 400 (a 100,000-deep body "
        "would otherwise exhaust Python's recursion).")
    body_timeout_s: float = Field(
        30.0, gt=0, description="A body not fully received within this gets 408 (slow "
        "uploads hold no engine capacity).")
    api_keys_env: str | None = Field(
        "PD_SERVE_API_KEYS", description="Environment variable (in the replicas) holding "
        "comma-separated API keys; unset or empty = no keys from the environment.")
    max_migrations: int = Field(
        2, ge=0, le=8, description="When a replica's engine dies, each of its requests "
        "moves to another replica of the deployment up to this many times (streams continue "
        "where they were, app/migration.py); 0 = off (they fail).")
    api_keys_file: str | None = Field(
        None, description="File with one API key per line (# comments). With any key "
        "configured, /v1/* require 'Authorization: Bearer <key>'; /health stays open.")


HandleTransport = Literal["grpc", "actor"]
FrontMode = Literal["engine", "separate"]
KVTransfer = Literal["pull", "push"]


class FrontConfig(_Strict):
    """Where the OpenAI HTTP front runs (README, Failover)."""

    mode: FrontMode = Field(
        "engine", description="engine: in each decode (or aggregated) replica, so tokens go "
        "from vLLM to the socket in-process; a stream dies with its replica's process. "
        "separate: its own deployment (FrontServer) that calls the engine replicas over "
        "handles; a stream whose decode replica dies, process and all, continues on another "
        "(app/migration.py), for one more hop per request. Needs routing.policy "
        "power_of_two or prefix_affinity.")
    num_replicas: int = Field(1, ge=1, description="FrontServer replicas (separate only).")
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 0}, description="FrontServer's (separate only): "
        "no CPU reserved by default, like the KV router, so it never takes an engine's.")
    max_ongoing_requests: int = Field(1000, ge=1, description="Per FrontServer replica.")


class HandoffConfig(_Strict):
    """The P/D handoff's fast path and its debug timeline (app/handoff/)."""

    first_token_from_prefill: bool = Field(
        True, description="Stream the prefill engine's token 1 to the client at once and have "
        "decode continue after it, so the KV handoff is not in the time to first token "
        "(app/handoff/first_token.py says which requests qualify).")
    timeline: bool = Field(
        False, description="Log one `pd_timeline` JSON line per request with the time of "
        "each handoff stage (debugging, bench/handoff.py); a request one engine serves whole "
        "(aggregated, local prefill) gets its own stages, the baseline to compare with.")
    handle_transport: HandleTransport = Field(
        "grpc", description="How the decode front calls prefill replicas (and peers, for "
        "migrations): 'grpc', Ray Serve's by-value channel straight to the replica's "
        "gRPC server (~1 ms less per call, measured), or 'actor', Ray actor calls. Requests "
        "over the gRPC message limit go as actor calls either way.")
    prefill_plane: bool = Field(
        True, description="The prefill leg over the app's own persistent TCP connection "
        "from each front to each prefill replica (app/handoff/prefill_plane.py), not a Ray "
        "Serve handle call: no Ray request router or thread hops on either side. Replicas "
        "are chosen as the handle would (the KV router's pick, else power of two on the "
        "front's own calls in flight); used with routing.policy kv or power_of_two, not "
        "prefix_affinity (whose choice lives in Ray's request router).")
    transfer: KVTransfer = Field(
        "pull", description="How the KV cache moves: 'pull', decode READs the prompt's "
        "blocks after prefill answered (vLLM's NixlConnector); 'push', the front sends the "
        "decode leg together with the prefill leg, decode allocates blocks while prefill "
        "computes, and prefill WRITEs the KV into them as it finishes (vLLM's "
        "NixlPushConnector; app/handoff/push.py). Push needs the prefill plane (the front "
        "must know the prefill replica up front); decode samples token 1 itself, so "
        "first_token_from_prefill does not apply to it.")
    push_early_blocks: bool = Field(
        True, description="Push: the prefill engine WRITEs each chunk's finished KV blocks "
        "into decode's while it computes the later chunks, so only the last chunk's blocks "
        "move after prefill finishes (app/handoff/early_push.py). Acts only when prefill "
        "runs a prompt in several chunks (prefill.engine_args.max_num_batched_tokens below "
        "the prompt's length) on CPU engines; elsewhere vLLM's single WRITE at the end.")
    push_complete_early: bool = Field(
        True, description="Early push: a prefill leg finishes with the step that computes "
        "its prompt's last tokens, so its worker WRITEs the blocks not sent yet, the last "
        "included, with vLLM's 'KV written' notification right after that step's forward "
        "pass, instead of when vLLM tells it of the finish at the next engine step "
        "(app/handoff/early_push.py). Prompts of one chunk take it too. Needs "
        "push_early_blocks and CPU engines.")
    push_wait_s: float = Field(
        10.0, gt=0, description="Push: how long decode may take to produce its first token "
        "after prefill answered before the front gives up on the pushed KV and decodes "
        "with local prefill. For a whole (non-streamed) answer the decode replica tells the "
        "front when token 1 is out, so only the wait for the KV is bounded, not the "
        "generation.")
    push_source_probe_s: float | None = Field(
        1.0, gt=0, description="Push: how often a decode engine checks that the prefill "
        "engine whose KV it awaits is still there (a TCP connect to its NIXL side channel, "
        "then vLLM's handshake query for the engine id served there; only for requests "
        "awaited this long). A gone one (refused twice, another engine answering there, or "
        "silent for 60 s) can no longer WRITE, so its requests are failed receives: decode "
        "frees their blocks, and recomputes a live request's prompt "
        "(app/handoff/push_source_watch.py). vLLM has no such deadline: the blocks stayed "
        "held until decode restarted. None = off.")


class MetricsConfig(_Strict):
    """Prometheus metrics through Ray's metrics agent (docs/OBSERVABILITY.md)."""

    enabled: bool = Field(
        True, description="The app's own per-phase metrics (pd_*: TTFT, TPOT, routes, "
        "fallbacks, migrations, queues, KV usage and transfers; app/metrics/).")
    engine_metrics: bool = Field(
        True, description="vLLM's own engine metrics (vllm:*, exported as ray_vllm_*) with a "
        "phase label, through vLLM's RayPrometheusStatLogger; off = vLLM keeps its default, "
        "unexported in-process Prometheus logger.")


RoutingPolicy = Literal["kv", "power_of_two", "prefix_affinity"]


class RoutingConfig(_Strict):
    """How requests are placed (``app.routing``); weights are those of ``app.routing.policy``."""

    policy: RoutingPolicy = Field(
        "kv",
        description="kv: the KV-aware ingress router picks decode and prefill replicas and "
        "decides local vs remote prefill; power_of_two: HAProxy leastconn for decode, Ray's "
        "power-of-two for prefill, always remote prefill; prefix_affinity: as power_of_two "
        "but Ray Serve LLM's PrefixCacheAffinityRouter on the prefill handle.",
    )
    prefill_timeout_s: float = Field(
        60.0, gt=0, description="A prefill slower than this falls back to local prefill."
    )
    prefill_weight: float = Field(1.0, ge=0, description="Cost per prompt block to prefill.")
    decode_weight: float = Field(1.0, ge=0, description="Cost per KV block held by running "
                                 "sequences on a decode replica.")
    kv_usage_weight: float = Field(1.0, ge=0, description="Cost of KV-cache fullness, per "
                                   "prompt block.")
    prefill_queue_weight: float = Field(1.0, ge=0, description="Prefill replica cost per "
                                        "queued prompt block.")
    local_prefill_max_tokens: int = Field(
        256, ge=0, description="Prefill on the decode replica when it would compute fewer "
        "prompt tokens than this (short prompt, or most of it cached there); 0 = never.")
    prefill_saturated_tokens: int = Field(
        8192, ge=1, description="Prefill pool saturated: every replica has this many prompt "
        "tokens queued ...")
    decode_slack_tokens: int = Field(
        2048, ge=0, description="... and the decode replica would have at most this many to "
        "prefill: prefill locally instead.")
    predicted_ttl_s: float = Field(
        2.0, gt=0, description="A routed prompt's blocks count as cached on its replicas "
        "this long, until the engine's KV events confirm them (bursts of siblings stick).")
    replica_stale_s: float = Field(
        3.0, gt=0, description="A replica whose load heartbeat is silent this long is left "
        "out of routing (it died or hangs).")
    advertise_host: str | None = Field(
        None, description="Address replicas advertise for their KV-event and load sockets "
        "and prefill replicas for their prefill plane (handoff.prefill_plane); None = the "
        "node IP.")
    bind_host: str | None = Field(
        None, description="Where those sockets listen: None = the advertised address only "
        "(cluster-internal); '*' = every interface (e.g. behind NAT, where the advertised "
        "address is not local).")

    def weights(self):
        """The policy's weights and thresholds: the fields both classes share."""
        from dataclasses import fields

        from app.routing.policy import RoutingWeights

        return RoutingWeights(**{f.name: getattr(self, f.name) for f in fields(RoutingWeights)})


class AppConfig(_Strict):
    model: ModelConfig
    mode: Mode = "disaggregated"
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vLLM engine args shared by every phase."
    )
    prefill: PhaseConfig = Field(default_factory=PhaseConfig)
    decode: PhaseConfig = Field(default_factory=PhaseConfig)
    aggregated: PhaseConfig = Field(default_factory=PhaseConfig)
    nixl: NixlConfig = Field(default_factory=NixlConfig)
    engine_process: EngineProcessConfig = Field(default_factory=EngineProcessConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    front: FrontConfig = Field(default_factory=FrontConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    handoff: HandoffConfig = Field(default_factory=HandoffConfig)
    autoscaling: AutoscalingSettings = Field(
        default_factory=AutoscalingSettings,
        description="Per-phase SLO autoscaling (autoscaling/); off = fixed num_replicas.")
    log_level: str = Field("ERROR", description="vLLM log level inside engine replicas.")

    @model_validator(mode="after")
    def _no_engine_model_override(self) -> AppConfig:
        for name, phase in (("", self), *self.phases()):
            args = phase.engine_args
            for key in ("model", "served_model_name", "kv_transfer_config", "kv_events_config"):
                if key in args:
                    raise ValueError(
                        f"{name or 'engine_args'}: set '{key}' through model/nixl settings, "
                        "not engine_args (they must agree across phases)"
                    )
        return self

    @model_validator(mode="after")
    def _start_within_bounds(self) -> AppConfig:
        if not self.autoscaling.enabled:
            return self
        for name, phase in self.phases():
            b = getattr(self.autoscaling, name)
            if not b.min_replicas <= phase.num_replicas <= b.max_replicas:
                raise ValueError(
                    f"{name}.num_replicas ({phase.num_replicas}) is the starting size and "
                    f"must lie within autoscaling.{name} [{b.min_replicas}, "
                    f"{b.max_replicas}]")
        return self

    @model_validator(mode="after")
    def _separate_front_supported(self) -> AppConfig:
        if self.front.mode != "separate":
            return self
        if self.routing.policy == "kv":
            raise ValueError(
                "front.mode 'separate' needs routing.policy 'power_of_two' or "
                "'prefix_affinity': the KV router places each request on the engine replica "
                "that serves its HTTP (front.mode 'engine')")
        if self.handoff.timeline:
            raise ValueError("handoff.timeline reads the decode engine's marks in-process: "
                             "it needs front.mode 'engine'")
        return self

    @model_validator(mode="after")
    def _same_kv_layout(self) -> AppConfig:
        """NIXL copies KV blocks as raw bytes: both phases must store them alike."""
        if self.mode == "aggregated":
            return self
        for key in ("kv_cache_dtype", "block_size"):
            p = {**self.engine_args, **self.prefill.engine_args}.get(key)
            d = {**self.engine_args, **self.decode.engine_args}.get(key)
            if p != d:
                raise ValueError(f"prefill and decode must use the same '{key}' (KV blocks "
                                 f"move between them byte for byte): {p!r} vs {d!r}; set it "
                                 "in the shared engine_args")
        return self

    def phases(self) -> list[tuple[str, PhaseConfig]]:
        if self.mode == "aggregated":
            return [("aggregated", self.aggregated)]
        return [("prefill", self.prefill), ("decode", self.decode)]

    @model_validator(mode="after")
    def _push_has_a_plane(self) -> AppConfig:
        if self.handoff.transfer == "push" and self.mode != "aggregated" and \
                not self.uses_prefill_plane:
            raise ValueError(
                "handoff.transfer 'push' sends the decode leg before prefill answers, so the "
                "front must pick the prefill replica itself: it needs handoff.prefill_plane "
                "true and routing.policy 'kv' or 'power_of_two'")
        return self

    @property
    def push_transfer(self) -> bool:
        """Whether the KV moves by push with early decode admission (app/handoff/push.py)."""
        return self.mode != "aggregated" and self.handoff.transfer == "push"

    def reads_kv(self, role: str) -> bool:
        """Whether an engine of ``role`` READs its KV from a peer: a decode engine under pull.
        It initiates every transfer it takes part in and never answers a peer's."""
        return role == "decode" and not self.push_transfer

    def nixl_progress_delay_us(self, role: str) -> int:
        """NIXL's progress-thread sleep for an engine of ``role``: a reader's can be long."""
        if self.reads_kv(role):
            return self.nixl.reader_progress_delay_us
        return self.nixl.progress_delay_us

    def kv_wait_sleep_s(self, role: str) -> float | None:
        """The engine core's idle-step sleep for an engine of ``role`` (None: vLLM's)."""
        return self.engine_process.kv_wait_sleep_s if self.reads_kv(role) else None

    def push_notif_poll_s(self, role: str) -> float | None:
        """How often an engine of ``role`` drains NIXL notifications while awaiting pushed KV
        (None: vLLM's, only when a step wakes its writer): a decode engine under push."""
        if role == "decode" and self.push_transfer:
            return self.engine_process.push_notif_poll_s
        return None

    def kv_ready_at_once(self, role: str) -> bool:
        """Whether an engine of ``role`` skips the idle-step sleep once a request's KV is in."""
        return role == "decode" and self.mode != "aggregated" and \
            self.engine_process.kv_ready_at_once

    def push_complete_early(self, role: str) -> bool:
        """Whether an engine of ``role`` WRITEs a finishing request's last blocks, with the
        notification, right after its last forward pass."""
        return self.push_early_blocks(role) and self.handoff.push_complete_early

    def push_source_probe_s(self, role: str) -> float | None:
        """How often an engine of ``role`` checks that the source of pushed KV it awaits is
        alive (None: never, vLLM's): a decode engine under push."""
        if role == "decode" and self.push_transfer:
            return self.handoff.push_source_probe_s
        return None

    def push_refusals(self, role: str) -> bool:
        """Whether an engine of ``role`` takes part in push refusals (a registration that
        came after prefill let the KV go is refused; decode computes the prompt): both
        engines under push (app/handoff/push_refusal.py)."""
        return role in ("prefill", "decode") and self.push_transfer

    def push_early_blocks(self, role: str) -> bool:
        """Whether an engine of ``role`` WRITEs finished KV blocks before its prefill ends."""
        return role == "prefill" and self.push_transfer and self.handoff.push_early_blocks

    def reads_before_forward(self, role: str) -> bool:
        """Whether an engine of ``role`` posts a step's KV READs before its forward pass."""
        return self.reads_kv(role) and self.engine_process.kv_reads_before_forward

    @property
    def uses_prefill_plane(self) -> bool:
        """Whether prefill legs take app/handoff/prefill_plane.py (``handoff.prefill_plane``)."""
        return (self.mode != "aggregated" and self.handoff.prefill_plane
                and self.routing.policy != "prefix_affinity")

    def engine_kwargs(self, role: str, kv_buffer_device: str) -> dict[str, Any]:
        """vLLM engine kwargs for one role: shared args, phase args, then the KV connector."""
        phase = {"prefill": self.prefill, "decode": self.decode}.get(role, self.aggregated)
        kwargs: dict[str, Any] = {"model": self.model.path, **self.engine_args}
        kwargs.update(phase.engine_args)
        kwargs.update(engine_placement_args(kwargs))
        if role in ("prefill", "decode"):
            kv: dict[str, Any] = {
                "kv_connector": "NixlPushConnector" if self.push_transfer else "NixlConnector",
                "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
                "kv_buffer_device": kv_buffer_device,
                "kv_connector_extra_config": {"kv_lease_duration": self.nixl.kv_lease_s},
            }
            if role == "decode":
                kv["kv_load_failure_policy"] = self.nixl.kv_load_failure_policy
            kwargs["kv_transfer_config"] = kv
        return kwargs


def parse_core_spec(spec: str) -> set[int]:
    """'0', '0-3' or '0,2,4-5' -> a set of core ids (the format of taskset -c)."""
    cores: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if hi < lo:
                raise ValueError(f"bad core range {part!r}")
            cores.update(range(lo, hi + 1))
        else:
            cores.add(int(part))
    if not cores:
        raise ValueError(f"empty core spec {spec!r}")
    return cores
