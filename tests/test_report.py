"""report.comparisons_table: Holm's correction over the whole table, raw p kept beside it."""

import pytest

from hf_soups.report import comparisons_table


def entry(model: str, eval_set: str, difference: float, p: float, **extra) -> dict:
    return {
        "name_a": model,
        "name_b": "ingredient 3",
        "eval_set": eval_set,
        "difference": difference,
        "mcnemar_p": p,
        "p_value": p,
        "significant": p < 0.05,  # the raw verdict; the table must not star by it
        **extra,
    }


def cells(table: str) -> dict[tuple[str, str], str]:
    header, _, *rows = table.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    found = {}
    for row in rows:
        model, *values = (c.strip() for c in row.strip("|").split("|"))
        found.update({(model, column): v for column, v in zip(columns, values)})
    return found


def test_stars_follow_holm_adjusted_p_over_the_whole_table():
    entries = [
        entry("uniform soup", "test", 0.021, 0.001),
        entry("uniform soup", "rotate", 0.012, 0.049),
        entry("greedy soup", "test", 0.018, 0.012),
        entry("greedy soup", "rotate", -0.004, 0.6),
    ]
    table = comparisons_table(entries, baseline="best individual")
    assert table.splitlines()[0] == "| vs best individual (ingredient 3) | test | rotate |"
    # Holm by hand, m = 4: 0.001 x 4 = 0.004; 0.012 x 3 = 0.036; 0.049 x 2 = 0.098; 0.6 x 1 = 0.6.
    assert cells(table) == {
        ("uniform soup", "test"): "+2.1 (p=0.001, adj. p=0.004)*",
        ("uniform soup", "rotate"): "+1.2 (p=0.049, adj. p=0.098)",
        ("greedy soup", "test"): "+1.8 (p=0.012, adj. p=0.036)*",
        ("greedy soup", "rotate"): "-0.4 (p=0.6, adj. p=0.6)",
    }


def test_level_and_older_entries():
    # Entries saved before p_value was recorded carry only the McNemar p.
    old = [
        {k: v for k, v in entry("soup", "test", 0.02, 0.02).items() if k != "p_value"},
        {k: v for k, v in entry("soup", "blur", 0.01, 0.03).items() if k != "p_value"},
    ]
    # Holm: 0.02 x 2 = 0.04, 0.03 x 1 = 0.03 -> 0.04 (monotone).
    assert cells(comparisons_table(old)) == {
        ("soup", "test"): "+2.0 (p=0.02, adj. p=0.04)*",
        ("soup", "blur"): "+1.0 (p=0.03, adj. p=0.04)*",
    }
    strict = cells(comparisons_table(old, alpha=0.01))
    assert not any(cell.endswith("*") for cell in strict.values())
    with pytest.raises(ValueError, match="no p-value"):
        comparisons_table([{**old[0], "mcnemar_p": None}])
