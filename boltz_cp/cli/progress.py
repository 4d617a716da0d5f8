"""Line-based progress on the writer rank(s): readable in a terminal and in a SLURM log."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager, redirect_stdout


class Progress:
    """Prints `[boltz_cp  12.3s] stage: message` lines to stderr when enabled; `prefix` (e.g.
    "[mesh 1] ") follows the time, so the lines of several meshes stay apart."""

    def __init__(self, enabled: bool, prefix: str = "") -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            self.warn(msg)

    def warn(self, msg: str) -> None:
        """Always printed, progress or not."""
        print(f"[boltz_cp {time.perf_counter() - self.t0:7.1f}s] {self.prefix}{msg}", file=sys.stderr, flush=True)

    @contextmanager
    def upstream_stdout(self, show: bool):
        """Within the block, lines that upstream's code prints to stdout (e.g. "Found explicit empty
        MSA ...") are printed as ours, at once, where `show` (the writer rank), else dropped: every
        rank of a mesh runs the same upstream code, and the message is the same on each."""
        stream = _Lines(self.warn if show else None)
        try:
            with redirect_stdout(stream):
                yield
        finally:
            stream.flush_rest()

    def hook_model(self, model, recycling_steps: int, sampling_steps: int, chunks: int) -> list:
        """Report recycling and diffusion steps from forward pre-hooks on upstream's modules."""
        if not self.enabled:
            return []
        counts = {"trunk": 0, "diffusion": 0}
        total_steps = sampling_steps * chunks
        every = max(1, total_steps // 10)

        def trunk(_m, _a):
            counts["trunk"] += 1
            self(f"trunk: recycle {counts['trunk']}/{recycling_steps + 1}")

        def diffusion(_m, _a):
            counts["diffusion"] += 1
            n = counts["diffusion"]
            if n == 1 or n % every == 0 or n == total_steps:
                self(f"diffusion: step {n}/{total_steps}")

        def confidence(_m, _a):
            self("confidence")

        handles = [model.pairformer_module.register_forward_pre_hook(trunk)]
        handles.append(model.structure_module.score_model.register_forward_pre_hook(diffusion))
        if getattr(model, "confidence_module", None) is not None:
            handles.append(model.confidence_module.register_forward_pre_hook(confidence))
        return handles


class _Lines:
    """A text stream that hands each complete line to `emit` (or drops it when `emit` is None).
    It has no `buffer` attribute: click.echo would write bytes there."""

    def __init__(self, emit) -> None:
        self.emit = emit
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        if self.emit is not None and line.strip():
            self.emit(line.rstrip())

    def flush(self) -> None:
        pass

    def flush_rest(self) -> None:
        self._emit(self._pending)
        self._pending = ""

    def isatty(self) -> bool:
        return False
