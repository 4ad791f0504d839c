"""--resume: is the unfinished run at --out this run, and which of its items are verifiably done?"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from raymerge.errors import OutputError
from raymerge.execution.journal import JournalState
from raymerge.planning.plan import Plan
from raymerge.records import ItemRecord, staged_items
from raymerge.storage import urls
from raymerge.storage.writers import Output, ShardState, Target

progress_log = logging.getLogger("raymerge.progress")


@dataclass(frozen=True)
class Resumed:
    handles: list[str]
    done: dict[int, ItemRecord]  # journaled items whose bytes are there
    next_batch: int
    replaces: tuple[str, ...]  # the old checkpoint's files the interrupted run was to replace


def check_resumable(output: Output, plan: Plan, state: JournalState) -> Resumed:
    """Refuse a resume whose plan or inputs changed; keep only journaled items whose bytes are there."""
    head = state.head
    shown = urls.redact(output.url)
    if head.plan_hash != plan.hash:
        raise OutputError(f"--resume {shown}: {_what_changed(plan, head.inputs)} the interrupted run (plan "
                          f"{head.plan_hash[:12]} then, {plan.hash[:12]} now); rerun with --overwrite to start "
                          "over, or with the original inputs and options")
    output.check_handles(list(head.shards), list(head.handles))
    handles = list(head.handles)
    done: dict[int, ItemRecord] = {}
    for s, shard in enumerate(plan.shards):
        target = Target(shard.name, handles[s], shard.size, head.identities[s])
        found = output.verify_staged(target, staged_items(plan, s, state.done))
        # A shard already final is whole only if the journal says every item of it was written.
        if found.state is ShardState.GONE or (found.state is ShardState.FINAL
                                              and not all(i in state.done for i in shard.items)):
            raise OutputError(f"--resume {shown}: the staged data of {shard.name} is gone; "
                              "rerun with --overwrite to start over")
        # A record whose sums name no tensor of the plan is damaged: its item is done again.
        done.update((i, state.done[i]) for i in shard.items if i in found.items
                    and all(0 <= s.tensor < len(plan.tensors) for s in state.done[i].sums))
    progress_log.info("resume: %d of %d items already done (%d journaled)", len(done), len(plan.items),
                      len(state.done))
    return Resumed(handles, done, state.next_batch, head.replaces)


def _what_changed(plan: Plan, then: tuple[tuple[str, str], ...]) -> str:
    """'input X changed since', naming a moved or rewritten input when there is one."""
    before = {urls.unpinned(u): f for u, f in then}
    for f in plan.files:
        url = urls.redact(f.url)
        old = before.get(urls.unpinned(url))
        if old is not None and (old != f.fingerprint or (url, old) not in then):
            return f"input {urls.unpinned(url)} changed since"
    return "the recipe, inputs or options differ from"
