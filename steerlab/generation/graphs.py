"""A decode step captured once as a CUDA graph and replayed (run as is off CUDA)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class CapturedStep:
    """A decode step: on CUDA captured once as a graph and replayed, elsewhere run as is.

    Capture runs the step for real (warm-up and recording), so the small state tensors are
    restored afterwards; the cache writes it makes are the ones the real step makes anyway.
    A step that cannot be captured (a hook that reads from the device) runs uncaptured, with
    a warning.
    """

    def __init__(self, device: torch.device, graphs: bool, state: dict[str, torch.Tensor]):
        self.graph: Any = None
        self.state = state
        self.wanted = graphs and device.type == "cuda"

    def run(self, fn: Callable[[], None]) -> None:
        """Run the step: replay the graph, capture ``fn`` the first time, or just call it.

        ``fn`` must read and write only the workspace's tensors (and the weights): a graph
        replays the addresses it saw when captured."""
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.wanted:
            fn()
            return
        self.wanted = False  # capture once
        # The warm-up runs the step for real, advancing the decode state (tokens, counts,
        # write positions; a capture only records): it is saved here and put back after each
        # run, so the step that follows starts from the state it was given. The KV cache is
        # not saved: a warm-up writes there what the real step writes, at the same positions.
        saved = {k: v.clone() for k, v in self.state.items()}
        try:
            # Warm-up, as in PyTorch's CUDA-graph recipe (a few calls on a side stream, then
            # joined back): a step's first calls do lazy one-time CUDA work (library handles
            # and workspaces, kernel choice, allocator growth) that must happen before the
            # capture, not be recorded into it. Two calls leave a margin for work a first call
            # leaves to the next.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
                    _restore(self.state, saved)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=_pool()):  # one pool for every step: see _pool
                fn()
            self.graph = graph
        except RuntimeError as err:
            log.warning("the decode step could not be captured as a CUDA graph (%s); "
                        "running it without one", str(err).splitlines()[0])
            torch.cuda.synchronize()
        _restore(self.state, saved)  # also after a warm-up that failed half-way
        self.run(fn)


def _restore(state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    for k, v in saved.items():
        state[k].copy_(v)


_POOL: Any = None


def _pool() -> Any:
    # One memory pool for every captured step, not a private pool per graph (each would hold
    # its intermediates for as long as the graph lives: one per bucket and step structure).
    # Sharing is safe because steps replay one at a time and keep nothing in pool memory
    # that a later step reads: what a step keeps goes into its workspace (state, KV cache).
    global _POOL
    if _POOL is None:
        _POOL = torch.cuda.graph_pool_handle()
    return _POOL
