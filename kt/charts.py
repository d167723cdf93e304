"""The report's pictures, drawn with PIL (no plotting package needed): results.png, the test score of each
row; results_curves.png, each row's training curves from its steps' OUT.metrics.jsonl (kt.progress); and
transfer_set.py's contact sheet, each labeled query beside the images retrieved for it.
"""
from PIL import Image, ImageDraw

from kt.checkpoints import atomic_write
from kt.data import open_image

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def bar_chart(table, path, width=640, height=360, pad=40):
    """A PNG of top-1 (mIoU for segmentation) per row, the std over seeds as a whisker."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    base, top, slot = height - pad, pad // 2, (width - 2 * pad) / len(table)
    key = "miou" if "miou" in next(iter(table.values())) else "top1"

    def y(v):  # a score in percent -> pixel row
        return base - (base - top) * v / 100
    for v in range(0, 101, 20):  # the axis: gridlines every 20 points
        d.line([(pad, y(v)), (width - pad // 2, y(v))], fill=(225, 225, 225))
        d.text((4, y(v) - 6), f"{v}", fill="black")
    for i, (name, r) in enumerate(table.items()):
        left, mid = pad + i * slot + slot * 0.15, pad + (i + 0.5) * slot
        d.rectangle([left, y(r[key]), left + slot * 0.7, base], fill=COLOURS[0])
        if r[key + "_std"]:
            d.line([(mid, y(r[key] - r[key + "_std"])), (mid, y(r[key] + r[key + "_std"]))], fill="black", width=2)
        d.text((mid, y(r[key]) - 4), f"{r[key]:.1f}", fill="black", anchor="md")
        d.text((mid, base + 6), name, fill="black", anchor="ma")
    d.text((pad, 2), f"test {'mIoU' if key == 'miou' else 'top-1'} (%)", fill="black")
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def curves_chart(panels, path, width=960, height=380, pad=48):
    """Panels side by side, each (title, {row name: [(images seen, value), ...]}): a line per row, its
    colour the same in every panel, the legend under the panels."""
    names = list(dict.fromkeys(n for _, curves in panels for n in curves))
    img = Image.new("RGB", (width, height + 16 * ((len(names) + 3) // 4)), "white")
    d = ImageDraw.Draw(img)
    w = width // max(1, len(panels))
    for p, (title, curves) in enumerate(panels):
        x0, x1, y0, y1 = p * w + pad, (p + 1) * w - pad // 2, height - pad, pad // 2 + 12
        points = [pt for c in curves.values() for pt in c]
        if not points:
            continue
        xmax = max(x for x, _ in points) or 1
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        hi = hi if hi > lo else lo + 1

        def at(x, v):
            return x0 + (x1 - x0) * x / xmax, y0 - (y0 - y1) * (v - lo) / (hi - lo)
        d.rectangle([x0, y1, x1, y0], outline=(200, 200, 200))
        for k in range(5):  # four gridlines, labelled
            v = lo + (hi - lo) * k / 4
            d.line([at(0, v), at(xmax, v)], fill=(235, 235, 235))
            d.text((x0 - 4, at(0, v)[1]), f"{v:.3g}", fill="black", anchor="rm")
        d.text((x0, y1 - 14), title, fill="black")
        d.text((x1, y0 + 6), f"images seen ({xmax:,.0f})", fill="black", anchor="ra")
        for name, curve in curves.items():
            if len(curve) > 1:
                d.line([at(x, v) for x, v in curve], fill=COLOURS[names.index(name) % len(COLOURS)], width=2)
    for i, name in enumerate(names):  # the legend
        x, y = pad + (i % 4) * (width - 2 * pad) // 4, height + 16 * (i // 4)
        d.line([(x, y + 6), (x + 18, y + 6)], fill=COLOURS[i % len(COLOURS)], width=3)
        d.text((x + 24, y), name, fill="black")
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def contact_sheet(rows, root, size=64, pad=4):
    """transfer_set.py's OUT.png: [(query ref, [neighbour refs])] -> PIL image, one row per query: the
    query, a gap, its neighbours."""
    ncol = 1 + max(len(n) for _, n in rows)
    sheet = Image.new("RGB", (ncol * (size + pad) + 3 * pad, len(rows) * (size + pad)), "white")
    for r, (q, ns) in enumerate(rows):
        for c, ref in enumerate([q] + ns):
            sheet.paste(open_image(ref, root).resize((size, size)),
                        (c * (size + pad) + (3 * pad if c else 0), r * (size + pad)))
    return sheet
