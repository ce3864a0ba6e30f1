"""The key schema: every key fleetgate keeps in Redis, under one prefix with a hash tag.

All keys share the tag ``{prefix}``, so every script's keys live in one Redis Cluster slot.
This schema is a public interface (ops tools write it): see docs/state.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeySchema:
    """Builds key names; the hash tag comes from :meth:`tag` alone, the one place to change it."""

    prefix: str = "fleetgate"

    def tag(self) -> str:
        return "{" + self.prefix + "}"

    @property
    def nodes(self) -> str:
        return f"{self.tag()}:nodes"

    @property
    def epoch(self) -> str:
        return f"{self.tag()}:epoch"

    @property
    def restore_record(self) -> str:
        """The registry's generation, and who restored it last, when and what (a hash)."""
        return f"{self.tag()}:restore"

    @property
    def cursor(self) -> str:
        return f"{self.tag()}:rr"

    @property
    def ejected(self) -> str:
        return f"{self.tag()}:ejected"

    @property
    def replicas(self) -> str:
        return f"{self.tag()}:replicas"

    @property
    def leader(self) -> str:
        return f"{self.tag()}:checker:leader"

    @property
    def fence(self) -> str:
        return f"{self.tag()}:checker:fence"

    @property
    def api_keys(self) -> str:
        return f"{self.tag()}:keys"

    @property
    def keys_required(self) -> str:
        """Set once a client key was stored: the OpenAI API needs a key even when none is left,
        until an operator opens it (``fleetgate keys open``)."""
        return f"{self.tag()}:keys:required"

    @property
    def events(self) -> str:
        return f"{self.tag()}:events"

    @property
    def session_ids(self) -> str:
        return f"{self.tag()}:session_ids"

    @property
    def pd_pairs(self) -> str:
        """Connected prefill/decode pairs: field "prefill decode" -> ms connected."""
        return f"{self.tag()}:pd:pairs"

    @property
    def pd_sessions(self) -> str:
        """Prefill sessions in migration: session id -> "prefill decode replica"."""
        return f"{self.tag()}:pd:sessions"

    @property
    def pd_deadlines(self) -> str:
        """Deadlines of the prefill sessions in migration (session id scored by ms)."""
        return f"{self.tag()}:pd:deadlines"

    def pd_lock(self, pair: str) -> str:
        """The connect lock of one pair ("prefill decode"; ids hold no spaces)."""
        return f"{self.tag()}:pd:lock:{pair.replace(' ', '|')}"

    def node(self, node_id: str) -> str:
        return f"{self.tag()}:node:{node_id}"

    def leases(self, node_id: str) -> str:
        return f"{self.tag()}:leases:{node_id}"

    def latencies(self, node_id: str) -> str:
        return f"{self.tag()}:lat:{node_id}"

    def prefix_blocks(self, node_id: str) -> str:
        """The prompt blocks routed to a node (cache_aware), scored by last use."""
        return f"{self.tag()}:prefix:{node_id}"

    def key_rate(self, digest: str) -> str:
        """Rate-limit state (GCRA arrival time) of the client key with this hex digest."""
        return f"{self.tag()}:limit:rpm:{digest}"

    def key_leases(self, digest: str) -> str:
        """Concurrency leases of the client key with this hex digest."""
        return f"{self.tag()}:limit:conc:{digest}"

    @property
    def queue_seq(self) -> str:
        """The sequence of queue tickets (arrival order between equal start tags)."""
        return f"{self.tag()}:queue:seq"

    @property
    def responses(self) -> str:
        """Stored responses (the Responses API): response id -> "<node id>\n<model>"."""
        return f"{self.tag()}:responses"

    @property
    def response_times(self) -> str:
        """The same response ids scored by when they were recorded (ms)."""
        return f"{self.tag()}:responses:times"

    @property
    def admit_channel(self) -> str:
        """The prefix of the replicas' admission channels (pub/sub, not a key: the replica id
        follows)."""
        return f"{self.tag()}:admit:"

    def queue_tickets(self, model: str, role: str, priority: str) -> str:
        """The tickets of one priority ("high", "normal", "low") in the fleet's queue of
        requests for ``model`` in ``role`` ("0": any), by fair-share start tag."""
        return f"{self.tag()}:queue:{role}:{model}:{priority}"

    def queue_deadlines(self, model: str, role: str) -> str:
        """The deadlines of the tickets in one queue, renewed by their replicas."""
        return f"{self.tag()}:queue:{role}:{model}:deadlines"

    def queue_fair(self, model: str, role: str) -> str:
        """The fair-share clocks of one queue."""
        return f"{self.tag()}:queue:{role}:{model}:fair"

    def queue_keys(self, model: str, role: int) -> tuple[str, str, str, str, str]:
        """One queue's keys in the admission scripts' order: tickets high, normal, low, the
        deadlines, the fair-share clocks."""
        r = str(role)
        return (
            self.queue_tickets(model, r, "high"),
            self.queue_tickets(model, r, "normal"),
            self.queue_tickets(model, r, "low"),
            self.queue_deadlines(model, r),
            self.queue_fair(model, r),
        )

    def node_keys(self, node_id: str) -> tuple[str, str, str]:
        """The node hash, lease set and latency list of one node, in pick.lua's order."""
        return self.node(node_id), self.leases(node_id), self.latencies(node_id)
