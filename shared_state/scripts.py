"""The Lua scripts of shared_state/lua, loaded once and run by SHA with a fallback to EVAL."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any, Protocol

from redis.exceptions import NoScriptError


class ScriptClient(Protocol):
    """What runs a script: a redis-py client or the :class:`AutoPipeline`."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any: ...


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


class Script:
    """One ``.lua`` file; runs with EVALSHA and loads itself when the server lacks it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = _read("_prelude") + _read(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, client: ScriptClient, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


PICK = Script("pick")
PICK_PREFIX = Script("pick_prefix")
PREFIX_FORGET = Script("prefix_forget")
RELEASE = Script("release")
ENQUEUE = Script("enqueue")
ADMIT = Script("admit")
DEQUEUE = Script("dequeue")
RESPONSE_RECORD = Script("response_record")
RESPONSE_LOOKUP = Script("response_lookup")
RESPONSE_FORGET = Script("response_forget")
RENEW = Script("renew")
NODE_UPSERT = Script("node_upsert")
NODE_REMOVE = Script("node_remove")
REGISTRY_RESTORE = Script("registry_restore")
LEADER = Script("leader")
HEALTH_REPORT = Script("health_report")
SWEEP = Script("sweep")
KEY_ADD = Script("key_add")
KEY_REVOKE = Script("key_revoke")
KEY_OPEN = Script("key_open")
KEY_LIMIT = Script("key_limit")
KEY_LIMIT_RELEASE = Script("key_limit_release")
PD_OPEN = Script("pd_open")
PD_SHELVE = Script("pd_shelve")
PD_CLOSE = Script("pd_close")
PD_RENEW = Script("pd_renew")
PD_EXPIRE = Script("pd_expire")
PD_CONNECTED = Script("pd_connected")
PD_UNLOCK = Script("pd_unlock")
PD_LOCK = Script("pd_lock")
PD_DROP = Script("pd_drop")
