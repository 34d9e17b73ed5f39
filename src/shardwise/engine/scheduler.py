"""Rank 0's loop: admit requests into free cache rows, run steps, report tokens to the engine.

Continuous batching: a request that arrives while others decode joins at the next step (its prompt is
prefilled alone into a free row, and from then on it decodes with the rest); a request that ends frees
its row for the next one in the queue. The parent process only submits, cancels and reads events:
the step loop runs here, next to the model, so a call costs the parent two small messages, not one
per token.

Messages from the engine (``conn``): ``("submit", id, prompt, sampling, max_tokens, ignore_eos)``,
``("cancel", id)``, ``("swap", swap_id, path)``, ``("close",)``; end of file (the parent died) is a
close. To the engine: ``("ready", info)``, ``("events", [(id, token, finish, rank_seconds)])``,
``("swapped", swap_id, error, seconds, bytes)``, ``("closed",)``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from ..errors import ShardwiseError
from ..generation import Sampling
from .control import IDLE, KEEPALIVE_SECONDS, STEP, STOP, SWAP, Control
from .steps import Join, StepPlan, StepRunner


@dataclass
class _Request:
    request_id: int
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    received: float
    ignore_eos: bool = False
    slot: int = -1
    generated: int = 0


class Scheduler:
    def __init__(self, conn, runner: StepRunner, control: Control, rows: int, max_len: int,
                 eos_token_ids: tuple[int, ...]):
        self.conn, self.runner, self.control = conn, runner, control
        self.max_len, self.eos = max_len, set(eos_token_ids)
        self.free = list(range(rows))
        self.waiting: deque[_Request] = deque()
        self.running: dict[int, _Request] = {}  # request id -> request
        self.leaves: list[int] = []  # rows freed since the last step
        self.swaps: deque[tuple[int, str]] = deque()
        self.closing = False

    def serve(self) -> None:
        idle = False
        while not self.closing:
            if not (self.running or self.waiting or self.swaps):
                if not idle:
                    self.control.send(IDLE)
                    idle = True
                work = self.conn.poll(KEEPALIVE_SECONDS)
                self.control.wake(work)  # without work the other ranks just wait again
                if work:
                    idle = False
                    self._receive_all(block=False)
                continue
            self._receive_all(block=False)
            if self.closing:
                break
            if self.swaps and not self.running:  # a swap waits for the running requests to finish
                self._swap(*self.swaps.popleft())
                continue
            joins = []
            while self.waiting and self.free and not self.swaps:
                request = self.waiting.popleft()
                request.slot = self.free.pop(0)
                self.running[request.request_id] = request
                joins.append(Join(request.request_id, request.slot, request.prompt, request.sampling))
            if not self.running:
                continue
            plan = StepPlan(joins, self._take_leaves())
            self.control.send(STEP, plan if (plan.joins or plan.leaves) else None)
            self._report(self.runner.step(plan))
        self.control.send(STOP)
        self._send(("closed",))

    def _take_leaves(self) -> list[int]:
        leaves, self.leaves = self.leaves, []
        return leaves

    def _receive_all(self, block: bool) -> None:
        while self.conn.poll(None if block else 0):
            block = False
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the engine's process is gone: nobody to serve
                self.closing = True
                return
            kind = message[0]
            if kind == "submit":
                _, request_id, prompt, sampling, max_tokens, ignore_eos = message
                self.waiting.append(_Request(request_id, prompt, sampling, max_tokens, time.perf_counter(), ignore_eos))
            elif kind == "cancel":
                self._cancel(message[1])
            elif kind == "swap":
                self.swaps.append((message[1], message[2]))
            elif kind == "close":
                self.closing = True
                return

    def _cancel(self, request_id: int) -> None:
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                self._send(("events", [(request_id, None, "cancelled", time.perf_counter() - request.received)]))
                return
        request = self.running.pop(request_id, None)
        if request is not None:
            self._release(request)
            self._send(("events", [(request_id, None, "cancelled", time.perf_counter() - request.received)]))

    def _release(self, request: _Request) -> None:
        self.leaves.append(request.slot)
        self.free.append(request.slot)
        self.free.sort()  # lowest rows first: keeps the running rows together

    def _report(self, tokens: list[tuple[int, int]]) -> None:
        now = time.perf_counter()
        events = []
        for request_id, token in tokens:
            request = self.running.get(request_id)
            if request is None:
                continue
            request.generated += 1
            finish = None
            if token in self.eos and not request.ignore_eos:
                finish = "stop"
            elif request.generated >= request.max_tokens or len(request.prompt) + request.generated >= self.max_len:
                finish = "length"
            if finish:
                del self.running[request_id]
                self._release(request)
            events.append((request_id, token, finish, now - request.received if finish else 0.0))
        if events:
            self._send(("events", events))

    def _swap(self, swap_id: int, path: str) -> None:
        self.control.send(SWAP, path)
        try:
            seconds, bytes_read = self.runner.swap(path)
            self._send(("swapped", swap_id, "", seconds, bytes_read))
        except ShardwiseError as exc:
            self._send(("swapped", swap_id, str(exc), 0.0, 0))

    def _send(self, message) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, EOFError, OSError):
            self.closing = True


def follow(runner: StepRunner, control: Control) -> None:
    """Every rank but 0: do what rank 0 announces, until it says stop."""
    while True:
        kind, payload = control.receive()
        if kind == STEP:
            runner.step(payload or StepPlan())
        elif kind == IDLE:
            control.wait_for_wake()
        elif kind == SWAP:
            try:
                runner.swap(payload)
            except ShardwiseError:
                pass  # rank 0 reports it; every rank reached the same verdict
        elif kind == STOP:
            return
        else:
            raise ShardwiseError(f"unknown engine control message {kind}")
