import sys
from pathlib import Path

import pytest
import torch

from loraserve.huge_pages import HUGE_PAGE_BYTES, advise_huge_pages

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_eligible(address: int) -> bool:
    """What /proc/self/smaps says of the mapping holding `address`: may the kernel back it with huge pages?"""
    eligible, inside = False, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "THPeligible:":
            eligible = line.split()[1] == "1"
    return eligible


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP_SETTING.exists()
                    or "[never]" in THP_SETTING.read_text(), reason="no transparent huge pages here")
def test_advised_memory_may_be_backed_by_huge_pages():
    tensor = torch.empty(4 * HUGE_PAGE_BYTES, dtype=torch.uint8)
    inner = -(-tensor.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    assert advise_huge_pages(tensor)
    assert thp_eligible(inner)
    tensor.fill_(7)  # still ordinary memory to use
    assert int(tensor.sum()) == 7 * tensor.numel()


def test_memory_too_small_for_a_huge_page_is_left_alone():
    assert not advise_huge_pages(torch.empty(HUGE_PAGE_BYTES // 2, dtype=torch.uint8))
