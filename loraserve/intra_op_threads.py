"""How the step thread and the helper threads share the cores.

While a helper works, the step thread leaves it a core: with more busy threads than cores, every parallel region
of a step waits for a worker the OS has descheduled (a step at 64 requests went from 0.3 s to 2-4 s while the
adapter loader ran beside it).

A thread that runs a parallel region keeps an OpenMP team for life, and with more teams than cores libgomp
throttles the step thread's (each decode step on 2 cores 1.65x slower); so helpers (the adapter loader, the CPU
LoRA kernel's build) hold themselves to one thread. `torch.set_num_threads(1)` would do it but also lowers the
process default, which any library re-reads for a thread the first time that library's inlined `at::parallel_for`
runs there (each shared object has its own thread-local flag): the CPU LoRA kernel's first call then put the step
thread on one core for good (decode at batch 64: 440 ms a step instead of 290). So the helper takes torch's count
first (its own first initialization) and then lowers only its own OpenMP setting.
"""
import ctypes

import torch

STEP_THREADS = torch.get_num_threads()  # the process default (OMP_NUM_THREADS, else the physical cores)


def hold_helper_to_one_thread() -> None:
    """The calling helper thread runs its tensor work on itself alone; other threads keep their counts."""
    torch.get_num_threads()  # torch initializes this thread's count now, so it never overrides ours later
    try:
        ctypes.CDLL(None).omp_set_num_threads(1)  # the OpenMP runtime torch loaded; this thread's setting only
    except AttributeError:  # torch built without OpenMP: its own pool is shared, there is no team to avoid
        pass


def share_cores_with_helper(helper_busy: bool) -> None:
    """Called by the step thread before each step: one core fewer for itself while a helper works."""
    threads = max(1, STEP_THREADS - 1) if helper_busy else STEP_THREADS
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
