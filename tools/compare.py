"""
Two runs compared, as the paper's fig. 1: how many fewer steps the second needs to reach the first's
final FD_demo, what sets that number (the gap r at the last step and the baseline's slope s: on a
power law, r^(1/s)), every measurement (compare.md), and the curves above both runs' last training
grids (compare.png). `tools/demo.py --compare` trains the pair from one seed and calls `report`;
alone, this reports on two finished runs that were measured at the same steps:

  python tools/compare.py results/demo/vanilla results/demo/repa   # writes into results/demo/
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import repa  # noqa: E402
from repa import UserError, atomic_write  # noqa: E402


def metric_curves(folder):
    """{metric: (steps, values)} of the measurement rows of a run's metrics.jsonl. A run resumed
    from before its last measurement measures those steps again: the later row stands."""
    path = os.path.join(folder, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    rows = {row["step"]: row for row in rows if "fd_demo" in row}  # not the loss rows
    if not rows:
        raise UserError(f"{folder} has no FD_demo measurements in a metrics.jsonl")
    steps = sorted(rows)
    return {key: (steps, [rows[s][key] for s in steps]) for key in rows[steps[-1]]}


def steps_to_reach(steps, values, target):
    """The first step at which a falling curve reaches `target`, interpolated linearly between
    measurements; None if it never does."""
    for i, (s, v) in enumerate(zip(steps, values)):
        if v <= target:
            if i == 0:
                return s
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def speedups(base, other):
    """For each of the baseline's measurements (step s, FD_demo v) of (steps, values) curves, s
    over the step at which the other run, measured up to s, reached v; None where it had not."""
    out = []
    for s, v in zip(*base):  # the other's curve as measured up to s
        reached = steps_to_reach(*(c[:sum(r <= s for r in other[0])] for c in other), v)
        out.append(s / reached if reached else None)
    return out


def gap_and_slope(base, other):
    """(r, s): the other's FD_demo r times lower than the baseline's at the last step, the
    baseline's falling as step^-s over its last two measurements. On a power law the other then
    needs 1 / r^(1/s) of the steps: the paper's s = 0.25 (FID 17.2 at 400K steps, 8.3 at 7M)
    makes REPA's r = 2.2 worth about 20x; the demo's s near 1 makes its r of 1.2-1.3 worth
    1.2x-1.4x (README: "Why the speed-up is small")."""
    (steps, values), other_values = base, other[1]
    s = math.log(values[-2] / values[-1]) / math.log(steps[-1] / steps[-2])
    return values[-1] / other_values[-1], s


def explain_speedup(base, other, names=("vanilla", "REPA")):
    """compare.md's sentence on gap_and_slope."""
    r, s = gap_and_slope(base, other)
    return f"At the last step {names[0]}'s FD_demo is {r:.2f} times {names[1]}'s, " + (
        f"and {names[0]}'s falls as step^-{s:.2f} (its last two measurements): on that power law "
        f"{r:.2f}^(1/{s:.2f}) = {r ** (1 / s):.2f}x fewer steps (REPA in the paper: 2.2 times "
        f"lower than vanilla at 400K steps, on a curve falling as step^-0.25)." if s > 0 else
        f"and {names[0]}'s did not fall over its last two measurements.")


def plot_compare(curves, metrics, folders, guided, out):
    """compare.png: the four curves, the baseline against the other, over the grids of both at
    the last two grid steps, drawn from the same noise. `guided`: {name: its grids use CFG}."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread
    samples = {name: os.path.join(f, "samples") for name, f in folders.items()}
    files = [set(os.listdir(f)) if os.path.isdir(f) else set() for f in samples.values()]
    grids = sorted(n for n in set.intersection(*files) if n[:7].isdigit() and n[7:] == ".png")[-2:]
    fig = Figure(figsize=(16, 4 + 4.2 * bool(grids)))  # the training's grids, not sample.py's
    axes = fig.subplots(1 + bool(grids), 4, squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics.items()):
        for name, style in zip(folders, ("--", "-")):
            ax.plot(*curves[name][key], style, marker="o", markersize=3, label=name)
        ax.set(xlabel="training step", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, (grid, name) in zip(axes[1:].flat, [(g, n) for g in grids for n in folders]):
        ax.imshow(imread(os.path.join(samples[name], grid)))
        guidance = f"CFG {repa.GRID_CFG:g}" if guided[name] else "no guidance"
        ax.set_title(f"{name}, step {int(grid[:7])} ({guidance})")
        ax.axis("off")
    fig.tight_layout()
    atomic_write(os.path.join(out, "compare.png"), lambda f: fig.savefig(f, format="png", dpi=110))


def report(folders, title, description):
    """compare.md and compare.png beside the runs, for {name: run folder} (the baseline first);
    returns the speed-up's sentence."""
    (base, other), out = folders, os.path.dirname(os.path.abspath(list(folders.values())[0]))
    curves = {name: metric_curves(f) for name, f in folders.items()}
    configs = {name: json.load(open(os.path.join(f, "config.json")))["config"]
               for name, f in folders.items()}
    block = next(k for k in curves[other] if k.startswith("probe/block"))[11:]  # the aligned
    metrics = {"fd_demo": "FD_demo, no guidance (lower is better)",
               "class_acc": "class accuracy of samples, no guidance",
               next(k for k in curves[other] if k.startswith("cknna/") and
                    k.endswith(f"/block{block}")): "CKNNA with the encoder, aligned block",
               f"probe/block{block}": "linear probe, aligned block"}
    fds = curves[base]["fd_demo"], curves[other]["fd_demo"]
    if fds[0][0] != fds[1][0]:
        raise UserError(f"{base} and {other} were measured at different steps: compare runs of "
                        f"one --align-every and --max-steps")
    (steps, fd), ups = fds[0], speedups(*fds)
    speedup = (f"{other} reaches {base}'s final FD_demo ({fd[-1]:.1f} at step {steps[-1]}) at "
               f"step {steps[-1] / ups[-1]:.0f}: {ups[-1]:.1f}x fewer steps" if ups[-1] else
               f"{other} does not reach {base}'s final FD_demo ({fd[-1]:.1f} at step "
               f"{steps[-1]}) within {steps[-1]} steps")
    lines = [f"# {title}", "", description, "", f"**{speedup}.**", "",
             *([explain_speedup(*fds, names=tuple(folders)), ""] if len(steps) > 1 else []),
             f"speed-up: a row's step over the step at which {other} reached {base}'s FD_demo of "
             f"that row.", "", "| step | " + " | ".join(f"{m} {name}" for m in metrics
                                                        for name in folders) + " | speed-up |",
             "|---" * (2 + 2 * len(metrics)) + "|"]
    for i, step in enumerate(steps):
        cells = [f"{curves[name][m][1][i]:.4g}" for m in metrics for name in folders]
        lines.append(f"| {step} | {' | '.join(cells)} | {f'{ups[i]:.2f}x' if ups[i] else 'none'} |")
    atomic_write(os.path.join(out, "compare.md"), lambda f: f.write("\n".join(lines) + "\n"), "w")
    plot_compare(curves, metrics, folders, {n: c["cfg_prob"] > 0 for n, c in configs.items()}, out)
    return speedup


def main(argv=None):
    parser = repa.Parser(description=__doc__.strip().split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("baseline", help="a run folder with FD_demo measurements")
    parser.add_argument("other", help="another, measured at the same steps")
    args = parser.parse_args(argv)

    def run():
        folders = {os.path.basename(os.path.normpath(f)): f for f in (args.baseline, args.other)}
        if len(folders) < 2:
            raise UserError("the two runs' folders need different names, which name them")
        said = report(folders, "tools/compare.py", f"{args.baseline} against {args.other}.")
        print(f"{said}. Report: compare.md and compare.png beside the runs")
    repa.run_command(run)


if __name__ == "__main__":
    main()
