"""How rank 0 tells the other ranks what to do next: one small broadcast per step.

While requests run, each step starts with a fixed-size header over the group's fast collectives
(shared memory between local ranks: microseconds), followed by the pickled plan only when the plan
carries something (requests joining or leaving). When nothing runs, the ranks must not spin or time
out in a shared-memory wait: rank 0 says ``IDLE`` and every rank then blocks in a gloo broadcast
(a socket read, no CPU), which rank 0 completes when work arrives, or every ``KEEPALIVE_SECONDS``
so that no collective timeout fires on a quiet server.
"""

from __future__ import annotations

import pickle

import torch

from ..parallel.comm import Collectives

STEP, IDLE, SWAP, STOP = 1, 2, 3, 4
KEEPALIVE_SECONDS = 30.0


class Control:
    def __init__(self, comm: Collectives):
        self.comm = comm
        self.followers = comm.world_size > 1

    def send(self, kind: int, payload: object = None) -> None:
        """Rank 0: announce the next action (and its payload, pickled) to every rank."""
        if not self.followers:
            return
        blob = b"" if payload is None else pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        self.comm.host_broadcast(torch.tensor([kind, len(blob)], dtype=torch.int64))
        if blob:
            self.comm.host_broadcast(torch.frombuffer(bytearray(blob), dtype=torch.uint8))

    def receive(self) -> tuple[int, object]:
        """Other ranks: the next action and its payload (None if it has none)."""
        header = self.comm.host_broadcast(torch.zeros(2, dtype=torch.int64))
        kind, size = int(header[0]), int(header[1])
        if not size:
            return kind, None
        blob = self.comm.host_broadcast(torch.empty(size, dtype=torch.uint8))
        # Sent by rank 0 of our own process group, which the engine's parent started: a trusted peer.
        return kind, pickle.loads(blob.numpy().tobytes())

    def wake(self, work: bool) -> None:
        """Rank 0, after ``send(IDLE)``: release the waiting ranks, to work or to wait again."""
        if self.followers:
            self.comm.host_broadcast(torch.tensor([int(work)]), fast=False)

    def wait_for_wake(self) -> None:
        """Other ranks, after receiving ``IDLE``: block (without spinning) until rank 0 has work."""
        flag = torch.zeros(1, dtype=torch.int64)
        while True:
            self.comm.host_broadcast(flag, fast=False)
            if flag.item():
                return
