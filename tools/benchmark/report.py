"""Printing what was measured: markdown tables whose numbers a reader compares at a glance."""


class Table:
    """Rows of measurements, printed as a markdown table and kept for --json."""

    def __init__(self):
        self.rows = {}

    def add(self, key, what, stats, unit, flops=None, matmul=None):
        stats = stats if isinstance(stats, dict) else {"median": stats}
        row = {"what": what, **stats, "unit": unit}
        if flops is not None:
            row["gflops_per_s"] = flops / stats["median"] / 1e9
            row["of_matmul"] = row["gflops_per_s"] / matmul["median"]
        self.rows[key] = row

    def print(self, title):
        print(title)
        print("| what | median | min-max | unit | GFLOP/s | of matmul |")
        print("|---|---|---|---|---|---|")
        for row in self.rows.values():
            spread = f"{number(row['min'])}-{number(row['max'])}" if "min" in row else ""
            rate = number(row["gflops_per_s"]) if "gflops_per_s" in row else ""
            share = f"{100 * row['of_matmul']:.2g}%" if "of_matmul" in row else ""
            print(f"| {row['what']} | {number(row['median'])} | {spread} | {row['unit']} | {rate} | {share} |")


def number(x) -> str:
    """A table cell: integers with thousands separators, other values to 4 significant digits."""
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
