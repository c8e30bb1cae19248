"""Cost of the last-layer Gram matrix and of OMP for a language model, next to its training step.

Run from the project root (transformers must be installed; nothing is downloaded)::

    python benchmarks/sequence_gram.py [--device cpu] [--lengths 128 512] [--vocab 8192] [--repeats 5]

A tiny GPT-2 (``GPT2LMHeadModel`` built from a config, random weights) is trained on random tokens. For each
sequence length ``T`` the script times, back to back in every repeat:

* ``step``: a full training step on the batch (forward, backward, AdamW step);
* ``score``: the scoring pass of Selective Backprop (a forward without graph, and the logit gradients of the
  per-sequence losses by autograd on the logits);
* ``gram exact``: :func:`~lightning_sbp.functional.gradient_gram` with the cheaper exact form;
* ``gram sketch``: the same from a TensorSketch of ``--sketch-dim`` dimensions;
* ``omp``: :func:`~lightning_sbp.functional.omp_gram` picking ``k = N / 2`` sequences.

The table gives median times and the median over repeats of each time divided by the step time of the same
repeat, so that the ratios share the machine's load; ``sketch err`` is the relative Frobenius error of the
sketched Gram matrix. Run it on an otherwise idle machine.

A second table gives the memory that turning a bfloat16 head's logits ``[N, T, C]`` (what a ``bf16-mixed``
forward gives) into per-example losses, logit gradients and the Gram matrix takes beyond the logits
themselves: the library's path (:func:`~lightning_sbp.functional.per_example_cross_entropy`, the logit
gradients of :mod:`lightning_sbp.scoring` and :meth:`~lightning_sbp.selectors.Scores.gram_in`, which convert
the head a block of examples at a time) against the same computation on the whole head at once. It is the
peak of the process's resident memory on the CPU (reset through ``/proc/self/clear_refs``) and of the
allocator's on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_sbp.functional import gradient_gram, omp_gram, per_example_cross_entropy
from lightning_sbp.functional.gram import choose_form
from lightning_sbp.scoring import logit_gradients_by_autograd
from lightning_sbp.selectors import Scores


def _sequence_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token cross-entropy (targets shifted left, the last position ignored)."""
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    token = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return token.sum(dim=1) / (targets != -100).sum(dim=1)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def run(args: argparse.Namespace) -> str:
    rows = [
        "| T | form | step (ms) | score (ms) | gram exact (ms) | gram sketch (ms) | omp (ms) "
        "| score / step | exact / step | sketch / step | omp / step | sketch err |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows += [measure(length, args) for length in args.lengths]
    return "\n".join(rows)


def measure(length: int, args: argparse.Namespace) -> str:
    """One table row: the timings at sequence length ``length``."""
    device = torch.device(args.device)
    timed = _timer(device)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=max(args.lengths),
        n_embd=args.width,
        n_layer=args.layers,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, args.vocab, (args.batch, length), device=device)
    captured: dict[str, torch.Tensor] = {}
    hook = model.lm_head.register_forward_hook(lambda _m, inputs, _o: captured.__setitem__("h", inputs[0]))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _sequence_losses(model(input_ids).logits, input_ids).mean().backward()
        optimizer.step()

    def score() -> None:
        with torch.no_grad():
            logits = model(input_ids).logits
        leaf = logits.detach().float().requires_grad_(True)
        with torch.enable_grad():
            (captured["p"],) = torch.autograd.grad(_sequence_losses(leaf, input_ids).sum(), leaf)

    score()
    features, logit_grads = captured["h"].detach(), captured["p"]
    hook.remove()
    exact = gradient_gram(features, logit_grads, bias=False)
    sketched = gradient_gram(features, logit_grads, bias=False, form="sketch", sketch_dim=args.sketch_dim)
    error = float(torch.linalg.matrix_norm(sketched - exact) / torch.linalg.matrix_norm(exact))
    k = args.batch // 2

    jobs: dict[str, Callable[[], object]] = {
        "step": step,
        "score": score,
        "exact": lambda: gradient_gram(features, logit_grads, bias=False),
        "sketch": lambda: gradient_gram(features, logit_grads, bias=False, form="sketch", sketch_dim=args.sketch_dim),
        "omp": lambda: omp_gram(exact, exact.mean(dim=1), k),
    }
    for job in jobs.values():  # warm-up
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for repeat in range(args.repeats):
        # Rotate the order so that no job always runs right after the same one.
        names = list(jobs)[repeat % len(jobs) :] + list(jobs)[: repeat % len(jobs)]
        for name in names:
            times[name].append(timed(jobs[name]))

    def ms(name: str) -> str:
        return f"{1e3 * statistics.median(times[name]):.1f}"

    def ratio(name: str) -> str:
        return f"{statistics.median(a / b for a, b in zip(times[name], times['step'], strict=True)):.3f}"

    form = choose_form(args.batch, length, args.width, args.vocab)
    return (
        f"| {length} | {form} | {ms('step')} | {ms('score')} | {ms('exact')} | {ms('sketch')} | {ms('omp')} "
        f"| {ratio('score')} | {ratio('exact')} | {ratio('sketch')} | {ratio('omp')} | {error:.3f} |"
    )


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field))
    return int(line.split()[1]) * 1024


def peak_bytes(job: Callable[[], object], device: torch.device) -> int | None:
    """Memory ``job`` held at its peak beyond what was allocated before it; ``None`` where it cannot be read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        job()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the peak resident set size to the current one
    except OSError:
        return None
    before = _resident_bytes("VmRSS:")
    job()
    return _resident_bytes("VmHWM:") - before


def _in_blocks(logits: torch.Tensor, targets: torch.Tensor, features: torch.Tensor) -> None:
    """The library's path: losses, logit gradients and the Gram matrix, the head converted a block at a time."""
    losses = per_example_cross_entropy(logits, targets)
    grads = logit_gradients_by_autograd(per_example_cross_entropy, logits, targets)
    Scores(losses, None, grads, features, bias=False).gram_in(torch.float32)


def _whole_head(logits: torch.Tensor, targets: torch.Tensor, features: torch.Tensor) -> None:
    """The same computation on the whole head at once, with the non-finite examples zeroed in full copies."""
    losses = F.cross_entropy(logits.float().movedim(-1, 1), targets, reduction="none").mean(dim=1)
    leaf = logits.detach().float().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(leaf.movedim(-1, 1), targets, reduction="none").mean(dim=1)
        (grads,) = torch.autograd.grad(loss.sum(), leaf)
    valid = torch.isfinite(losses) & torch.isfinite(grads).flatten(1).all(dim=1)
    grads = torch.where(valid.view(-1, 1, 1), grads.to(torch.float32), 0.0)
    gradient_gram(torch.where(valid.view(-1, 1, 1), features, 0.0), grads, bias=False)


def memory_table(args: argparse.Namespace) -> str:
    """Peak memory of the scoring pass's processing of a bfloat16 head, in blocks and whole."""
    device = torch.device(args.device)
    rows = [
        "| T | logits (MiB) | whole head (MiB) | in blocks (MiB) | whole / in blocks |",
        "|---:|---:|---:|---:|---:|",
    ]
    for length in args.lengths:
        generator = torch.Generator(device=device).manual_seed(0)
        shape = (args.batch, length, args.vocab)
        logits = torch.randn(shape, generator=generator, device=device).bfloat16()
        features = torch.randn(args.batch, length, args.width, generator=generator, device=device)
        targets = torch.randint(0, args.vocab, (args.batch, length), generator=generator, device=device)

        inputs = (logits, targets, features)
        blocked = peak_bytes(functools.partial(_in_blocks, *inputs), device)
        full = peak_bytes(functools.partial(_whole_head, *inputs), device)
        if blocked is None or full is None:
            return "(peak memory cannot be read on this machine)"
        mib = 2.0**20
        rows.append(
            f"| {length} | {logits.nbytes / mib:.0f} | {full / mib:.0f} | {blocked / mib:.0f} | {full / blocked:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512], help="sequence lengths T")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch N")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size C (GPT-2's is 50257)")
    parser.add_argument("--width", type=int, default=128, help="model width D")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sketch-dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-only", action="store_true", help="only the memory table")
    args = parser.parse_args()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, load average {load}")
    print(
        f"GPT-2: N={args.batch}, D={args.width}, C={args.vocab}, {args.layers} layers; "
        f"sketch_dim={args.sketch_dim}, k={args.batch // 2}"
    )
    if not args.memory_only:
        print(run(args))
    print()
    print("Peak memory beyond the logits: per-example losses, logit gradients and the Gram matrix of a bf16 head")
    print(memory_table(args))


if __name__ == "__main__":
    main()
