"""Where everything lives in Redis: every key name the store writes is spelled here, and only here.

Per session (hash tag `{tenant:sid}`, so a Redis Cluster keeps one session on one slot and its Lua
scripts stay single-slot; `tenant` and `sid` are validated by the caller and never hold braces):
`:meta` (hash, with a random `incarnation` set at creation), `:turns` (list of message JSON), `:teach`
(list of pair JSON), `:memories` (list of the pairs learned from, JSON, bounded), `:ckpt:{n}` (hash:
data, sha256, created_at; the newest `max_checkpoints` kept), `:idem:{key}` (string
"request-sha256|result", TTL), `:idem` (sorted set of those keys by time, to bound their number),
`:lock`, `:keys` (set of the dynamic keys above, so deletion needs no SCAN).

Global: the tenant's session index, the A0 of each base model (`a0v2`, a hash {data, sha256}, written
once), the job stream with its consumer group and dead letters, the per-tenant update budgets and
the per-API-key rate-limit windows. Existing data depends on these names: change none of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyLayout:
    """The key names under one prefix (`tmem` unless configured)."""

    prefix: str = "tmem"

    def session(self, tenant: str, sid: str, part: str) -> str:
        """One key of a session, e.g. `tmem:{default:alice}:meta`."""
        return f"{self.prefix}:{{{tenant}:{sid}}}:{part}"

    def checkpoint(self, tenant: str, sid: str, version: int) -> str:
        """The hash holding one adapter version's bytes."""
        return f"{self.checkpoints(tenant, sid)}{version}"

    def checkpoints(self, tenant: str, sid: str) -> str:
        """What every checkpoint key of the session starts with (the version follows)."""
        return self.session(tenant, sid, "ckpt:")

    def session_pattern(self, tenant: str, sid: str) -> str:
        """The SCAN pattern matching every key of one session."""
        return f"{_glob_escape(self.prefix)}:{{{_glob_escape(tenant)}:{_glob_escape(sid)}}}:*"

    def tenant_sessions(self, tenant: str) -> str:
        """The set of a tenant's session ids (for the per-tenant session cap)."""
        return f"{self.prefix}:tenant:{{{tenant}}}:sessions"

    def a0(self, identity: str) -> str:
        # v2: a hash {data, sha256}; v1 was a bare string written by every worker (last writer won).
        return f"{self.prefix}:a0v2:{identity}"

    @property
    def jobs_stream(self) -> str:
        """The update job stream."""
        return f"{self.prefix}:jobs"

    @property
    def workers_group(self) -> str:
        """The consumer group every worker reads the job stream through."""
        return f"{self.prefix}:workers"

    @property
    def dead_letters(self) -> str:
        """The stream of jobs given up on."""
        return f"{self.prefix}:jobs:dead"

    def update_budget(self, tenant: str, minute: int) -> str:
        """The counter of a tenant's updates in one minute (minutes since the epoch)."""
        return f"{self.prefix}:update-budget:{{{tenant}}}:{minute}"

    def rate_limit(self, kind: str, key_id: str, window: int) -> str:
        """The counter of one API key's requests (`req`) or tokens (`tok`) in one window."""
        return f"{self.prefix}:rl:{kind}:{{{key_id}}}:{window}"


def _glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so a session id like `a*` matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
