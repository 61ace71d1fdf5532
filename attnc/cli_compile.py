"""`attnc compile`: write a pattern's generated Triton kernels and their metadata.

input:  the parsed arguments of `attnc compile` (cli_args.py): a file, a pattern and its
        parameters, sizes (or none: length-generic kernels), tiles, `--target` for AOT.
output: NAME.py / NAME.json (or one file per size class) in the output folder, a summary on
        `out`, with `--target` the ahead-of-time table (attnc/aot.py); an exit status.
does not: parse argv (cli_args.py), dispatch verbs or turn exceptions into exit codes (cli.py);
        torch, the codegen and the AOT compiler are imported only when the verb runs.
"""

from __future__ import annotations

from .cli_args import UsageError, call_sizes, parse_grid, parse_sets, parse_tile


def cmd_compile(args, out, err) -> int:
    import json
    from pathlib import Path

    from . import load
    from .codegen.kernels import KernelConfig
    from .codegen.pipeline import Shape, compile_kernels

    chosen = None
    if args.tile is not None:
        bm, bn = parse_tile(args.tile)
        try:  # N-D tiles (16x16/16x8) generate kernels in the tile-major token order (codegen/ndtiles.py)
            chosen = KernelConfig(tile=(bm, bn)) if isinstance(bm, tuple) else KernelConfig(block_m=bm, block_n=bn)
        except ValueError as exc:
            raise UsageError(f"--tile: {exc}") from None
    targets = _aot_targets(args)
    sets = parse_sets(args.set)
    pat = load(args.file, search_path=args.include).pattern(args.pattern, **sets)
    if args.seq_len is None and args.grid is None:
        return _compile_generic(args, pat, sets, chosen, targets, out, err)
    M, N, H, grid = call_sizes(pat, args.seq_len, parse_grid(args.grid), args.heads)
    # the sizes are resolved (by call_sizes, once): the shape checks the tiles, the pipeline runs the passes
    compiled = compile_kernels(pat.ir, Shape.of(pat.ir, M, N, H, grid, chosen or KernelConfig()),
                               sources=pat.program.sources)
    meta = compiled.metadata()
    status = 0
    if targets:
        from . import aot

        jobs = [aot.Job(str(args.file), pat.name, tuple(sets.items()), M=M, N=N, heads=H, grid=grid, config=chosen,
                        dtype=args.dtype, D=args.head_dim, target=t, label=pat.name) for t in targets]
        status = _run_aot(jobs, meta, args, out, err)
        if status is None:
            return 1
    stem = f"{pat.name}_{'x'.join(map(str, grid)) if grid else N}"
    try:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{stem}.py").write_text(compiled.source)
        (d / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
    except OSError as exc:
        print(f"attnc compile: cannot write to {args.out!r}: {exc.strerror or exc}", file=err)
        return 1
    plan = compiled.plan
    print(f"wrote {d / (stem + '.py')} and {d / (stem + '.json')}", file=out)
    print(f"plan: {'per call, from the run-time inputs' if plan is None else plan.to_string().splitlines()[0]}", file=out)
    return status


def _compile_generic(args, pat, sets, chosen, targets, out, err) -> int:
    """`attnc compile FILE -o DIR` without sizes: the kernels take M, N (and the grid axis
    lengths) at run time; the texts of the probed sizes are grouped into size classes
    (codegen/generic.py) and each class is written once: NAME.py serves the largest sizes,
    NAME_class<i>.py the others; NAME.json lists which sizes each file serves."""
    import json
    from pathlib import Path

    from .codegen.generic import size_classes, sizes_text
    from .codegen.kernels import KernelConfig

    config = chosen or KernelConfig()
    if config.tile is not None:
        raise UsageError("--tile with N-D tiles: those kernels are specialised to a grid; add --grid AxB")
    classes, skipped = size_classes(pat, config, heads=args.heads)
    if not classes:
        why = "; ".join(f"{sizes_text([s])}: {m}" for s, m in skipped[:3])
        raise UsageError(f"attnc compile: no probed size is valid for pattern '{pat.name}' ({why}); "
                         f"try --seq-len N or --grid AxB")
    d = Path(args.out)
    names = [f"{pat.name}.py"] + [f"{pat.name}_class{i}.py" for i in range(1, len(classes))]
    meta = {"pattern": pat.name, "ir": pat.text(), "generic": True, "config": config.key(),
            "size_arguments": ["M", "N"] + [f"G{i}" for i in range(len(pat.layout.axes))],
            "classes": [{"file": n, "probed_sizes": [list(s) if isinstance(s, tuple) else s for s in c.sizes]}
                        for n, c in zip(names, classes)],
            "skipped": [{"size": list(s) if isinstance(s, tuple) else s, "reason": m} for s, m in skipped]}
    status = 0
    if targets:
        from . import aot

        jobs = []
        for t in targets:
            for c in classes:  # each class compiled at its largest probed size
                big = c.sizes[0]
                size = dict(grid=big) if isinstance(big, tuple) else dict(M=big)
                jobs.append(aot.Job(str(args.file), pat.name, tuple(sets.items()), heads=args.heads, config=chosen,
                                    dtype=args.dtype, D=args.head_dim, target=t, label=pat.name, **size))
        status = _run_aot(jobs, meta, args, out, err)
        if status is None:
            return 1
    try:
        d.mkdir(parents=True, exist_ok=True)
        for n, c in zip(names, classes):
            (d / n).write_text(c.source)
        (d / f"{pat.name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    except OSError as exc:
        print(f"attnc compile: cannot write to {args.out!r}: {exc.strerror or exc}", file=err)
        return 1
    kind = "grids" if pat.layout.axes else "lengths"
    print(f"wrote {', '.join(str(d / n) for n in names)} and {d / (pat.name + '.json')}", file=out)
    print(f"length-generic kernels (M, N{', grid axes' if pat.layout.axes else ''} are run-time arguments): "
          f"{len(classes)} size class{'es' if len(classes) != 1 else ''} over the probed {kind}", file=out)
    for n, c in zip(names, classes):
        print(f"  {n}: {sizes_text(c.sizes)}", file=out)
    if skipped:
        print(f"  not valid for this pattern: {sizes_text([s for s, _ in skipped])}", file=out)
    return status


def _run_aot(jobs, meta: dict, args, out, err) -> int | None:
    """Compile `jobs` ahead of time, print the table, record it in `meta`: 0 when every
    kernel fits, 1 when some do not, None when compiling failed (said on `err`)."""
    from . import aot

    try:
        from .progress import task

        with task("compiling for the GPU target", total=len(jobs), unit="job") as t:
            reports = aot.compile_jobs(jobs, processes=args.processes, progress=lambda _: t.update())
    except aot.AOTError as exc:
        print(f"attnc compile: {exc}", file=err)
        return None
    meta["aot"] = [r.to_dict() for r in reports]
    print(aot.table(reports), file=out)
    bad = [r for r in reports if not r.fits]
    if bad:
        print(f"attnc compile: {len(bad)} of {len(reports)} targets have kernels that do not fit (see 'fits'); "
              f"try a smaller --tile, or --head-dim / --dtype as the model uses them", file=err)
        return 1
    return 0


def _aot_targets(args) -> list[str]:
    """--target checked (UsageError with expected / got / try); [] without it."""
    if args.target is None:
        return []
    from .aot import AOTError, parse_targets

    if not 1 <= args.head_dim <= 256:
        raise UsageError(f"--head-dim: expected 1 to 256 (the kernels' limit), got {args.head_dim}; try 64 or 128")
    if args.processes < 1:
        raise UsageError(f"--processes: expected at least 1, got {args.processes}")
    try:
        return parse_targets(args.target)
    except AOTError as exc:
        raise UsageError(f"--target: {exc}") from None
