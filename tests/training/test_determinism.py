"""Training is bitwise reproducible on the CPU: with one thread always, with several threads
under ``torch.use_deterministic_algorithms(True)`` (see "Reproducibility" in
docs/tutorials/wrap_your_model.md).

A few optimizer steps of a small GNN denoiser on molecules (the network whose indexed gathers
make multi-threaded backward passes non-deterministic) are run twice with the same seed and
every tensor of the final state is compared with ``torch.equal``; a run with another seed is
the negative control that shows the comparison can fail. With PyTorch's default algorithms,
two runs of this training with 4 threads on 2 cores differed in 64 or 66 of the 72 tensors
(four tries, ``main`` below); that is not asserted, since it depends on how the threads are
scheduled. ``python -m tests.training.test_determinism [--busy]`` measures it.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch_geometric.data import Batch, Data

from canonwrap import CanonicalizedDiffusion
from canonwrap.canonicalizers import CenterOfMass
from canonwrap.data.qm9 import qm9_features
from canonwrap.molecules import MoleculeSpace
from canonwrap.nn import GNNDenoiser
from canonwrap.samplers import AncestralSampler
from canonwrap.schedules import PolynomialSchedule


def molecules(seed: int, count: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for i in range(count):
        n = 8 + (7 * i) % 19  # 8 to 26 atoms: enough edges for the parallel backward
        z = [6] * (n // 3) + [1] * (n - n // 3)
        graphs.append(Data(pos=torch.randn(n, 3, generator=g), x=qm9_features(z)))
    return Batch.from_data_list(graphs)


def gnn_model(hidden: int = 32, layers: int = 2) -> CanonicalizedDiffusion:
    return CanonicalizedDiffusion(
        GNNDenoiser(hidden=hidden, layers=layers),
        CenterOfMass(),
        PolynomialSchedule(100),
        MoleculeSpace(),
    )


def train(
    seed: int, steps: int = 4, hidden: int = 32, layers: int = 2, count: int = 16
) -> list[torch.Tensor]:
    """Parameters and Adam state after ``steps`` steps of a GNN seeded with ``seed``."""
    torch.manual_seed(seed)
    model = gnn_model(hidden, layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    data = molecules(0, count)
    for _ in range(steps):
        opt.zero_grad()
        model.training_loss(data, generator=gen).loss.backward()
        opt.step()
    state = [p.detach().clone() for p in model.parameters()]
    for per_param in opt.state_dict()["state"].values():
        state += [v.clone() for k, v in per_param.items() if k != "step"]
    return state


@contextmanager
def cpu_threads(n: int, deterministic: bool):
    threads, flag = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(flag)


def differing(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    assert len(a) == len(b)
    return sum(not torch.equal(x, y) for x, y in zip(a, b))


def test_one_thread_is_bitwise_reproducible():
    with cpu_threads(1, deterministic=False):
        first, second, other = train(0), train(0), train(1)
    assert differing(first, second) == 0
    assert differing(first, other) == len(first)  # negative control: another seed


def test_one_thread_sampling_is_bitwise_reproducible():
    torch.manual_seed(0)
    model = gnn_model()

    def draw(seed: int) -> list[torch.Tensor]:
        out = model.sample(
            num_nodes=[5, 9],
            sampler=AncestralSampler(20),
            generator=torch.Generator().manual_seed(seed),
            randomize_pose=True,
        )
        return [out.pos, out.x]

    with cpu_threads(1, deterministic=False):
        first, second, other = draw(1), draw(1), draw(2)
    assert differing(first, second) == 0
    assert differing(first, other) == 2  # negative control: another seed


@pytest.mark.parametrize("threads", [2, 4])
def test_several_threads_with_deterministic_algorithms_are_bitwise_reproducible(threads):
    with cpu_threads(threads, deterministic=True):
        first, second = train(0), train(0)
    assert differing(first, second) == 0


def main() -> None:
    """Measure what the tests cannot assert: how often repeats differ, and at what cost.

    ``python -m tests.training.test_determinism [--busy]`` trains the test's GNN (2 and 4
    threads) and a larger one (width 128, 4 layers, 64 molecules, 10 steps; 2 threads) twice,
    with and without deterministic algorithms, and prints how many tensors differ between the
    two runs and the seconds per step of the faster one; last, how many tensors of the larger
    GNN differ between 1 and 2 threads. ``--busy`` keeps one core busy meanwhile (a spinning
    process), as other jobs on a shared machine do; the differences depend on it.
    """
    import subprocess
    import sys
    import time

    large = dict(steps=10, hidden=128, layers=4, count=64)
    busy = None
    if "--busy" in sys.argv:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for name, threads, kw in (("test", 2, {}), ("test", 4, {}), ("large", 2, large)):
            for deterministic in (False, True):
                runs, seconds = [], []
                with cpu_threads(threads, deterministic):
                    for _ in range(2):
                        start = time.perf_counter()
                        runs.append(train(0, **kw))
                        seconds.append((time.perf_counter() - start) / kw.get("steps", 4))
                print(
                    f"{name} GNN, {threads} threads, deterministic={deterministic}: "
                    f"{differing(*runs)} of {len(runs[0])} tensors differ; "
                    f"{min(seconds):.3f} s per step (the faster run)",
                    flush=True,
                )
        with cpu_threads(1, False):
            one = train(0, **large)
        print(f"large GNN, 1 against 2 threads: {differing(one, runs[0])} tensors differ")
    finally:
        if busy is not None:
            busy.kill()


if __name__ == "__main__":
    main()
