"""``sparsecoll-bench model``: every option of the cost-model view, declared and checked here.

The numbers come from :mod:`sparsecoll.bench.model` (which prices with the cost model that
``algorithm="auto"`` uses); this module turns options into its links and prints its tables.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from sparsecoll.bench import checks
from sparsecoll.bench.checks import BUILTIN_ALGORITHMS
from sparsecoll.bench.cli_support import Imports, JsonFile, PlotFile, Wide, clean_errors, console, save, status
from sparsecoll.bench.common import parse_count
from sparsecoll.bench.ranks import import_plugins
from sparsecoll.bench.table import render
from sparsecoll.errors import InvalidArgumentError

Seconds = Annotated[float | None, typer.Option(metavar="SECONDS", help="latency a message, e.g. 50e-6")]


def model_command(
    ranks: Annotated[str, typer.Option("--ranks", "-r", metavar="RANGE", help="rank counts: 2..1024 (doubling, "
                                                                             "the end included) or a list "
                                                                             "2,3,4")] = "2..1024",
    size: Annotated[str, typer.Option("--size", "-d", metavar="COUNT", help="gradient elements, e.g. 25M")] = "25M",
    density: Annotated[float, typer.Option(metavar="FRACTION", help="fraction of elements sent (0.001 is "
                                                                    "0.1%)")] = 0.001,
    ranks_per_host: Annotated[int, typer.Option("--ranks-per-host", metavar="L", help="ranks a host: two-level "
                                                                                    "rows when L > 1 (a job of "
                                                                                    "P <= L ranks is one "
                                                                                    "host)")] = 1,
    algorithms: Annotated[str, typer.Option(metavar="LIST", help="of dense, allgather, gtopk, sketch, cltk, "
                                                                 "oktopk")] = ",".join(BUILTIN_ALGORITHMS),
    link: Annotated[str | None, typer.Option(metavar="RATE", help="link between hosts, e.g. 1gbit: sets its "
                                                                  "beta (default: the calibration's, else "
                                                                  "10gbit)")] = None,
    alpha: Seconds = None,
    beta: Annotated[float | None, typer.Option(metavar="S/BYTE", help="seconds a byte between hosts, e.g. "
                                                                      "8e-9 (1 Gbit/s); not with --link")] = None,
    intra_link: Annotated[str, typer.Option("--intra-link", metavar="RATE", help="link inside a host (default "
                                                                                "100gbit: shared memory or "
                                                                                "NVLink class)")] = "100gbit",
    intra_alpha: Annotated[float, typer.Option("--intra-alpha", metavar="SECONDS", help="latency a message "
                                                                                       "inside a host")] = 5e-6,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="measure alpha, beta and the kernels on 2 "
                                                                "loopback ranks first (a few seconds); "
                                                                "--link/--alpha/--beta still override")] = False,
    measured: Annotated[list[str] | None, typer.Option(metavar="FILE.json", help="points from `sparsecoll-bench "
                                                                                "sparse --json`: on the plot, "
                                                                                "and model/measured per point; "
                                                                                "repeatable")] = None,
    cores_per_host: Annotated[int | None, typer.Option("--cores-per-host", metavar="C", help="cores a host's ranks "
                                                                                            "share (default: a "
                                                                                            "core or GPU a rank)")
                              ] = None,
    one_machine: Annotated[bool, typer.Option("--one-machine", help="every rank on one host of --cores-per-host "
                                                                    "cores, links emulated (how `sparsecoll-bench "
                                                                    "sparse` measures)")] = False,
    local_costs: Annotated[str | None, typer.Option("--local-costs", metavar="FILE.json", help="a cost model file "
                                                                                              "whose local costs "
                                                                                              "(one rank, one core) "
                                                                                              "replace the "
                                                                                              "calibration's")] = None,
    json_file: JsonFile = None,
    plot_file: PlotFile = None,
    wide: Wide = False,
    imports: Imports = None,
) -> None:
    """The alpha-beta cost model's time and bytes per rank, flat and two-level, and where one algorithm
    overtakes another (the prices algorithm="auto" uses; --alpha in seconds, --beta in seconds a byte)."""
    from sparsecoll.bench import model as cost_view
    from sparsecoll.collectives.cost_model import ALGORITHMS, CostModel, load_default

    with clean_errors():
        import_plugins(imports or [])
        worlds = cost_view.parse_ranks(ranks)
        elements = checks.positive("--size", parse_count(size))
        checks.densities("--density", str(density))
        checks.positive("--ranks-per-host", ranks_per_host)
        for world in worlds:
            cost_view.layout(world, ranks_per_host)
        names = checks.choices("--algorithms", algorithms, ALGORITHMS)
        if link is not None and beta is not None:
            raise InvalidArgumentError("--link and --beta both set the link between hosts: give one")
        for option, value in (("--alpha", alpha), ("--beta", beta), ("--intra-alpha", intra_alpha)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InvalidArgumentError(f"{option} must be a number of seconds >= 0, not {value:g}")
        inter_beta = cost_view.rate_beta(link) if link is not None else beta
        intra_beta = cost_view.rate_beta(intra_link)
        comparison_rows = [row for path in measured or [] for row in cost_view.load_measured(path)]
        if one_machine and cores_per_host is None:
            raise InvalidArgumentError("--one-machine needs --cores-per-host (the cores every rank shares)")
        cores = None if cores_per_host is None else \
            cost_view.Cores(checks.positive("--cores-per-host", cores_per_host), one_machine)
        if calibrate:
            base, source = _calibrated(), "measured now on 2 loopback ranks"
        else:
            base = load_default()
            source = base.link if base.date else "defaults (no calibration file)"
        if local_costs is not None:
            base = cost_view.with_local_costs(base, CostModel.load(local_costs))
            source = f"{local_costs} ({base.date})"
        inter = cost_view.with_link(base, alpha, inter_beta, f"--link {link}" if link else
                                    "--alpha/--beta" if alpha is not None or beta is not None else source)
        intra = cost_view.with_link(base, intra_alpha, intra_beta, f"--intra-link {intra_link}")
        links = cost_view.Links(inter, intra, cores)
        k = max(1, round(elements * density))
        rows = cost_view.model_rows(links, worlds, ranks_per_host, elements, k, names)

        def time_of(series: str, world: int) -> float:
            return cost_view.price(links, series, world, ranks_per_host, elements, k)["seconds"] * 1e3

        found = cost_view.crossovers(rows, time_of, ranks_per_host)
        compared = cost_view.compare(links, comparison_rows)
    hosts = f"hosts of {ranks_per_host} ranks" if ranks_per_host > 1 else "one rank a host"
    if cores is not None:
        hosts += (f", all ranks on one machine of {cores.per_host} cores" if one_machine else
                  f", {cores.per_host} cores a host") + \
            f" ({cores.message_cpu * 1e6:.3g} us and {cores.byte_cpu * 1e9:.3g} ns/B of CPU a message)"
    title = (f"cost model, d={size} (k={k:,}, {100 * density:g}%), {hosts}; between hosts "
             f"{cost_view.describe(inter)} ({inter.link}); inside a host {cost_view.describe(intra)}; "
             f"local costs: {source}")
    console.print(title, highlight=False, soft_wrap=True)
    for key, caption in (("time_ms", "time a call"), ("bytes", "bytes a rank sends (2L: to other hosts)")):
        columns, table = cost_view.wide_rows(rows, key)
        render(caption, columns, table, console, wide=wide)
    for item in found:
        console.print(f"{item['faster']} overtakes {item['overtakes']} at P = {item['ranks']}", highlight=False)
    if not found:
        console.print("no crossovers in this range", highlight=False)
    if compared:
        render(f"model against {', '.join(measured or [])}", cost_view.COMPARE_TABLE, compared, console, wide=wide)
        console.print(cost_view.ratio_summary(compared), highlight=False)
    save("model", rows, json_file, None, size=elements, density=density, k=k, ranks_per_host=ranks_per_host,
         inter_alpha=inter.alpha, inter_beta=inter.beta, intra_alpha=intra.alpha, intra_beta=intra.beta,
         local_costs=source, cores_per_host=cores_per_host, one_machine=one_machine, crossovers=found,
         measured=compared)
    if plot_file:
        cost_view.plot(rows, found, compared, title, plot_file)
        console.print(f"wrote {plot_file}")


def _calibrated():
    """The cost model measured on 2 loopback ranks, kept out of the user's calibration file."""
    from sparsecoll.bench import calibrate

    with tempfile.TemporaryDirectory() as scratch, status("calibrating on 2 loopback ranks..."):
        return calibrate.calibrate(2, None, str(Path(scratch) / "cost_model.json"), iterations=3)
