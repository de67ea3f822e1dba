"""bench/fits_table.py on the CPU: its cells are the trainer's own plans (trainer/plan.resolve on a GPU of the card's
usable memory), a fit never exceeds the card, a bigger card never fits less, and a measured row counts for a cell
only where it ran the same plan."""
import dataclasses
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import calibrate_memory  # noqa: E402
import fits_table  # noqa: E402
from trainer.memory import FIT_FRACTION, GiB  # noqa: E402
from trainer.plan import Machine, resolve  # noqa: E402

RANK = {"no": 0, "tight": 1, "fits": 2}


@pytest.fixture(scope="module")
def cells():
    return fits_table.cells([])


@pytest.mark.parametrize("size,method,gb", [("2x128", "LoRA (bf16)", 8), ("2x128", "QLoRA (nf4)", 80),
                                            ("13.3B", "LoRA (bf16)", 8), ("13.3B", "QLoRA (nf4)", 24),
                                            ("13.3B", "state tuning", 48)])
def test_a_cell_is_the_plan_the_trainer_makes_on_that_card(size, method, gb):
    card = next(c for c in fits_table.CARDS if c.gb == gb)
    got = fits_table.cell(size, method, card, [])
    cfg, sizes = fits_table.settings(method), fits_table.sizes_of(size)
    assert (cfg.GRAD_CP, cfg.OFFLOAD_BLOCKS, cfg.CTX_LEN, cfg.MICRO_BSZ, cfg.TRAIN_PARTS) == \
        ("auto", "auto", 1024, 1, ())
    plan = resolve(cfg, sizes, Machine(free=card.usable))
    assert got["gib"] == pytest.approx(plan.estimate.total / GiB, rel=1e-12) and got["kind"] == "estimated"
    assert (got["offload"], got["keep_products"], got["cudagraphs"]) == \
        (plan.offload, plan.keep_products, plan.cudagraphs)
    assert got["checkpointed"] == (sizes.n_layer - plan.plain_top if plan.checkpointing else 0)
    assert (got["n_layer"], got["n_embd"]) == (sizes.n_layer, sizes.n_embd)
    if size == "13.3B" and method == "LoRA (bf16)":     # an 8 GB card: the frozen bf16 weights must stream
        assert got["offload"] > 0 and got["host_gib"] > 0


def test_the_13b_shape_has_about_13_billion_parameters():
    from trainer.counts import param_table
    t = param_table(fits_table.settings("LoRA (bf16)"), fits_table.sizes_of("13.3B"))
    assert 13.0e9 < t.total < 13.4e9


def test_a_fit_is_within_the_card_and_a_bigger_card_never_fits_less(cells):
    assert len(cells) == len(fits_table.G1) * len(fits_table.METHODS) * len(fits_table.CARDS)
    for c in cells:
        usable = c["usable_gib"]
        if c["verdict"] == "fits":
            assert c["gib"] <= FIT_FRACTION * usable + 1e-9
        if c["verdict"] in ("fits", "tight"):
            assert c["gib"] <= usable + 1e-9
        else:
            assert c["gib"] > usable
    for size in fits_table.G1:
        for method in fits_table.METHODS:
            row = sorted((c for c in cells if c["size"] == size and c["method"] == method),
                         key=lambda c: c["usable_gib"])
            ranks = [RANK[c["verdict"]] for c in row]
            assert ranks == sorted(ranks), (size, method, ranks)


def test_the_table_has_a_row_per_size_and_method_and_says_estimated(cells):
    lines = fits_table.table(cells)
    assert len(lines) == 2 + len(fits_table.G1) * len(fits_table.METHODS)
    assert all(line.count("(e)") == len(fits_table.CARDS) for line in lines[2:])


def test_a_measured_row_counts_only_for_the_same_plan():
    card = fits_table.CARDS[-1]
    plan = fits_table.plan_on(fits_table.settings("state tuning"), fits_table.sizes_of("1.5B"), card)
    row = {"version": 7, "size": "1.5B", "vocab": 65536, "date": "2026-12-07", "command": "measured"}
    same = calibrate_memory.Compared(row, plan.estimate, 5 * GiB, 6.0 * GiB)
    got = fits_table.cell("1.5B", "state tuning", card, [same])
    assert (got["kind"], got["gib"], got["verdict"], got["measured_row"]) == ("measured", 6.0, "fits", "measured")
    assert fits_table.cell_text(got).startswith("✓ 6.0 (m)")
    other_plan = dataclasses.replace(plan.estimate, total=plan.estimate.total * 1.01)
    other_size = dict(row, size="2.9B")
    for run in (calibrate_memory.Compared(row, other_plan, 5 * GiB, 6.0 * GiB),
                calibrate_memory.Compared(other_size, plan.estimate, 5 * GiB, 6.0 * GiB)):
        assert fits_table.cell("1.5B", "state tuning", card, [run])["kind"] == "estimated"


def test_the_script_prints_the_tables_from_the_measured_rows(capsys):
    assert fits_table.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | method | 8 GB (7.8 GiB) |") and "| 13.3B | full fine-tuning |" in out
    assert "Measured on an H100 near these settings" in out and "| 1.5B | state, GRAD_CP=1 |" in out


def test_a_row_train_speed_records_for_the_default_settings_marks_the_cells_of_its_plan(cells):
    """An H100 run of 1.5B QLoRA with the defaults (GRAD_CP=auto: no block checkpointed there, as on every card in
    the table) as bench/train_speed.py --json records it, read as calibrate_memory reads it: every 1.5B QLoRA cell
    becomes measured; no other cell does."""
    import train_speed
    row = dict(train_speed._row(7, "1.5B", "lora+nf4", 1024, 1, "auto"), vocab=65536, n_layer=24, n_embd=2048,
               op_resolved="triton", plain_top=24, keep_products=0, emb_on_cpu=True, ffn_pieces=1,
               cuda_stack_kept_bytes=0, used_baseline_bytes=0, peak_alloc_bytes=5 * GiB, load_alloc_bytes=GiB,
               peak_used_bytes=int(5.5 * GiB), load_used_bytes=GiB, date="2026-12-08", command="measured")
    runs = calibrate_memory.compare_rows([row])
    for c in cells:
        got = fits_table.cell(c["size"], c["method"], next(k for k in fits_table.CARDS if k.gb == c["card_gb"]), runs)
        mine = (c["size"], c["method"]) == ("1.5B", "QLoRA (nf4)")
        assert got["kind"] == ("measured" if mine else "estimated"), (c["size"], c["method"], c["card_gb"])
        if mine:
            assert got["gib"] == pytest.approx(5.5) and got["estimate_gib"] == pytest.approx(c["gib"])
