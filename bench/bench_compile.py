"""torch.compile with BlockAdamW: compile cost and step time of compile_layers (regional
compilation, the recommended way) against eager and against a whole-model torch.compile.

A byte-level Llama built from LlamaConfig (bf16 weights, the dtype BAdam targets) trains on
byte windows of standard-library text with BlockAdamW, switch_every steps per block, for two
passes over every layer block in ascending order. Each case runs in its own process with an
empty inductor cache (TORCHINDUCTOR_CACHE_DIR in a fresh temporary folder), so pass 1 pays every
compile a first run pays. In pass 2 every step of the compiled model is followed by the same
step of an eager twin (a copy made before compiling, with its own BlockAdamW), so both are timed
under the same machine load. Reported per case: the wall time of pass 1 and the part of it
beyond its steps' steady time (the compiling), the median pass-2 step of the compiled model and
of its eager twin, the graphs dynamo compiled (counters["stats"]["unique_graphs"]) and how often
it hit the recompile limit (after which it runs eagerly).

Cases:
- compile_layers: badam_kernels.compile_layers(model), inductor
- whole model: torch.compile(model), inductor, BlockAdamW defaults (its backward cut's hook stays
  out of the graph, splitting it at the active layer, see badam_kernels/checkpointing.py)
- whole model, no cut: the same with truncate_backward=False: dynamo's own behaviour, one
  compile of the whole model per block until the recompile limit

    python bench/bench_compile.py [--layers 12] [--hidden 256] [--seq-len 256] [--batch 4]
                                  [--switch-every 2] [--threads N] [--cases layers,whole,...]
                                  [--backend inductor]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from stdlib_text import as_tokens, bf16_weights, byte_llama, fixed_batches, stdlib_sources  # noqa: E402

from badam_kernels import BlockAdamW, compile_layers  # noqa: E402

CASES = {
    "layers": "compile_layers",
    "whole": "whole model",
    "whole_no_cut": "whole model, no cut",
}


class RecompileLimitHits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" log records (its only sign of a fallback)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "recompile_limit" in record.getMessage() or "cache_size_limit" in record.getMessage():
            self.count += 1


def run_case(case: str, args: argparse.Namespace) -> dict:
    """One case in this process: step times of the compiled model and its eager twin, graphs,
    recompile-limit hits."""
    from torch._dynamo.utils import counters

    warnings.simplefilter("ignore")  # the whole-model warning is the point of those cases
    hits = RecompileLimitHits()
    logging.getLogger("torch._dynamo").addHandler(hits)
    model = bf16_weights(byte_llama(args.layers, args.hidden, args.seq_len, seed=0)).train()
    model.config.use_cache = False  # training: no KV cache
    twin = copy.deepcopy(model)
    run = model
    if case == "layers":
        compile_layers(model, backend=args.backend)
    else:
        run = torch.compile(model, backend=args.backend)
    options = dict(
        lr=1e-5, switch_every=args.switch_every, switch_mode="ascending", verbose=0,
        truncate_backward=case != "whole_no_cut",
    )  # fmt: skip
    optimizer, twin_optimizer = BlockAdamW(model, **options), BlockAdamW(twin, **options)
    steps_per_pass = args.layers * args.switch_every
    text = as_tokens(stdlib_sources("*.py", max_bytes=1 << 20))
    batches = fixed_batches(text, args.batch, args.seq_len, count=2 * steps_per_pass, seed=0)

    def timed_step(forward, opt, tokens) -> float:
        start = time.perf_counter()
        forward(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        return time.perf_counter() - start

    pass1 = [timed_step(run, optimizer, tokens) for tokens in batches[:steps_per_pass]]
    for tokens in batches[:steps_per_pass]:  # keep the twin on the same block
        twin(input_ids=tokens, labels=tokens).loss.backward()
        twin_optimizer.step()
    compiled, eager = [], []
    for tokens in batches[steps_per_pass:]:
        compiled.append(timed_step(run, optimizer, tokens))
        eager.append(timed_step(twin, twin_optimizer, tokens))
    steady = statistics.median(compiled)
    return {
        "pass1_s": sum(pass1),
        "compile_s": sum(pass1) - steps_per_pass * steady,  # pass 1 beyond its steps' steady time
        "step_s": steady,
        "eager_step_s": statistics.median(eager),
        "graphs": counters["stats"]["unique_graphs"],
        "recompile_limit_hits": hits.count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--switch-every", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--one-case", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_case:
        try:
            print(json.dumps(run_case(args.one_case, args)))
        except RuntimeError as error:  # e.g. step() finding a block without gradient
            print(json.dumps({"error": str(error).splitlines()[0][:200]}))
        return
    import transformers

    print(
        f"Llama {args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq_len} tokens, "
        f"bf16, CPU, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; backend {args.backend}; switch_every {args.switch_every}, "
        "2 passes over the blocks"
    )
    results = {}
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--one-case", case],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
        results[case] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  {CASES[case]}: {results[case]}", flush=True)
    print(
        "| case | pass 1 s | of which compiling s | step ms, compiled | step ms, eager twin | ratio "
        "| graphs | recompile-limit hits |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case, r in results.items():
        if "error" in r:
            print(f"| {CASES[case]} | error: {r['error']} |")
            continue
        print(
            f"| {CASES[case]} | {r['pass1_s']:.1f} | {r['compile_s']:.1f} | {r['step_s'] * 1e3:.0f} "
            f"| {r['eager_step_s'] * 1e3:.0f} | {r['step_s'] / r['eager_step_s']:.2f}x | {r['graphs']} "
            f"| {r['recompile_limit_hits']} |"
        )


if __name__ == "__main__":
    main()
