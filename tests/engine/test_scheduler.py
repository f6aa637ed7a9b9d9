import pytest
import torch

from loraserve.engine.block_manager import BlockManager
from loraserve.engine.sampling_params import SamplingParams
from loraserve.engine.scheduler import Scheduler
from loraserve.engine.sequence import Sequence, SequenceStatus


def make_sequence(request_id: str, num_tokens: int) -> Sequence:
    return Sequence(request_id, list(range(num_tokens)), num_tokens, SamplingParams(), torch.Generator())


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule, then pretend the model ran: advance computed tokens and sample a token where due."""
    batch = scheduler.schedule()
    for sequence, num_new in zip(batch.sequences, batch.num_new_tokens):
        sequence.num_computed_tokens += num_new
        if sequence.num_computed_tokens == sequence.num_tokens:
            sequence.token_ids.append(0)
    return {s.request_id: n for s, n in zip(batch.sequences, batch.num_new_tokens)}


def test_long_prompt_is_chunked_and_decodes_share_the_budget():
    scheduler = Scheduler(BlockManager(64, 4), max_num_batched_tokens=8, max_num_seqs=4)
    scheduler.add(make_sequence("short", 3))
    scheduler.add(make_sequence("long", 20))
    assert run_step(scheduler) == {"short": 3, "long": 5}
    assert run_step(scheduler) == {"short": 1, "long": 7}  # a decode and a prefill chunk in one step
    assert run_step(scheduler) == {"short": 1, "long": 7}
    assert run_step(scheduler) == {"short": 1, "long": 1}


def test_a_prefill_limit_caps_prompt_tokens_but_never_decodes():
    """What a step computes while the adapter loader borrows a core: prompt chunks up to the limit, every decode."""
    scheduler = Scheduler(BlockManager(64, 4), max_num_batched_tokens=16, max_num_seqs=8)
    for name in "ab":
        scheduler.add(make_sequence(name, 2))
    assert run_step(scheduler) == {"a": 2, "b": 2}
    scheduler.add(make_sequence("long", 10))
    scheduler.add(make_sequence("next", 3))
    batch = scheduler.schedule(prefill_limit=4)
    assert {s.request_id: n for s, n in zip(batch.sequences, batch.num_new_tokens)} == {"a": 1, "b": 1, "long": 4}
    for sequence, num_new in zip(batch.sequences, batch.num_new_tokens):
        sequence.num_computed_tokens += num_new
        sequence.token_ids.extend([0] * (sequence.num_computed_tokens == sequence.num_tokens))
    batch = scheduler.schedule(prefill_limit=0)  # decodes only: the running prompt waits, nobody is admitted
    assert {s.request_id: n for s, n in zip(batch.sequences, batch.num_new_tokens)} == {"a": 1, "b": 1}
    assert [s.request_id for s in scheduler.waiting] == ["next"]


def test_max_num_seqs_bounds_the_running_batch_and_order_is_first_come():
    scheduler = Scheduler(BlockManager(64, 4), max_num_batched_tokens=100, max_num_seqs=2)
    for name in "abc":
        scheduler.add(make_sequence(name, 2))
    assert list(run_step(scheduler)) == ["a", "b"]
    assert [s.request_id for s in scheduler.waiting] == ["c"]


def test_newest_request_is_preempted_and_recomputed_when_blocks_run_out():
    manager = BlockManager(num_blocks=4, block_size=2, enable_caching=False)  # else new would share old's block
    scheduler = Scheduler(manager, max_num_batched_tokens=100, max_num_seqs=4)
    old, new = make_sequence("old", 4), make_sequence("new", 3)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # old: 2 blocks, new: 2 blocks, cache full
    assert manager.num_free_blocks == 0
    scheduled = run_step(scheduler)  # old needs a third block: new must go
    assert scheduled == {"old": 1}
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert scheduler.waiting[0] is new
    scheduler.finish(old, "stop")
    assert run_step(scheduler) == {"new": 4}  # its prompt and its sampled token, recomputed
    scheduler.finish(new, "stop")
    assert manager.num_free_blocks == 4


def test_waiting_request_that_does_not_fit_blocks_later_ones():
    scheduler = Scheduler(BlockManager(3, 2), max_num_batched_tokens=100, max_num_seqs=4)
    scheduler.add(make_sequence("big", 8))
    scheduler.add(make_sequence("small", 1))
    assert run_step(scheduler) == {}
    assert [s.request_id for s in scheduler.waiting] == ["big", "small"]


class FakeAdapters:
    """Slots for `num_slots` adapters, each held by the running requests that use it. An adapter not in a slot
    takes one as soon as some slot has no holder (what the loader would do, between steps)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.holders: dict[str, int] = {}  # adapter -> running requests holding it, in slot order

    def hold(self, adapter: str) -> int | None:
        if adapter not in self.holders:
            unheld = [name for name, count in self.holders.items() if count == 0]
            if len(self.holders) == self.num_slots and not unheld:
                return None
            if len(self.holders) == self.num_slots:
                del self.holders[unheld[0]]
            self.holders[adapter] = 0
        self.holders[adapter] += 1
        return list(self.holders).index(adapter)

    def release(self, adapter: str) -> None:
        self.holders[adapter] -= 1

    def unpin(self, adapter: str) -> None:
        pass


def adapter_sequence(request_id: str, adapter: str | None, max_tokens: int = 16) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(request_id, [1, 2, 3], 3, params, torch.Generator(), adapter=adapter)


def test_requests_that_can_run_pass_one_waiting_for_a_slot():
    adapters = FakeAdapters(num_slots=1)
    scheduler = Scheduler(BlockManager(64, 4), max_num_batched_tokens=100, max_num_seqs=8, adapters=adapters)
    scheduler.add(adapter_sequence("holds-x", "x"))
    assert list(run_step(scheduler)) == ["holds-x"]  # x is in the only slot, held
    for request_id, adapter in [("needs-y", "y"), ("base", None), ("also-x", "x")]:
        scheduler.add(adapter_sequence(request_id, adapter))
    assert list(run_step(scheduler)) == ["holds-x", "base", "also-x"]
    assert [sequence.request_id for sequence in scheduler.waiting] == ["needs-y"]
    assert scheduler.waiting[0].overtaken_steps == 1


def finish_done(scheduler: Scheduler) -> None:
    """Retire running requests that reached their max_tokens."""
    for sequence in list(scheduler.running):
        if sequence.num_output_tokens >= sequence.params.max_tokens:
            scheduler.finish(sequence, "length")


@pytest.mark.parametrize("bound", [4, 16])
def test_an_endless_stream_of_runnable_requests_passes_a_waiting_one_for_a_bounded_time(bound):
    """Every step a new request for the resident adapter arrives, so its slot is never free while anyone may pass:
    the request for another adapter is admitted once passing stops and the running ones finish."""
    adapters = FakeAdapters(num_slots=1)
    scheduler = Scheduler(BlockManager(256, 4), max_num_batched_tokens=100, max_num_seqs=64, adapters=adapters,
                          max_overtaking_steps=bound)
    scheduler.add(adapter_sequence("x-0", "x", max_tokens=3))
    run_step(scheduler)
    waiting = adapter_sequence("needs-y", "y")
    scheduler.add(waiting)
    for step in range(1, 200):
        scheduler.add(adapter_sequence(f"x-{step}", "x", max_tokens=3))
        scheduled = run_step(scheduler)
        finish_done(scheduler)
        if "needs-y" in scheduled:
            break
    assert "needs-y" in scheduled and step <= bound + 4  # the x requests passed before the bound take 3 steps
    assert waiting.overtaken_steps == bound


def test_without_a_bound_the_waiting_request_would_starve():
    adapters = FakeAdapters(num_slots=1)
    scheduler = Scheduler(BlockManager(256, 4), max_num_batched_tokens=100, max_num_seqs=64, adapters=adapters,
                          max_overtaking_steps=10**9)
    scheduler.add(adapter_sequence("x-0", "x", max_tokens=3))
    scheduler.add(adapter_sequence("needs-y", "y"))
    for step in range(1, 100):
        scheduler.add(adapter_sequence(f"x-{step}", "x", max_tokens=3))
        assert "needs-y" not in run_step(scheduler)
        finish_done(scheduler)
