import torch

from server.engine.block_manager import BlockManager
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SequenceStatus


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
