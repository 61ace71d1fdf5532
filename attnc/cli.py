"""The `attnc` command line: check, list, show, simulate, compile (attnc/cli_compile.py), cache.

input:  the command line (argv), `.attn` files.
output: the verbs' text or JSON on stdout, diagnostics on stderr, an exit code.
does not: parse its arguments (cli_args.py) or compute anything itself: each verb calls the API.

Exit codes: 0 ok, 1 diagnostics (errors in .attn text or binding), 2 usage.
Every verb runs in-process through `main(argv)`, which never lets a Python
traceback reach the user.
"""

from __future__ import annotations

import sys

from .cli_args import UsageError, build_parser, call_sizes, parse_block, parse_grid, parse_sets, parse_tile
from .cli_compile import cmd_compile
from .errors import AttnError
from .limits import ENV, MemoryLimitError


def _bind(prog, name, sets):
    return prog.pattern(name, **sets)


def cmd_check(args, out, err) -> int:
    from . import load

    status = 0
    sets = parse_sets(args.set)
    evaluate = args.seq_len is not None or args.grid is not None
    for f in args.files:
        try:
            prog = load(f, search_path=args.include)
        except AttnError as e:
            print(str(e), file=err)
            status = 1
            continue
        names = prog.names()
        print(f"{f}: ok ({len(names)} pattern{'s' if len(names) != 1 else ''}: {', '.join(names) or 'none'})", file=out)
        if not evaluate:
            continue
        for name in ([args.pattern] if args.pattern else names):
            try:
                pat = prog.pattern(name, **{k: v for k, v in sets.items()})
                if pat.ir.inputs:
                    print(f"{f}: note: '{name}' has run-time inputs; its empty rows depend on them", file=out)
                    continue
                M, N, H, grid = call_sizes(pat, args.seq_len, parse_grid(args.grid), args.heads)
                rep = pat.check_rows(M, N, heads=H, grid=grid)
            except AttnError as e:
                print(str(e), file=err)
                status = 1
                continue
            except MemoryLimitError as e:
                print(f"{f}: error: pattern '{name}': {e}", file=err)
                status = 1
                continue
            if rep.witness is not None:
                h, r = rep.witness
                print(f"{pat.ir.span}: warning: pattern '{name}' has {rep.empty_rows} empty query rows at M = N = {N}"
                      f" (e.g. head {h}, row {r}): they produce output 0 and lse -inf", file=out)
            if rep.dense:
                print(f"{pat.ir.span}: warning: pattern '{name}' is fully dense at N = {N}: sparsity buys nothing", file=out)
            if pat.ir.tables:
                status = max(status, _check_tables(f, name, pat, M, N, H, grid, out, err))
    return status


def _check_tables(f, name, pat, M, N, H, grid, out, err) -> int:
    """Prove the score term's table indices in range on every allowed pair at these sizes
    (the op's own check, runtime/torch_backend.check_table_indices); a failure is an error at
    the table's declaration."""
    from .runtime.ops import probe_call
    from .runtime.torch_backend import check_table_indices

    try:
        check_table_indices(probe_call(pat, M, N, H, grid))
    except ValueError as e:
        table = str(e).split("[", 1)[0]
        spec = next((t for t in pat.ir.tables if t.name == table), pat.ir.tables[0])
        print(f"{spec.span}: error: pattern '{name}': {e}", file=err)
        return 1
    shapes = ", ".join(f"{n}{list(s)}" for n, s in pat.table_shapes(M, N, H, grid).items())
    print(f"{f}: ok: '{name}' reads its tables ({shapes}) only inside them at these sizes", file=out)
    return 0


def cmd_list(args, out, err) -> int:
    from . import load

    prog = load(args.file, search_path=args.include)  # an AttnError reaches main: printed, exit 1
    for info in prog.patterns():
        params = ", ".join(
            f"{p.name}: {p.type}" if p.type else (f"{p.name} = {p.default}" if p.default is not None else p.name)
            for p in info.params)
        print(f"{info.name}({params}) on {info.layout}    [{info.file}:{info.line}]", file=out)
        if info.score:
            print(f"    score {info.score}", file=out)
        if info.description:
            print(f"    {info.description}", file=out)
    return 0


def _static_pattern(args, err, verb):
    """Load and bind the pattern a verb works on (AttnError reaches main: exit 1);
    None, after a message, when it needs run-time tensors."""
    from . import load

    pat = load(args.file, search_path=args.include).pattern(args.pattern, **parse_sets(args.set))
    if pat.ir.inputs:
        names = ", ".join(i.name for i in pat.ir.inputs)
        print(f"attnc {verb}: pattern '{pat.name}' depends on run-time inputs ({names}); "
              f"it needs those tensors: use pat.mask(..., {pat.ir.inputs[0].name}=...) from Python", file=err)
    return None if pat.ir.inputs else pat


def cmd_show(args, out, err) -> int:
    from .show import head_groups, plan_tile_stats, render_png, render_text

    block = parse_block(args.block)
    if args.width < 8:
        raise UsageError(f"--width: expected at least 8, got {args.width}")
    pat = _static_pattern(args, err, "show")
    if pat is None:
        return 1
    M, N, H, grid = call_sizes(pat, args.seq_len, parse_grid(args.grid), args.heads)
    stats, rows = plan_tile_stats(pat, M, N, H, grid, block)
    groups = head_groups(stats, rows)
    print(render_text(pat, stats, rows, groups, args.width), file=out)
    print(_formula_text(pat, M, N, stats.allowed() // H if H else 0), file=out)
    if args.png:
        # token-level zoom: 128 queries and keys around the middle of the diagonal
        zq, zk = min(M, 128), min(N, 128)
        q0 = (M - zq) // 2
        k0 = max(0, min(N - zk, q0 + (N - M)))
        token_view = pat.mask_window(M, N, H, grid, (q0, q0 + zq), (k0, k0 + zk))[groups[0][0]].float()
        try:
            render_png(args.png, pat, stats, groups, token_view)
        except OSError as exc:
            print(f"attnc show: cannot write {args.png!r}: {exc.strerror or exc}", file=err)
            return 1
        print(f"wrote {args.png}", file=out)
    return 0


def _formula_text(pat, M, N, allowed) -> str:
    """The symbolic density and FLOPs of a 1-D pattern, checked against the exact count at this size."""
    from .piecewise import NoFormula

    try:
        f = pat.formula()
    except NoFormula as exc:
        return f"density formula: none ({exc}); the densities above are exact counts at this size"
    lines = [f"density = {f.density}", f"flops   = {f.flops}   (forward; D = head dim, H = heads)",
             f"exact when {f.condition_text()} (M = N)"]
    if M == N and f.valid_at(N):
        lines.append(f"at N = {N}: allowed = {f.allowed_at(N)} per head" +
                     (" (matches the count above)" if f.allowed_at(N) == allowed else f" (MISMATCH with {allowed})"))
    return "\n".join(lines)


def cmd_simulate(args, out, err) -> int:
    tile = parse_tile(args.tile)
    if args.head_dim < 1:
        raise UsageError(f"--head-dim: expected a positive size, got {args.head_dim}")
    if args.png and not args.sweep:
        raise UsageError("--png: expected --sweep as well (the plot shows a sweep)")
    from . import load

    pat = load(args.file, search_path=args.include).pattern(args.pattern, **parse_sets(args.set))
    if any(i.kind == "segments" for i in pat.ir.inputs):
        pat = _static_pattern(args, err, "simulate")  # segments cannot be invented: says so
        return 1
    if args.routed_density is not None and not 0 < args.routed_density <= 1:
        raise UsageError(f"--routed-density: expected a fraction in (0, 1], got {args.routed_density}")
    if pat.ir.inputs and args.routed_density is None:
        raise UsageError(f"pattern '{pat.name}' routes key blocks at run time ({pat.ir.inputs[0].name}): "
                         f"expected --routed-density D; try --routed-density 0.1")
    if args.sweep:
        if pat.ir.inputs or pat.has_topk():
            raise UsageError("--sweep: dynamic patterns are simulated one point at a time; drop --sweep")
        return _simulate_sweep(args, pat, tile, out, err)
    if args.seq_len is None and args.grid is None:
        raise UsageError("attnc simulate: expected --seq-len N or --grid AxB (or --sweep N=...)")
    M, N, H, grid = call_sizes(pat, args.seq_len, parse_grid(args.grid), args.heads)
    if args.ranks is not None:
        return _simulate_ranks(args, pat, M, N, H, grid, tile, out)
    if args.flops_per_byte is not None or args.strategy != "auto":
        raise UsageError("--strategy / --flops-per-byte: expected --ranks R as well")
    rep = pat.simulate(M, N, heads=H, head_dim=args.head_dim, grid=grid, tile=tile, gpu=args.gpu,
                       routed_density=args.routed_density)
    print(rep.to_json() if args.json else rep.to_table() + _cpu_tiles(pat, M, N, H, grid), file=out)
    return 0


def _cpu_tiles(pat, M, N, H, grid) -> str:
    """The torch path's tile choice on a grid and the alternatives it weighed (a table line)."""
    if grid is None or pat.ir.inputs or pat.has_topk():
        return ""
    from .runtime.ops import probe_call
    from .runtime.tile_choice import tile_options

    chosen, costs = tile_options(probe_call(pat, M, N, H, grid))
    if not costs:
        return ""
    text = lambda b: "/".join("x".join(map(str, t)) for t in b) if isinstance(b[0], tuple) else f"{b[0]}x{b[1]}"  # noqa: E731
    rest = ", ".join(f"{text(b)} {c / costs[chosen]:.2f}x" for b, c in costs.items() if b != chosen)
    return (f"\n{'cpu torch path'.ljust(len('predicted_speedup'))}  tiles {text(chosen)} (predicted time relative to it, D = 64: {rest}; "
            f"runtime/tile_choice.choose_tile)")


def cmd_cache(args, out, err) -> int:
    """`attnc cache info`: the disk cache's folder, entries, size and bound, and the in-memory
    caches' limits ([Note: cache limits] in attnc/lru.py); `attnc cache clear`: remove every entry."""
    from .codegen import cache
    from .lru import caches

    try:
        bound = cache.max_bytes()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.action == "clear":
        n = cache.clear()
        print(f"removed {n} cached kernel module{'s' if n != 1 else ''} from {cache.cache_dir()}", file=out)
        return 0
    items = cache.entries()
    size = sum(b for _, b, _ in items)
    print(f"disk cache: {cache.cache_dir()} ($ATTNC_CACHE_DIR)", file=out)
    print(f"  {len(items)} kernel modules, {size / (1 << 20):.2f} MiB of at most {bound / (1 << 20):.0f} MiB "
          f"($ATTNC_CACHE_MAX_MB; the oldest entries go first)", file=out)
    import attnc.runtime.flex  # noqa: F401  (creates the in-memory caches, to list their limits)
    import attnc.runtime.torch_backend  # noqa: F401
    try:
        import attnc.runtime.triton_backend  # noqa: F401
    except ImportError:
        pass
    print("in-memory caches (per process; limit: set_limit(name, n), $ATTNC_CACHE_<NAME> or $ATTNC_CACHE_ENTRIES):",
          file=out)
    try:
        for c in caches():
            print(f"  {c['name']:<16} at most {c['limit']:>4} entries: {c['what']}", file=out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _simulate_ranks(args, pat, M, N, H, grid, tile, out) -> int:
    """`attnc simulate --ranks R[,R...]`: the context-parallel sharding (attnc/sharding.py)
    at each rank count, from the pattern's plan at these sizes and this tile."""
    import json

    from .sharding import LinkModel, shard

    try:
        counts = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UsageError(f"--ranks: expected positive rank counts like 8 or 8,64,1024, got {args.ranks!r}")
    if isinstance(tile[0], tuple) or tile[0] != tile[1] or M != N:
        raise UsageError(f"--ranks: expected square 1-D tiles and M == N (each rank holds queries and keys of its "
                         f"positions), got tile {args.tile}; try --tile 128x128")
    if args.flops_per_byte is not None and not args.flops_per_byte > 0:
        raise UsageError(f"--flops-per-byte: expected a positive number, got {args.flops_per_byte}")
    if pat.ir.inputs or pat.has_topk():
        from .dynamic import synthetic_inputs
        pat, inputs = synthetic_inputs(pat, M, N, H, grid, args.routed_density, {})
    else:
        inputs = {}
    plan = pat.plan(M, N, heads=H, grid=grid, block=tile, **inputs)
    link = LinkModel(head_dim=args.head_dim, **({} if args.flops_per_byte is None
                                                   else {"flops_per_byte": args.flops_per_byte}))
    reports = []
    for R in counts:
        try:
            sharding = shard([plan], R, strategy=args.strategy, link=link)
        except ValueError as exc:
            raise UsageError(f"--ranks {R}: {exc}") from None
        reports.append(sharding.report(head_dim=args.head_dim, name=pat.name))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1), file=out)
    else:
        print("\n\n".join(r.to_table() for r in reports), file=out)
    return 0


def _simulate_sweep(args, pat, tile, out, err) -> int:
    from .simulate import parse_sweep

    try:
        over, values = parse_sweep(args.sweep)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    grid = parse_grid(args.grid)
    if over == "N":
        if args.seq_len is not None or grid is not None:
            raise UsageError("--sweep N=...: the sweep gives the length; drop --seq-len/--grid")
        if pat.layout.axes:
            raise UsageError(f"--sweep N: pattern '{pat.name}' is on {pat.layout}; sweep a parameter with --grid instead")
        if min(values) < 1:
            raise UsageError(f"--sweep: expected positive lengths, got {min(values)}")
    elif args.seq_len is None and grid is None:
        raise UsageError(f"--sweep {over}=...: expected --seq-len N or --grid AxB to simulate at")
    else:
        call_sizes(pat, args.seq_len, grid, args.heads)
    try:
        sw = pat.sweep(over, values, N=args.seq_len, heads=args.heads, head_dim=args.head_dim, grid=grid, tile=tile,
                       gpu=args.gpu)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(sw.to_json() if args.json else sw.to_table(), file=out)
    if args.png:
        try:
            sw.plot(args.png)
        except OSError as exc:
            print(f"attnc simulate: cannot write {args.png!r}: {exc.strerror or exc}", file=err)
            return 1
        if not args.json:
            print(f"wrote {args.png}", file=out)
    return 0


def main(argv: list[str] | None = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.verb is None:
            print(parser.format_help(), file=err)
            return 2
        verbs = {"check": cmd_check, "list": cmd_list, "show": cmd_show, "simulate": cmd_simulate, "compile": cmd_compile,
                 "cache": cmd_cache}
        from .progress import shown, wanted  # [Note: progress]: bars on stderr for long work, never on stdout

        try:
            bars = wanted(out, bool(getattr(args, "json", False)))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        with shown(err, bars):
            return verbs[args.verb](args, out, err)
    except UsageError as exc:
        print(str(exc), file=err)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except AttnError as exc:
        print(str(exc), file=err)
        return 1
    except MemoryLimitError as exc:  # sizes past the memory limit (attnc/limits.py): a diagnostic, not usage
        print(f"attnc: error: {exc}", file=err)
        return 1
    except MemoryError:  # an allocation the estimates missed: still a message, never a traceback
        print(f"attnc: error: out of memory; try smaller sizes or a larger --block/--tile "
              f"(attnc refuses calls it estimates past ${ENV})", file=err)
        return 1
    except ValueError as exc:
        print(f"attnc: error: {exc}", file=err)
        return 2
    except KeyboardInterrupt:
        print("attnc: interrupted", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
