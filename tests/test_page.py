"""docs/analyses.md says what its records say: the page is its template filled from docs/data, the
template holds no number of its own, and the tables' numbers agree with a computation of this
test's own from the records' raw values (numpy, scipy)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_ind

from tools import page

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "docs" / "analyses.md.in"
# The numbers the template may state itself: definitions (8x8 digits, the 4x4 branch, n = 1..1000,
# t~ = 2 n / 1000 - 1, k = 1, 2, 3, s = 0, 1, 3, the last 100 steps), names (Table 5, section 6,
# DiMR-S/2R, DPM-Solver++(3S), ImageNet 64 at 300K steps, 2D numbers, run folder 000-) and the
# flags of the commands it shows. Everything else comes from a record.
DEFINITIONS = {"0", "1", "2", "3", "4", "5", "6", "8", "64", "100", "200", "500", "1000", "000",
               "2D", "2R", "3S", "300K"}


def table_rows(text, first_header):
    """The rows (lists of cells) of the markdown table whose header starts with first_header."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def check_page(text, data_dir, template=TEMPLATE):
    data_dir = Path(data_dir)
    assert text == page.render(template.read_text(), page.fields(data_dir)), \
        "the page is not its template filled from the records: run python -m tools.figures"
    t5 = json.loads((data_dir / "table5.json").read_text())
    analysis = json.loads((data_dir / "analysis.json").read_text())

    for row in table_rows(text, "model | FID (paper)"):  # Table 5: mean +- sd over the seeds
        runs = t5["results"][row[0]]
        fids = [r["fid"] for r in runs]
        sd = np.std(fids, ddof=1) if len(fids) > 1 else 0.0
        assert row[3] == f"{np.mean(fids):.2f} +- {sd:.2f}", row
        assert row[6] == f"{runs[0]['parameters']:,}"

    for row in table_rows(text, "change (from -> to)"):  # Welch's t-test, recomputed
        change = next(c for c in t5["comparisons"] if row[0].startswith(c["change"] + " ("))
        a, b = ([r["fid"] for r in t5["results"][name]] for name in (change["from"], change["to"]))
        if min(len(a), len(b)) > 1:
            p = ttest_ind(b, a, equal_var=False).pvalue
            assert (f"p = {p:.3f}" if p >= 0.001 else "p < 0.001") in row[1], row
            verdict = "no difference shown" if p >= 0.10 else (
                ("" if p < 0.05 else "marginally ") +
                ("better" if np.mean(b) < np.mean(a) else "worse"))
            assert row[1].endswith(f"**{verdict}**"), row

    for row in table_rows(text, "model | share below"):  # distortion: the seeds' mean share
        if row[0] in t5["results"]:
            shares = [r["low_confidence"] for r in t5["results"][row[0]]]
            assert row[1].startswith(f"{100 * np.mean(shares):.1f}% +- "), row

    for row in table_rows(text, "model | class | series"):  # the PCA: trained layers, first 2
        if row[2] == "trained layers":
            layers = [r for seed in analysis["pca"][row[0]].values()
                      for r in seed[row[1]]["layers"].values()]
            assert row[4] == f"{np.mean([r[1] for r in layers]):.3f} " \
                             f"({np.min([r[1] for r in layers]):.3f})", row


def test_the_template_holds_no_number_of_its_own():
    text = page.FIELD.sub("", TEMPLATE.read_text())
    text = re.sub(r"\]\([^)]*\)|`[^`]*`", "", text)  # links and code: names, not numbers
    numbers = set(re.findall(r"\d+(?:[.,]\d+)*(?:[A-Z]+\b)?", text))
    assert numbers <= DEFINITIONS, sorted(numbers - DEFINITIONS)


def test_render_names_a_missing_field():
    assert page.render("a {{x}} b", {"x": "1"}) == "a 1 b"
    with pytest.raises(KeyError, match="y"):
        page.render("{{y}}", {})


def test_the_page_says_what_its_records_say():
    check_page((ROOT / "docs" / "analyses.md").read_text(), ROOT / "docs" / "data")
