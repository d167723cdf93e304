"""The report's pictures: results.png, the test score of each row, and results_curves.png, each row's training
curves from its steps' OUT.metrics.jsonl (kt.progress), drawn with matplotlib (its object API: no global
state, no display needed) and returned as PNG bytes, so that evaluate.py writes its files together; and
transfer_set.py's contact sheet, each labeled query beside the images retrieved for it (PIL).
"""
import io

from kt.data import open_image


def _png(fig):
    """A matplotlib figure -> PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def bar_chart(table):
    """PNG bytes: a horizontal bar per row of the table, its test top-1 (mIoU for segmentation), the std over
    seeds as an error bar, the value at the bar's end."""
    from matplotlib.figure import Figure
    key = "miou" if "miou" in next(iter(table.values())) else "top1"
    names = list(table)
    values = [table[n][key] for n in names]
    errors = [table[n].get(key + "_std") or 0.0 for n in names]
    fig = Figure(figsize=(7, 0.45 * len(names) + 1.2))
    ax = fig.subplots()
    ax.barh(names, values, xerr=errors, color="tab:blue", capsize=3)
    for y, (v, e) in enumerate(zip(values, errors)):
        ax.text(v + e + 1, y, f"{v:.1f}", va="center", fontsize=9)
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xlim(0, 105)
    ax.set_xlabel(f"test {'mIoU' if key == 'miou' else 'top-1'} (%)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def curves_chart(panels):
    """PNG bytes: panels side by side, each (title, {row name: [(images seen, value), ...]}), a line per row
    in the same colour in every panel, one legend below."""
    from matplotlib.figure import Figure
    names = list(dict.fromkeys(n for _, curves in panels for n in curves))
    fig = Figure(figsize=(6 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, curves) in zip(axes, panels):
        for name, curve in curves.items():
            xs, ys = zip(*curve)
            ax.plot(xs, ys, color=f"C{names.index(name) % 10}", label=name, marker="." if len(curve) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("images seen")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
    fig.legend([handles[n] for n in names], names, loc="lower center", ncol=min(4, len(names)),
               bbox_to_anchor=(0.5, -0.02 - 0.05 * ((len(names) - 1) // 4)), frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.05 * ((len(names) - 1) // 4), 1, 1))
    return _png(fig)


def contact_sheet(rows, root, size=64, pad=4):
    """transfer_set.py's OUT.png: [(query ref, [neighbour refs])] -> PIL image, one row per query: the
    query, a gap, its neighbours."""
    from PIL import Image
    ncol = 1 + max(len(n) for _, n in rows)
    sheet = Image.new("RGB", (ncol * (size + pad) + 3 * pad, len(rows) * (size + pad)), "white")
    for r, (q, ns) in enumerate(rows):
        for c, ref in enumerate([q] + ns):
            sheet.paste(open_image(ref, root).resize((size, size)),
                        (c * (size + pad) + (3 * pad if c else 0), r * (size + pad)))
    return sheet
