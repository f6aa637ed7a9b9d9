"""Helper threads hold themselves to one intra-op thread without lowering anyone else's count."""
import threading

import pytest
import torch

from loraserve.intra_op_threads import hold_helper_to_one_thread


def run_in_thread(function) -> None:
    thread = threading.Thread(target=function)
    thread.start()
    thread.join()


def test_a_helper_on_one_thread_leaves_a_later_thread_at_the_default() -> None:
    """The step thread's first parallel operation may come after a helper started (torch.set_num_threads(1) in the
    helper would then put the step thread on one core for good)."""
    default = torch.get_num_threads()
    if default < 2:
        pytest.skip("this machine runs one intra-op thread: there is nothing to lower")
    counts: dict[str, int] = {}

    def helper() -> None:
        hold_helper_to_one_thread()
        torch.zeros(64, 1024)[torch.arange(0, 64, 2)] = 1.0  # tensor work, as the loader does
        counts["helper"] = torch.get_num_threads()

    def later_thread() -> None:
        torch.zeros(64, 1024)[torch.arange(0, 64, 2)] = 1.0  # its first parallel operation
        counts["later"] = torch.get_num_threads()

    run_in_thread(helper)
    run_in_thread(later_thread)
    assert counts == {"helper": 1, "later": default}
